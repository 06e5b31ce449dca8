"""The renewer thread: renews at ttl/3, reports a lost lock once, rides out a
failed renewal that leaves time, stops on cancel, and restarts in a forked child."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from celery_redlock import renewal
from celery_redlock.exceptions import LockExtendError, NodeVote, Vote
from celery_redlock.redlock import Lock, Redlock
from celery_redlock.renewal import Renewer, Watch


class FakeManager:
    """Answers extend() from a script: True, or the votes of a LockExtendError."""

    def __init__(self, outcomes: list[Any] | None = None, nodes: int = 3) -> None:
        self.nodes = [f"n{i}" for i in range(nodes)]
        self.quorum = nodes // 2 + 1
        self.outcomes = list(outcomes or [])
        self.calls: list[float] = []
        self.called = threading.Event()

    def extend(self, lock: Lock, ttl: float, *, strict: bool = False) -> bool:
        self.calls.append(time.monotonic())
        self.called.set()
        outcome = self.outcomes.pop(0) if self.outcomes else True
        if outcome is True:
            lock.expires_at = time.monotonic() + ttl
            return True
        if isinstance(outcome, BaseException):
            raise outcome
        raise LockExtendError(lock.resource, [NodeVote(n, v) for n, v in zip(self.nodes, outcome)])


def held(manager: Any, ttl: float) -> Lock:
    return Lock("res", "token", ttl, time.monotonic() + ttl, None, manager)


@pytest.fixture
def renewer() -> Iterator[Renewer]:
    r = Renewer(name="test-renewer")
    yield r
    r.stop()


def lost_recorder() -> tuple[list[Watch], threading.Event, Any]:
    seen: list[Watch] = []
    event = threading.Event()

    def on_lost(watch: Watch) -> None:
        seen.append(watch)
        event.set()

    return seen, event, on_lost


def test_a_watched_lock_is_extended_about_every_third_of_its_ttl(renewer: Renewer) -> None:
    manager = FakeManager()
    watch = renewer.watch(held(manager, 0.3), 0.3)
    time.sleep(0.65)
    watch.cancel()
    assert 5 <= len(manager.calls) <= 7  # at ~0.1, 0.2, 0.3, ... 0.6
    gaps = [b - a for a, b in zip(manager.calls, manager.calls[1:])]
    assert all(0.07 < gap < 0.2 for gap in gaps), gaps
    assert watch.renewals == len(manager.calls)


def test_cancel_stops_renewing(renewer: Renewer) -> None:
    manager = FakeManager()
    watch = renewer.watch(held(manager, 0.15), 0.15)
    assert manager.called.wait(2)
    watch.cancel()
    count = len(manager.calls)
    time.sleep(0.25)
    assert len(manager.calls) <= count + 1  # one renewal may have been in flight
    assert len(renewer) == 0


def test_a_lock_taken_over_on_a_majority_is_reported_lost_at_once_and_once(
    renewer: Renewer,
) -> None:
    manager = FakeManager([[Vote.HELD, Vote.HELD, Vote.YES]])
    seen, event, on_lost = lost_recorder()
    lock = held(manager, 3.0)
    watch = renewer.watch(lock, 3.0, on_lost, interval=0.02)
    assert event.wait(2)
    time.sleep(0.1)
    assert seen == [watch]
    assert watch.lost
    assert len(manager.calls) == 1  # not renewed after being lost
    assert lock.remaining is not None
    assert lock.remaining > 2


def test_a_failed_renewal_with_time_left_is_retried_not_reported(renewer: Renewer) -> None:
    manager = FakeManager([[Vote.TIMEOUT, Vote.ERROR, Vote.YES], RuntimeError("reset")])
    seen, _, on_lost = lost_recorder()
    watch = renewer.watch(held(manager, 1.0), 1.0, on_lost, interval=0.05)
    assert wait_until(lambda: watch.renewals >= 1, 3)
    assert seen == []
    assert len(manager.calls) >= 3
    watch.cancel()


def test_failures_until_the_validity_runs_out_report_the_lock_lost(renewer: Renewer) -> None:
    failing = [[Vote.TIMEOUT, Vote.TIMEOUT, Vote.YES]] * 100
    manager = FakeManager(failing)
    seen, event, on_lost = lost_recorder()
    lock = held(manager, 0.3)
    started = time.monotonic()
    renewer.watch(lock, 0.3, on_lost)
    assert event.wait(3)
    assert 0.25 <= time.monotonic() - started < 1.0  # about when the validity ran out
    assert len(seen) == 1


def test_a_lock_expired_before_the_extend_is_lost(renewer: Renewer) -> None:
    manager = FakeManager([LockExtendError("res", message="expired before extend")])
    seen, event, on_lost = lost_recorder()
    renewer.watch(held(manager, 1.0), 1.0, on_lost, interval=0.02)
    assert event.wait(2)
    assert len(seen) == 1


def test_cancel_waits_for_a_renewal_in_flight_and_none_runs_after(renewer: Renewer) -> None:
    in_flight, gate = threading.Event(), threading.Event()

    class SlowManager(FakeManager):
        def extend(self, lock: Lock, ttl: float, *, strict: bool = False) -> bool:
            in_flight.set()
            gate.wait(2)
            self.calls.append(time.monotonic())
            lock.expires_at = time.monotonic() + ttl
            return True

    manager = SlowManager()
    watch = renewer.watch(held(manager, 1.0), 1.0, interval=0.01)
    assert in_flight.wait(2)
    threading.Timer(0.1, gate.set).start()
    began = time.monotonic()
    watch.cancel()  # returns only once the renewal in flight has answered
    assert time.monotonic() - began >= 0.08
    assert len(manager.calls) == 1
    time.sleep(0.05)
    assert len(manager.calls) == 1  # and none after: a TTL set now stays


def test_a_watch_cancelled_before_its_renewal_is_never_renewed_nor_lost(
    renewer: Renewer,
) -> None:
    manager = FakeManager([[Vote.HELD] * 3])
    seen, _, on_lost = lost_recorder()
    watch = renewer.watch(held(manager, 1.0), 1.0, on_lost, interval=0.05)
    watch.cancel()
    time.sleep(0.15)
    assert manager.calls == []
    assert seen == []
    assert not watch.lost


def test_a_raising_callback_does_not_kill_the_thread(renewer: Renewer) -> None:
    def bad(watch: Watch) -> None:
        raise ValueError("callback bug")

    renewer.watch(held(FakeManager([[Vote.HELD] * 3]), 1.0), 1.0, bad, interval=0.01)
    manager = FakeManager()
    renewer.watch(held(manager, 0.1), 0.1)
    assert manager.called.wait(2)


def test_one_thread_serves_many_watches_and_cancelled_ones_are_compacted(
    renewer: Renewer,
) -> None:
    manager = FakeManager()
    before = threading.active_count()
    watches = [renewer.watch(held(manager, 60), 60) for _ in range(1000)]
    assert threading.active_count() <= before + 1
    for watch in watches:
        watch.cancel()
    for _ in range(100):
        renewer.watch(held(manager, 60), 60)
    assert len(renewer._queue) <= 100  # the 1000 cancelled watches were dropped
    assert len(renewer) == 100


def test_a_real_lock_outlives_its_ttl_while_watched(renewer: Renewer) -> None:
    servers = [fakeredis.FakeRedis(server=fakeredis.FakeServer()) for _ in range(3)]
    with Redlock(servers, version_check=False) as manager:
        lock = manager.acquire("real", 0.3)
        watch = renewer.watch(lock, 0.3)
        time.sleep(0.8)
        assert manager.holder("real") == lock.value
        watch.cancel()
        assert manager.release(lock)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_renewer_thread() -> None:
    parent = renewal.get_renewer()
    manager = FakeManager()
    parent_watch = parent.watch(held(manager, 60), 60)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child_manager = FakeManager()
            child = renewal.get_renewer()
            ok = child is parent and len(child) == 0  # the parent's watches are not ours
            renewal.watch(held(child_manager, 0.06), 0.06)
            ok = ok and child_manager.called.wait(2)
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok"
    os.close(read)
    assert len(parent) >= 1
    parent_watch.cancel()


def test_the_renewal_module_imports_no_celery() -> None:
    program = (
        "import sys; sys.modules['celery'] = None; import celery_redlock.renewal; "
        "assert not [m for m in sys.modules if m.startswith(('celery.', 'kombu'))]"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", program], cwd=root, check=True)


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_a_lost_lock_is_told_before_a_cancel_in_flight_returns(renewer: Renewer) -> None:
    """The renewal finds the lock lost while the run ends (cancel() waiting for it):
    the run is told before cancel() returns, never after (a finished run would get
    an ERROR and a lock_lost for a lock it no longer needs)."""
    in_flight, gate = threading.Event(), threading.Event()
    told: list[float] = []

    class LosingManager(FakeManager):
        def extend(self, lock: Lock, ttl: float, *, strict: bool = False) -> bool:
            in_flight.set()
            gate.wait(2)
            raise LockExtendError(lock.resource, [NodeVote(n, Vote.HELD) for n in self.nodes])

    def on_lost(watch: Watch) -> None:
        time.sleep(0.1)
        told.append(time.monotonic())

    watch = renewer.watch(held(LosingManager(), 1.0), 1.0, on_lost, interval=0.01)
    assert in_flight.wait(2)
    threading.Timer(0.05, gate.set).start()
    watch.cancel()
    returned = time.monotonic()
    time.sleep(0.2)
    assert len(told) == 1
    assert told[0] <= returned


def test_a_watch_whose_renewal_fails_unexpectedly_is_reported_lost(renewer: Renewer) -> None:
    """A bug raising in the renewal takes the watch off the queue: it is no longer
    renewed, so its holder is told the lock is lost instead of never hearing."""

    class BrokenLock(Lock):
        @property
        def remaining(self) -> float | None:
            raise RuntimeError("bug")

    seen, event, on_lost = lost_recorder()
    manager = FakeManager([[Vote.ERROR] * 3])
    lock = BrokenLock("res", "token", 1.0, time.monotonic() + 1.0, None, manager)
    watch = renewer.watch(lock, 1.0, on_lost, interval=0.01)
    assert event.wait(2)
    assert seen == [watch]
    assert watch.lost


def test_a_watch_after_a_stop_that_did_not_wait_out_the_thread_is_renewed() -> None:
    """stop() gave up waiting for a thread stuck in a renewal: a watch made after is
    renewed by a new thread, and the old one ends once its renewal returns."""
    gate = threading.Event()
    in_flight = threading.Event()

    class StuckManager(FakeManager):
        def extend(self, lock: Lock, ttl: float, *, strict: bool = False) -> bool:
            in_flight.set()
            gate.wait(5)
            return super().extend(lock, ttl, strict=strict)

    renewer = Renewer(name="test-renewer-stuck")
    try:
        renewer.watch(held(StuckManager(), 1.0), 1.0, interval=0.01)
        assert in_flight.wait(2)
        old = renewer._thread
        renewer.stop(timeout=0.05)  # gives up: the thread is in the renewal
        assert old is not None
        assert old.is_alive()
        manager = FakeManager()
        renewer.watch(held(manager, 0.3), 0.3, interval=0.02)
        assert manager.called.wait(2)  # renewed while the old thread is still stuck
        gate.set()
        old.join(2)
        assert not old.is_alive()
    finally:
        gate.set()
        renewer.stop()


def test_short_runs_watched_and_cancelled_cost_the_thread_no_wake_up_each(
    renewer: Renewer,
) -> None:
    """A stream of short runs (watch, then cancel) wakes the thread about once per
    interval, not once per run nor per cancelled watch, and a live watch among
    them is still renewed on time."""
    manager = FakeManager()
    interval = 0.1
    runs = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.6:
        renewer.watch(held(manager, 1.0), 1.0, interval=interval).cancel()
        runs += 1
        time.sleep(0.002)
    assert runs > 100
    assert manager.calls == []  # every watch was cancelled before it was due
    assert renewer.wakeups <= 0.6 / interval + 3, renewer.wakeups
    live = renewer.watch(held(manager, 1.0), 1.0, interval=interval)
    assert manager.called.wait(2 * interval + 0.5)
    assert manager.calls[0] - started >= 0.6 + interval - 0.02
    live.cancel()


@pytest.mark.parametrize(("ttl", "interval"), [(float("inf"), None), (30.0, 1e12), (-1.0, None)])
def test_a_watch_the_thread_could_not_wait_for_is_refused(
    renewer: Renewer, ttl: float, interval: float | None
) -> None:
    """An infinite TTL or an interval beyond any lock's would overflow the thread's
    wait and end the thread, leaving every other watch unrenewed: refused."""
    with pytest.raises(ValueError, match="must be in"):
        renewer.watch(held(FakeManager(), 30.0), ttl, interval=interval)


def test_a_renewal_in_flight_at_stop_does_not_bring_its_watch_back(renewer: Renewer) -> None:
    """stop() drops every watch: one whose renewal was in flight is not queued again
    when that renewal ends, and a later watch() does not renew it."""
    release = threading.Event()

    class SlowManager(FakeManager):
        def extend(self, lock: Lock, ttl: float, *, strict: bool = False) -> bool:
            if not self.calls:
                self.calls.append(time.monotonic())
                self.called.set()
                release.wait(5)
                lock.expires_at = time.monotonic() + ttl
                return True
            return super().extend(lock, ttl, strict=strict)

    slow = SlowManager()
    renewer.watch(held(slow, 0.3), 0.3)
    assert slow.called.wait(2)  # its first renewal is in flight
    stopper = threading.Thread(target=renewer.stop, kwargs={"timeout": 5})
    stopper.start()
    time.sleep(0.1)
    release.set()
    stopper.join()
    other = FakeManager()
    renewer.watch(held(other, 0.3), 0.3)  # starts a new thread
    time.sleep(0.6)
    assert other.calls  # the new watch is renewed
    assert len(slow.calls) == 1  # the dropped one is not
