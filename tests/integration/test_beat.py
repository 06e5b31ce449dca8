"""Beat leader election: RedlockScheduler on real redis-server lock nodes.

In-process tests drive two schedulers' ``tick()`` by hand (a 0.1 s periodic
entry, sends recorded by a spy on ``Scheduler.apply_async``, the one place a
scheduler publishes). The subprocess tests run two real ``celery beat``
processes side by side, SIGKILL the leader half-way and read every sent
message from the broker's queue.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.beat import Scheduler
from celery.schedules import crontab

from celery_redlock.beat import HANDOVER_PREFIX, RedlockScheduler, RedlockSchedulerMixin
from celery_redlock.config import forget_managers, get_redlock, resolve_settings
from celery_redlock.exceptions import RedlockConfigError
from tests.integration.celery_apps.helpers import server_url, wait_for
from tests.servers import RedisServer

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 0.1  # the in-process tests' periodic entry, seconds
TASK = "beat_unit.tick"


# -- in-process: two schedulers, one lock -------------------------------------


class Spy:
    """Records every send of one scheduler: (monotonic time, entry name)."""

    def __init__(self, scheduler: RedlockScheduler) -> None:
        self.sends: list[tuple[float, str]] = []
        real = scheduler.apply_async

        def apply_async(entry: Any, producer: Any = None, advance: bool = True, **kw: Any) -> Any:
            self.sends.append((time.monotonic(), entry.name))
            return real(entry, producer=producer, advance=advance, **kw)

        scheduler.apply_async = apply_async  # type: ignore[method-assign]

    def since(self, when: float) -> list[tuple[float, str]]:
        return [s for s in self.sends if s[0] >= when]


def make_app(servers: list[str], **conf: Any) -> Celery:
    app = Celery(f"beat_unit_{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.update(
        redlock_servers=servers,
        redlock_beat_ttl=1.5,
        redlock_beat_poll=0.2,
        beat_schedule={"tick": {"task": TASK, "schedule": INTERVAL}},
    )
    app.conf.update(conf)
    return app


@pytest.fixture
def schedulers(tmp_path: Path) -> Iterator[Callable[..., tuple[RedlockScheduler, Spy]]]:
    """Factory: ``schedulers(app)`` -> (a RedlockScheduler with its own schedule file, its Spy)."""
    made: list[RedlockScheduler] = []

    def make(app: Celery) -> tuple[RedlockScheduler, Spy]:
        path = tmp_path / f"schedule-{len(made)}"
        scheduler = RedlockScheduler(app=app, schedule_filename=str(path), lazy=False)
        made.append(scheduler)
        return scheduler, Spy(scheduler)

    try:
        yield make
    finally:
        for scheduler in made:
            scheduler.close()
        forget_managers()


def drive(schedulers: list[RedlockScheduler], seconds: float) -> None:
    """Tick every scheduler, as beat's loop would, for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        waits = [s.tick() for s in schedulers]
        time.sleep(max(0.0, min(0.02, *waits)))


def runs(scheduler: RedlockScheduler) -> int:
    return int(scheduler.schedule["tick"].total_run_count)


def test_exactly_one_of_two_schedulers_leads_and_only_it_sends(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    app = make_app(redis_urls[:3])
    (a, spy_a), (b, spy_b) = schedulers(app), schedulers(app)
    drive([a, b], 1.5)
    assert [a.is_leader, b.is_leader].count(True) == 1
    leader, standby = (a, b) if a.is_leader else (b, a)
    spy_leader, spy_standby = (spy_a, spy_b) if leader is a else (spy_b, spy_a)
    assert spy_standby.sends == []
    # About one send per 0.1 s interval (beat and a busy machine lose a few).
    assert 6 <= len(spy_leader.sends) <= 16, spy_leader.sends
    gaps = [t2 - t1 for (t1, _), (t2, _) in zip(spy_leader.sends, spy_leader.sends[1:])]
    assert min(gaps) > INTERVAL / 2, gaps
    # The standby advanced its schedule as if it had sent: no burst when it takes over.
    assert abs(runs(leader) - runs(standby)) <= 1
    # The lock on the nodes holds the leader's token.
    assert get_redlock(resolve_settings(app)).holder(leader.redlock_beat_lock_key) == (
        leader.redlock_beat_token
    )


def test_a_standby_says_once_at_info_which_beat_holds_the_leader_lock(
    redis_urls: list[str],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A beat that stays standby (another project's beat on the same key, say) can
    be told from its log: which beat leads, named once, not at every poll."""
    app = make_app(redis_urls[:3])
    leader, _ = schedulers(app)
    drive([leader], 0.3)
    assert leader.is_leader
    standby, _ = schedulers(app)
    with caplog.at_level(logging.INFO, logger="celery_redlock.beat"):
        drive([leader, standby], 1.0)  # about 5 polls
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name == "celery_redlock.beat"
        and r.levelno == logging.INFO
        and "standby" in r.getMessage()
    ]
    assert said == [
        f"beat: standby; the leader lock {leader.redlock_beat_lock_key} is held by "
        f"{leader.redlock_beat_token} (host:pid:id); this beat takes over when it is "
        "released or expires"
    ]


def test_leader_steps_down_when_its_key_is_deleted_and_another_beat_leads(
    redis_urls: list[str],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(redis_urls[:3])
    (a, spy_a), (b, spy_b) = schedulers(app), schedulers(app)
    drive([a], 0.5)
    assert a.is_leader
    assert spy_a.sends
    manager = get_redlock(resolve_settings(app))
    assert manager.force_release(a.redlock_beat_lock_key) == 3
    drive([b], 0.3)  # b takes the free lock
    assert b.is_leader
    b_leads = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="celery_redlock.beat"):
        drive([a, b], 1.5)
    assert not a.is_leader
    assert b.is_leader
    assert any("stepping down" in r.getMessage() for r in caplog.records)
    # a keeps sending only until its next renewal (every ttl/3 = 0.5 s), never after.
    late = spy_a.since(b_leads + 1.5 / 3 + 0.1)
    assert late == [], late
    assert len(spy_b.since(b_leads)) >= 5
    assert manager.holder(a.redlock_beat_lock_key) == b.redlock_beat_token


def test_a_renewal_finding_the_key_taken_steps_down_at_once(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """The key deleted and taken by another token (celery redlock release, then a
    standby): the leader's next renewal (every third of the 1.5 s TTL) says so on a
    quorum, and it stops sending then, not when its lock's validity runs out."""
    app = make_app(redis_urls[:3])
    a, spy_a = schedulers(app)
    drive([a], 0.3)
    assert a.is_leader
    manager = get_redlock(resolve_settings(app))
    manager.force_release(a.redlock_beat_lock_key)
    taken = time.monotonic()
    assert manager.lock(a.redlock_beat_lock_key, 30, value="another-beat") is not None
    assert wait_for(lambda: (a.tick(), a._leader is None)[1], timeout=2.0)
    assert time.monotonic() - taken < 1.2  # the next renewal, not the validity's end
    sent = len(spy_a.sends)
    drive([a], 0.5)
    assert len(spy_a.sends) == sent


def test_leader_cut_off_from_a_majority_steps_down_and_does_not_send(
    fresh_nodes: Callable[..., list[RedisServer]],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
) -> None:
    nodes = fresh_nodes(3)
    app = make_app([n.url for n in nodes])
    (a, spy_a), (b, spy_b) = schedulers(app), schedulers(app)
    drive([a, b], 0.5)
    assert a.is_leader
    assert not b.is_leader
    nodes[0].pause()
    nodes[1].pause()
    try:
        cut = time.monotonic()
        drive([a, b], 1.5 + 0.3)  # past the whole TTL (1.5 s) after its last renewal
        assert not a.is_leader
        assert not b.is_leader
        # a kept trying to renew while its lock was still valid; it sent nothing
        # once its validity (the last renewal, before the cut, plus the TTL) ran out.
        assert spy_a.since(cut + 1.5) == []
        assert spy_b.sends == []
    finally:
        nodes[0].resume()
        nodes[1].resume()
    drive([a, b], 1.5 + 0.5)  # the paused nodes' keys run out; someone leads again
    assert [a.is_leader, b.is_leader].count(True) == 1


def test_a_failed_renewal_with_validity_left_is_retried_and_the_leader_stays(
    redis_urls: list[str],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One renewal fails (a slow node, a lost reply) while the lock has most of its
    TTL left: the leader tries again soon instead of stepping down (which would
    hand leadership over, or leave no leader until the TTL ran out)."""
    app = make_app(redis_urls[:3])
    a, spy_a = schedulers(app)
    drive([a], 0.3)
    assert a.is_leader
    lock = a._leader
    manager = get_redlock(resolve_settings(app))
    real = type(manager).extend
    failures: list[float] = []

    def fails_once(self: Any, *args: Any, **kwargs: Any) -> bool:
        if not failures:
            failures.append(time.monotonic())
            return False
        return bool(real(self, *args, **kwargs))

    monkeypatch.setattr(type(manager), "extend", fails_once)
    drive([a], 1.5)  # past two renewals (every 0.5 s)
    assert failures
    assert a.is_leader
    assert a._leader is lock  # the same lock, renewed after the failure
    assert spy_a.since(failures[0] + 0.1)  # and it kept sending


def test_leader_paused_past_its_ttl_does_not_send_when_it_wakes(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """A frozen leader (GC pause, SIGSTOP) whose lock expired: its first tick steps down."""
    app = make_app(redis_urls[:3])
    (a, spy_a), (b, spy_b) = schedulers(app), schedulers(app)
    drive([a], 0.3)
    assert a.is_leader
    assert a._watch is not None
    a._watch.cancel()  # frozen: its renewer thread too
    drive([b], 1.5 + 0.5)  # a does not tick for longer than its TTL; b takes over
    assert b.is_leader
    woke = time.monotonic()
    drive([a, b], 0.5)  # a's entries are overdue: it must still not send
    assert spy_a.since(woke) == []
    assert not a.is_leader
    assert b.is_leader
    assert spy_b.since(woke)


def test_validity_running_out_before_a_send_steps_down_without_sending(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    app = make_app(redis_urls[:3])
    a, spy_a = schedulers(app)
    drive([a], 0.3)
    assert a.is_leader
    lock = a._leader
    assert lock is not None
    assert a._watch is not None
    a._watch.cancel()  # no renewal comes before the next send
    lock.expires_at = time.monotonic()  # as if the renewal had been missed
    before = len(spy_a.sends)
    assert wait_for(lambda: (a.tick(), a._leader is not lock)[1], timeout=2 * INTERVAL + 0.2)
    assert len(spy_a.sends) == before
    # Stepping down frees the key where it still held a's token: no wait for the TTL.
    assert get_redlock(resolve_settings(app)).inspect(a.redlock_beat_lock_key).nodes_holding == 0


def test_a_beat_stopped_mid_election_leaves_no_lock_for_the_others_to_wait_out(
    redis_urls: list[str],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM (SystemExit) landing as the election's replies came in: the token the
    nodes took is freed as the beat goes, so another beat leads at its next poll, not
    after the leader lock's TTL."""
    app = make_app(redis_urls, redlock_beat_ttl=3.0)
    first, _ = schedulers(app)
    second, _ = schedulers(app)
    manager = first.redlock
    real = manager.acquire
    taken: list[Any] = []

    def acquire(*args: Any, **kwargs: Any) -> Any:
        lock = real(*args, **kwargs)
        if not taken:
            taken.append(lock)
            raise SystemExit(143)  # the signal handler's exception, right after the SETs
        return lock

    monkeypatch.setattr(manager, "acquire", acquire)
    with pytest.raises(SystemExit):
        first.tick()
    assert taken  # the nodes had given it the lock
    assert manager.holder(first._key) is None
    started = time.monotonic()
    while not second.is_leader:
        assert time.monotonic() - started < 1.0, "the second beat waits out the TTL"
        second.tick()
        time.sleep(0.02)


def test_close_hands_the_lock_over_so_the_standby_leads_at_its_next_poll(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    app = make_app(redis_urls[:3], redlock_beat_ttl=30.0)  # only a hand-over can be fast
    (a, _), (b, spy_b) = schedulers(app), schedulers(app)
    drive([a, b], 0.3)
    assert a.is_leader
    assert not b.is_leader
    manager = get_redlock(resolve_settings(app))
    a.close()
    closed = time.monotonic()
    handed = manager.holder(a.redlock_beat_lock_key)
    assert handed is not None
    assert handed.startswith(HANDOVER_PREFIX)
    assert json.loads(handed[len(HANDOVER_PREFIX) :])["from"] == a.redlock_beat_token
    assert wait_for(lambda: (b.tick(), b.is_leader)[1], timeout=2.0, interval=0.01)
    assert time.monotonic() - closed <= 0.2 + 0.3  # the poll, plus slack
    assert manager.holder(b.redlock_beat_lock_key) == b.redlock_beat_token
    drive([b], 0.3)
    assert spy_b.sends


def test_after_a_hand_over_the_new_leader_goes_on_from_the_old_leader_s_sends(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """An every-second entry: the standby, started half a second later, keeps a phase
    of its own; after the leader's clean shutdown just after a send, the new leader
    sends one interval after that send, not at its own phase half an interval on."""
    app = make_app(
        redis_urls[:3],
        redlock_beat_ttl=30.0,
        beat_schedule={"tick": {"task": TASK, "schedule": 1.0}},
    )
    a, spy_a = schedulers(app)
    drive([a], 0.5)
    assert a.is_leader
    b, spy_b = schedulers(app)  # its entry's phase: half a second after a's
    assert wait_for(lambda: (drive([a, b], 0.01), len(spy_a.sends) >= 2)[1], 4.0, 0.0)
    a.close()  # just after a send: b's own phase would send half an interval later
    last = spy_a.sends[-1][0]
    assert wait_for(lambda: (drive([b], 0.01), bool(spy_b.sends))[1], 3.0, 0.0)
    gap = spy_b.sends[0][0] - last
    assert 0.9 <= gap <= 1.5, gap


def test_a_handed_over_send_time_far_ahead_of_this_clock_is_not_taken(
    redis_urls: list[str],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An old leader whose clock ran an hour ahead: its last send is not taken (the
    entry would not be sent for an hour); one a few seconds ahead is."""
    app = make_app(
        redis_urls[:3],
        beat_schedule={
            "far": {"task": TASK, "schedule": INTERVAL},
            "near": {"task": TASK, "schedule": 3600.0},
        },
    )
    b, spy_b = schedulers(app)
    manager = get_redlock(resolve_settings(app))
    ahead = time.time() + 3600
    near = time.time() + 5
    token = HANDOVER_PREFIX + json.dumps({"from": "old", "sent": {"far": ahead, "near": near}})
    manager.acquire(b.redlock_beat_lock_key, 30, token)
    with caplog.at_level(logging.WARNING, logger="celery_redlock.beat"):
        drive([b], 0.6)
    assert b.is_leader
    assert b.schedule["near"].last_run_at.timestamp() == pytest.approx(near, abs=0.01)
    assert [name for _, name in spy_b.sends].count("far") >= 3  # sent on, every 0.1 s
    assert any(
        "not taking the old leader's last send of far" in r.getMessage() for r in caplog.records
    )


def test_a_crontab_time_the_old_leader_sent_is_not_sent_again_by_a_new_leader_behind_it(
    redis_urls: list[str],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
) -> None:
    """An every-minute crontab entry: the old leader sent this minute's run; the new
    leader's clock is behind (its own copy says the run is still due). Taking the
    hand-over, it does not send that run again."""
    app = make_app(redis_urls[:3], beat_schedule={"cron": {"task": TASK, "schedule": crontab()}})
    b, spy_b = schedulers(app)
    minute = math.floor(time.time() / 60) * 60  # this minute's run, D
    entry = b.schedule["cron"]
    entry.last_run_at = datetime.fromtimestamp(minute - 30, timezone.utc)  # behind: D due
    assert entry.is_due()[0]
    token = HANDOVER_PREFIX + json.dumps({"from": "old", "sent": {"cron": minute + 0.05}})
    get_redlock(resolve_settings(app)).acquire(b.redlock_beat_lock_key, 30, token)
    drive([b], 0.5)
    assert b.is_leader
    assert spy_b.sends == []
    assert not b.schedule["cron"].is_due()[0]


class CachingScheduler(RedlockSchedulerMixin, Scheduler):  # type: ignore[misc]
    """Keeps its entries as first read, as django-celery-beat's DatabaseScheduler does
    (its ``reserve`` does not store the advanced entry in ``schedule``)."""

    def reserve(self, entry: Any) -> Any:
        return next(entry)


def test_the_hand_over_carries_the_sends_that_went_through_not_the_entries_state(
    redis_urls: list[str],
) -> None:
    """A scheduler that caches its entries, and a send that fails: the hand-over
    carries the time of the last send that went through."""
    app = make_app(redis_urls[:3])
    a = CachingScheduler(app=app, lazy=False)
    sends: list[float] = []
    real = a.send_task

    def send_task(*args: Any, **kwargs: Any) -> Any:
        if len(sends) >= 3:
            raise ConnectionError("broker gone")
        result = real(*args, **kwargs)
        sends.append(time.time())
        return result

    a.send_task = send_task  # type: ignore[method-assign]
    try:
        drive([a], 1.0)  # 3 sends go through, the others fail
        assert a.is_leader
        assert len(sends) == 3
    finally:
        a.close()
    handed = get_redlock(resolve_settings(app)).holder(a.redlock_beat_lock_key)
    assert handed is not None
    sent = json.loads(handed[len(HANDOVER_PREFIX) :])["sent"]
    assert sent["tick"] == pytest.approx(sends[-1], abs=0.05)
    forget_managers()


def test_a_leader_that_led_twice_hands_over_what_it_sent_before_as_a_lower_bound(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """The leader sent an entry, stepped down, led again (so it knows no longer what
    was sent in between) and shut down: a standby that caches its entries (no dry
    ticks) still does not send that entry again at once."""
    app = make_app(redis_urls[:3], beat_schedule={"slow": {"task": TASK, "schedule": 2.0}})
    a, spy_a = schedulers(app)
    a.schedule["slow"].last_run_at = datetime.now(timezone.utc) - timedelta(seconds=3)  # due
    drive([a], 0.3)
    assert [name for _, name in spy_a.sends] == ["slow"]
    a._step_down("a test: a renewal that failed")
    drive([a], 0.5)
    assert a.is_leader
    assert len(spy_a.sends) == 1
    b = CachingScheduler(app=app, lazy=False)
    b.redlock_standby_ticks = False
    b_sends: list[str] = []
    real = b.send_task
    b.send_task = lambda name, *a, **k: (b_sends.append(name), real(name, *a, **k))[1]  # type: ignore[method-assign]
    b.schedule["slow"].last_run_at = datetime.now(timezone.utc) - timedelta(seconds=3)  # stale
    try:
        a.close()
        drive([b], 1.0)
        assert b.is_leader
        assert b_sends == []  # next due 2 s after a's send, not at once
    finally:
        b.close()


@pytest.mark.parametrize(
    "body",
    ['{"sent":{"tick":-62135596800}}', '{"sent":' + "[" * 5000 + "]" * 5000 + "}", "not json"],
)
def test_a_handed_over_lock_that_is_not_of_ours_never_raises_out_of_tick(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]], body: str
) -> None:
    app = make_app(redis_urls[:3], timezone="America/New_York")
    b, spy_b = schedulers(app)
    get_redlock(resolve_settings(app)).acquire(b.redlock_beat_lock_key, 30, HANDOVER_PREFIX + body)
    drive([b], 0.5)  # would raise
    assert b.is_leader
    assert spy_b.sends  # goes on from its own schedule


def test_a_scheduler_sending_without_apply_entry_sends_only_as_the_leader(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """RedBeat sends due entries with ``apply_async``, never ``apply_entry``: a
    standby's call sends nothing, the leader's does."""
    app = make_app(redis_urls[:3])
    (a, _), (b, _) = schedulers(app), schedulers(app)
    drive([a, b], 0.3)
    leader, standby = (a, b) if a.is_leader else (b, a)
    sent: list[str] = []
    for scheduler in (leader, standby):
        real = scheduler.send_task
        scheduler.send_task = (  # type: ignore[method-assign]
            lambda *args, _real=real, **kw: (sent.append(args[0]), _real(*args, **kw))[1]
        )
    assert standby.apply_async(standby.schedule["tick"]) is None
    assert sent == []
    assert leader.apply_async(leader.schedule["tick"]) is not None
    assert sent == [TASK]


def test_a_leader_dying_without_a_hand_over_loses_no_due_time_to_the_standby_s_ticks(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """The leader dies (no hand-over) just before two due times: one of an entry it
    had sent before, one of an entry it never sent. The standby's ticks advance
    both past their due times while the dead leader's lock runs out; taking over,
    it goes on from the sends noted beside the lock (and, for the entry no one
    sent, from before its own ticks): it sends each once, at once, not one period
    later."""
    app = make_app(
        redis_urls[:3],
        beat_schedule={
            "slow": {"task": TASK, "schedule": 3.0},
            "late": {"task": TASK, "schedule": 6.2},
        },
    )
    (a, spy_a), (b, spy_b) = schedulers(app), schedulers(app)
    start = time.monotonic()
    drive([a, b], 5.5)
    assert a.is_leader
    assert [name for _, name in spy_a.sends] == ["slow"]  # at about 3 s
    assert spy_b.sends == []
    assert a._watch is not None
    a._watch.cancel()  # a dies: no more ticks, no renewals, no hand-over
    died = time.monotonic()
    while not b.is_leader:
        b.tick()
        time.sleep(0.02)
        assert time.monotonic() - died < 1.5 + 1.0, "b never took over"
    led = time.monotonic()
    assert led - start > 6.3  # both due times fell while a's lock ran out
    drive([b], 0.5)
    caught_up = sorted(name for when, name in spy_b.sends if when < led + 0.5)
    assert caught_up == ["late", "slow"], spy_b.sends


def test_a_send_refused_for_lock_validity_is_made_when_the_beat_leads_again(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """The leader lock's validity runs out just as an entry no one has sent yet comes
    due: the send is refused (Celery's tick has already stepped the entry past its
    due time) and the beat steps down. Leading again at its next poll, it sends
    that due time, not one period later."""
    app = make_app(redis_urls[:3], beat_schedule={"slow": {"task": TASK, "schedule": 2.0}})
    a, spy_a = schedulers(app)
    started = time.monotonic()
    drive([a], 1.6)
    assert a.is_leader
    assert spy_a.sends == []
    lock, watch = a._leader, a._watch
    assert lock is not None
    assert watch is not None
    watch.cancel()
    lock.expires_at = time.monotonic()  # its validity has run out
    drive([a], 2.6 - (time.monotonic() - started))  # due at 2.0; a poll later it leads
    assert a.is_leader
    sent = [when - started for when, _ in spy_a.sends]
    assert len(sent) == 1, sent
    assert 2.0 <= sent[0] < 2.6, sent


def test_a_leader_blocked_in_a_send_past_its_ttl_keeps_leading_alone(
    redis_urls: list[str], schedulers: Callable[..., tuple[RedlockScheduler, Spy]]
) -> None:
    """A send that blocks for longer than the leader lock's TTL (a publish lock that
    waits, a broker reconnecting): the lock is renewed meanwhile, so the standby
    never leads, and nothing is sent by both."""
    import threading

    app = make_app(redis_urls[:3])
    (a, _), (b, spy_b) = schedulers(app), schedulers(app)
    drive([a], 0.3)
    assert a.is_leader
    real = a.apply_async
    blocked: list[float] = []

    def slow_send(entry: Any, *args: Any, **kwargs: Any) -> Any:
        if not blocked:
            blocked.append(time.monotonic())
            time.sleep(2.5)  # the TTL is 1.5 s
        return real(entry, *args, **kwargs)

    a.apply_async = slow_send  # type: ignore[method-assign]
    stop = threading.Event()
    standby_led: list[bool] = []

    def run_standby() -> None:
        while not stop.is_set():
            b.tick()
            standby_led.append(b.is_leader)
            time.sleep(0.02)

    thread = threading.Thread(target=run_standby)
    thread.start()
    try:
        drive([a], 3.5)
    finally:
        stop.set()
        thread.join()
    assert blocked
    assert not any(standby_led)
    assert spy_b.sends == []
    assert a.is_leader


def test_a_failed_bid_s_leftovers_are_not_re_armed_by_the_next_bid(
    fresh_nodes: Callable[..., list[RedisServer]],
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
) -> None:
    """One node of three down, and what two beats' earlier bids left on one node
    each: every bid has a new token, so a leftover runs out with its TTL instead of
    being re-armed by the next bid (which left neither beat a quorum, for good)."""
    nodes = fresh_nodes(3)
    app = make_app([n.url for n in nodes])
    (a, _), (b, _) = schedulers(app), schedulers(app)
    key = a.redlock_beat_lock_key
    clients = [redis.Redis.from_url(n.url) for n in nodes]
    for client in clients:  # held by a third beat while both connect and bid
        client.set(key, "a-third-beat", px=60_000)
    drive([a, b], 0.5)
    assert not a.is_leader
    assert not b.is_leader
    nodes[0].pause()
    try:
        clients[1].set(key, a.redlock_beat_token, px=1500)
        clients[2].set(key, b.redlock_beat_token, px=1500)
        drive([a, b], 1.5 + 1.5)
        assert [a.is_leader, b.is_leader].count(True) == 1
    finally:
        nodes[0].resume()


def test_lazy_scheduler_takes_no_lock(redis_urls: list[str], tmp_path: Path) -> None:
    """``celery beat`` builds a lazy scheduler for its banner: it must not lead."""
    app = make_app(redis_urls[:3])
    scheduler = RedlockScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)
    assert "redlock leader lock -> redlock:beat:" in scheduler.info
    manager = get_redlock(resolve_settings(app))
    assert manager.holder(scheduler.redlock_beat_lock_key) is None
    forget_managers()


def test_lock_key_defaults_to_prefix_beat_app_name_and_can_be_set(
    redis_urls: list[str], tmp_path: Path
) -> None:
    app = make_app(redis_urls[:3], redlock_key_prefix="p:")
    scheduler = RedlockScheduler(app=app, schedule_filename=str(tmp_path / "a"), lazy=True)
    assert scheduler.redlock_beat_lock_key == f"p:beat:{app.main}"
    assert f":{os.getpid()}:" in scheduler.redlock_beat_token
    app2 = make_app(redis_urls[:3], redlock_beat_lock_key="my-beat")
    scheduler2 = RedlockScheduler(app=app2, schedule_filename=str(tmp_path / "b"), lazy=True)
    assert scheduler2.redlock_beat_lock_key == "my-beat"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("redlock_beat_ttl", 0),
        ("redlock_beat_ttl", -1),
        ("redlock_beat_ttl", "30"),
        ("redlock_beat_ttl", True),
        ("redlock_beat_ttl", math.inf),
        ("redlock_beat_ttl", math.nan),
        ("redlock_beat_poll", 0),
        ("redlock_beat_poll", [1]),
        ("redlock_beat_lock_key", ""),
        ("redlock_beat_lock_key", 5),
    ],
)
def test_a_bad_beat_setting_fails_at_construction_naming_it(
    setting: str, value: object, tmp_path: Path
) -> None:
    app = make_app(["redis://127.0.0.1:1/0"], **{setting: value})
    with pytest.raises(RedlockConfigError, match=setting) as info:
        RedlockScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=False)
    assert repr(value) in str(info.value)
    assert not list(tmp_path.iterdir())  # failed before opening its schedule file


class QuickScheduler(RedlockScheduler):
    redlock_beat_ttl = 4.5
    redlock_beat_lock_key = "quick-beat"


def test_a_scheduler_class_attribute_wins_over_the_app_setting(
    redis_urls: list[str], tmp_path: Path
) -> None:
    app = make_app(redis_urls[:3], redlock_beat_ttl=1.5, redlock_beat_poll=0.3)
    scheduler = QuickScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)
    assert scheduler.redlock_beat_ttl == 4.5
    assert scheduler.redlock_beat_poll == 0.3  # not set on the class: the app's
    assert scheduler.redlock_beat_lock_key == "quick-beat"


def test_a_bad_scheduler_class_attribute_is_named_with_its_class(tmp_path: Path) -> None:
    class Bad(RedlockScheduler):
        redlock_beat_poll = -2

    app = make_app(["redis://127.0.0.1:1/0"])
    with pytest.raises(RedlockConfigError, match="the attribute redlock_beat_poll of Bad"):
        Bad(app=app, schedule_filename=str(tmp_path / "s"), lazy=True)


def test_the_mixin_wraps_another_scheduler_class(
    redis_urls: list[str],
) -> None:
    """Celery's in-memory Scheduler (no schedule file) with leader election."""

    class MemoryRedlockScheduler(RedlockSchedulerMixin, Scheduler):  # type: ignore[misc]
        pass

    app = make_app(redis_urls[:3])
    a = MemoryRedlockScheduler(app=app, lazy=False)
    b = MemoryRedlockScheduler(app=app, lazy=False)
    spy_a, spy_b = Spy(a), Spy(b)  # type: ignore[arg-type]
    try:
        drive([a, b], 0.6)
        assert a.is_leader
        assert not b.is_leader
        assert spy_a.sends
        assert spy_b.sends == []
    finally:
        a.close()
        b.close()
        forget_managers()


def test_a_standby_of_a_shared_state_scheduler_does_not_touch_its_schedule(
    redis_urls: list[str],
) -> None:
    """With ``redlock_standby_ticks = False`` (a database or Redis schedule all beats
    share) the standby neither sends nor advances entries; it only seeks the lock."""

    class SharedStateScheduler(RedlockSchedulerMixin, Scheduler):  # type: ignore[misc]
        redlock_standby_ticks = False

    app = make_app(redis_urls[:3])
    a = SharedStateScheduler(app=app, lazy=False)
    b = SharedStateScheduler(app=app, lazy=False)
    spy_a, spy_b = Spy(a), Spy(b)  # type: ignore[arg-type]
    try:
        drive([a, b], 0.6)
        assert a.is_leader
        assert spy_a.sends
        assert spy_b.sends == []
        assert int(b.schedule["tick"].total_run_count) == 0  # untouched by the standby
        a.close()
        drive([b], 0.6)
        assert b.is_leader
        assert spy_b.sends
    finally:
        a.close()
        b.close()
        forget_managers()


def _django_beats(servers: list[str], db: Path, mode: str) -> dict[str, Any]:
    pytest.importorskip("django_celery_beat")
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.beat_apps.django_beat", ",".join(servers),
         str(db), mode],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_django_celery_beat_s_database_scheduler_with_the_mixin_hands_over_its_phase(
    redis_urls: list[str], tmp_path: Path
) -> None:
    """The README's HADatabaseScheduler on django-celery-beat itself (SQLite), an
    every-second PeriodicTask: the standby, whose entries are as it read them, sends
    nothing while the other leads, and after the leader's clean shutdown just after
    a send, sends one interval after that send; so it does going on from the record
    of sends beside the lock alone (as after a leader that died without a
    hand-over). The same run without either shows what they prevent: the standby's
    cached entry is long due, and it sends the period's task again at once."""
    run = _django_beats(redis_urls[:3], tmp_path / "beat.sqlite3", "handover")
    assert run["leaders_before"] == [True, False]
    assert run["b_sent_while_a_led"] == 0
    assert len(run["a"]) >= 3
    assert all(when > run["closed"] for when in run["b"])
    assert 0.9 <= run["gap"] <= 1.5, run
    assert len(run["b"]) >= 2
    record = _django_beats(redis_urls[:3], tmp_path / "record.sqlite3", "record-only")
    assert record["b_sent_while_a_led"] == 0
    assert 0.9 <= record["gap"] <= 1.5, record
    without = _django_beats(redis_urls[:3], tmp_path / "control.sqlite3", "no-handover")
    assert without["b_sent_while_a_led"] == 0
    assert without["gap"] < 0.5, without


def test_a_django_beat_taking_over_from_a_dead_leader_stores_the_noted_sends(
    redis_urls: list[str], tmp_path: Path
) -> None:
    """django-celery-beat re-reads its entries from the database (every 5 minutes,
    and on any change): a new leader that went on from the noted sends of a leader
    that died before writing its last send to the database stores them there too,
    so the re-read does not make an hourly task due again."""
    run = _django_beats(redis_urls[:3], tmp_path / "killed.sqlite3", "killed")
    assert run["a"] == 1
    assert run["b_led"] is True
    assert run["b"] == 0, run


def test_a_django_beat_makes_a_refused_send_when_it_leads_again(
    redis_urls: list[str], tmp_path: Path
) -> None:
    """DatabaseScheduler's tick moves the entry's model, not the entry it keeps: a
    send refused because the lock's validity ran out is still made when the beat
    leads again at its next poll, not a minute later."""
    run = _django_beats(redis_urls[:3], tmp_path / "refused.sqlite3", "refused")
    assert run["stepped_down"] is not None, run
    assert run["led_again"] is not None, run
    assert len(run["sends"]) == 1, run
    assert run["stepped_down"] < run["sends"][0] < 2.0, run  # not refused, then made


def test_no_lock_servers_and_no_redis_broker_names_redlock_servers(tmp_path: Path) -> None:
    app = Celery("beat_unit_nobroker", broker="amqp://guest@127.0.0.1//", set_as_current=False)
    with pytest.raises(RedlockConfigError, match="redlock_servers"):
        RedlockScheduler(app=app, schedule_filename=str(tmp_path / "s"), lazy=False)


def test_unreachable_nodes_never_crash_a_tick_and_warn_once(
    schedulers: Callable[..., tuple[RedlockScheduler, Spy]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0", "redis://127.0.0.1:3/0"])
    a, spy_a = schedulers(app)
    with caplog.at_level(logging.WARNING, logger="celery_redlock.beat"):
        drive([a], 1.0)  # five polls
    assert not a.is_leader
    assert spy_a.sends == []
    mine = [r for r in caplog.records if r.name == "celery_redlock.beat"]
    assert len(mine) == 1, [r.getMessage() for r in mine]
    assert "leader election failed" in mine[0].getMessage()


# -- subprocesses: two real `celery beat` processes ----------------------------

BEAT_TTL = 3.0
BEAT_POLL = 0.5


def _beat(tmp: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "celery",
        "-A", "tests.integration.beat_apps.beat_app",
        "beat",
        "-S", "celery_redlock.beat:RedlockScheduler",
        "--schedule", str(tmp / f"{name}-schedule"),
        "--pidfile", str(tmp / f"{name}.pid"),
        "-l", "info",
    ]  # fmt: skip
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _sent(broker: Any, queue: str) -> list[tuple[float, int, str]]:
    """Every message in the queue: (sent at, sending beat's pid, task id), oldest first."""
    out = []
    for raw in broker.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        out.append((float(headers["beat_sent_at"]), int(headers["beat_pid"]), headers["id"]))
    return sorted(out)


@dataclass
class BeatRun:
    """What two beats did: every send, and when the leader was killed."""

    sends: list[tuple[float, int, str]]
    pids: dict[str, int]
    started: float  # both beats running (time.time())
    killed: float
    stopped: float
    logs: dict[str, str]


def run_two_beats(
    tmp: Path, lock_urls: list[str], broker_server: RedisServer, seconds: float
) -> BeatRun:
    """Beat a leads, b joins as standby; SIGKILL a half-way; stop b cleanly after ``seconds``."""
    queue = f"beat-{uuid.uuid4().hex[:8]}"
    broker_url = server_url(broker_server, 3)
    env = dict(
        os.environ,
        REDLOCK_TEST_BROKER=broker_url,
        REDLOCK_TEST_SERVERS=",".join(lock_urls),
        REDLOCK_TEST_QUEUE=queue,
        REDLOCK_TEST_BEAT_TTL=str(BEAT_TTL),
        REDLOCK_TEST_BEAT_POLL=str(BEAT_POLL),
        REDLOCK_TEST_INTERVAL="1",
        PYTHONPATH=str(REPO),
    )
    lock_app = Celery("beat_test", set_as_current=False)
    lock_app.conf.redlock_servers = lock_urls
    manager = get_redlock(resolve_settings(lock_app))
    key = "redlock:beat:beat_test"

    def leader_pid() -> int | None:
        holder = manager.holder(key)
        return None if holder is None else int(holder.split(":")[1])

    broker = redis.Redis.from_url(broker_url)
    beats = {"a": _beat(tmp, "a", env)}
    try:
        if not wait_for(lambda: leader_pid() is not None, timeout=30):
            pytest.fail("beat a never took the lock:\n" + (tmp / "a.log").read_text())
        beats["b"] = _beat(tmp, "b", env)
        # b is running (its log says so) before the clock starts.
        assert wait_for(lambda: "beat: Starting" in (tmp / "b.log").read_text(), timeout=30)
        started = time.time()
        time.sleep(seconds / 2)
        assert leader_pid() == beats["a"].pid  # b stayed a standby
        os.kill(beats["a"].pid, signal.SIGKILL)
        killed = time.time()
        time.sleep(seconds / 2)
        assert leader_pid() == beats["b"].pid
        _stop(beats["b"])  # a clean shutdown hands the lock over
        stopped = time.time()
        assert beats["b"].returncode == 0
        handed = manager.holder(key)
        assert handed is not None
        assert handed.startswith(HANDOVER_PREFIX)
        return BeatRun(
            sends=_sent(broker, queue),
            pids={name: proc.pid for name, proc in beats.items()},
            started=started,
            killed=killed,
            stopped=stopped,
            logs={name: (tmp / f"{name}.log").read_text() for name in beats},
        )
    finally:
        for proc in beats.values():
            _stop(proc, signal.SIGKILL)
        broker.delete(queue)
        broker.close()
        forget_managers()


def check_two_beats(run: BeatRun, seconds: float) -> None:
    a, b = run.pids["a"], run.pids["b"]
    sends = [s for s in run.sends if s[0] >= run.started]
    times = [t for t, _, _ in sends]
    by_a = [t for t, pid, _ in sends if pid == a]
    by_b = [t for t, pid, _ in sends if pid == b]
    assert {pid for _, pid, _ in run.sends} <= {a, b}
    # Never twice for one tick: consecutive sends about a second apart, never close together.
    gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times)]
    assert min(gaps) > 0.8, gaps
    # Before the kill only a sent; after it only b, within the TTL plus a poll (and slack).
    assert all(t < run.killed for t in by_a)
    assert all(t > run.killed for t in by_b)
    assert by_b, run.logs["b"]
    failover = by_b[0] - run.killed
    assert failover <= BEAT_TTL + BEAT_POLL + 1.0 + 0.5, failover
    # About once per second, less the failover gap.
    expected = seconds - failover
    assert expected - 3 <= len(sends) <= seconds + 1, (len(sends), failover, gaps)
    assert "stepping down" not in run.logs["b"]


def test_two_beat_processes_send_once_per_tick_and_the_standby_takes_over(
    redis_urls: list[str], broker_server: RedisServer, tmp_path: Path
) -> None:
    """20 s with a 1 s task; the leader is SIGKILLed at 10 s."""
    seconds = 20.0
    run = run_two_beats(tmp_path, redis_urls[:3], broker_server, seconds)
    check_two_beats(run, seconds)


@pytest.mark.slow
def test_two_beat_processes_for_30_seconds(
    redis_urls: list[str], broker_server: RedisServer, tmp_path: Path
) -> None:
    """The issue's run: 30 s with a 1 s task; the leader is SIGKILLed at 15 s."""
    seconds = 30.0
    run = run_two_beats(tmp_path, redis_urls[:3], broker_server, seconds)
    check_two_beats(run, seconds)


def test_redlock_hold_runs_a_periodic_task_once_per_period_with_two_plain_beats(
    redis_urls: list[str],
) -> None:
    """Two plain (unelected) schedulers both send a periodic RedlockTask each period;
    with ``redlock_hold`` near the period its body runs once per period, not twice.
    Runs are eager here (in the scheduler's thread), which lock as a worker's do."""
    from celery_redlock.task import RedlockTask

    period = 0.5
    app = Celery(f"hold_{uuid.uuid4().hex[:8]}", broker="memory://", set_as_current=False)
    app.conf.update(
        redlock_servers=redis_urls[:3],
        task_always_eager=True,
        beat_schedule={"job": {"task": "hold.job", "schedule": period}},
    )
    runs: list[float] = []

    @app.task(base=RedlockTask, name="hold.job", redlock_key="", redlock_hold=period * 0.8)
    def job() -> None:
        runs.append(time.monotonic())

    a = Scheduler(app=app, lazy=False)
    b = Scheduler(app=app, lazy=False)
    sends = {"a": 0, "b": 0}
    for name, scheduler in (("a", a), ("b", b)):
        real = scheduler.apply_async

        def counted(entry: Any, *args: Any, _n: str = name, _real: Any = real, **kw: Any) -> Any:
            sends[_n] += 1
            return _real(entry, *args, **kw)

        scheduler.apply_async = counted  # type: ignore[method-assign]
    try:
        drive([a, b], 3.2)  # type: ignore[list-item]
    finally:
        forget_managers()
    assert sends["a"] >= 5
    assert sends["b"] >= 5  # both beats sent every period...
    assert 5 <= len(runs) <= sends["a"] + 1  # ...but the body ran about once per period
    gaps = [later - earlier for earlier, later in itertools.pairwise(runs)]
    assert min(gaps) > period * 0.7, gaps  # never twice in one period
