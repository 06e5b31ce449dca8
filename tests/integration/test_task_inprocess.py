"""RedlockTask through a real in-process worker (celery.contrib.testing).

Broker and result backend: a redis-server of the tests' own (``broker_server``);
lock nodes: three of the session's redis-server nodes. The worker runs a
thread pool of 4, so duplicates really run side by side. Parent-side paths
(terminate, a lost child, hard time limits) need a prefork worker: see
test_task_prefork.py, which also runs a worker on RabbitMQ.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, chain, group
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore, Reject
from celery.signals import before_task_publish, task_retry

from celery_redlock import Redlock, _resend, signals
from celery_redlock.exceptions import DuplicateTask, LockNotAcquired, RedlockConfigError
from celery_redlock.keys import run_mark, run_token, task_id_of
from celery_redlock.signals import lock_acquired, lock_lost, lock_released, lock_skipped
from celery_redlock.task import RedlockTask
from tests.integration.celery_apps.helpers import overlaps, server_url, wait_for
from tests.servers import RedisServer

GATE_TIMEOUT = 15.0
RESULT_TIMEOUT = 15.0

#: tag -> set when the bodies waiting on it may return
GATES: defaultdict[str, threading.Event] = defaultdict(threading.Event)
#: tag -> task ids whose body started
STARTED: defaultdict[str, list[str]] = defaultdict(list)
#: tag -> (start, end) of each body, on the monotonic clock
INTERVALS: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)


def body(task: Any, tag: str, wait: bool = True) -> str:
    start = time.monotonic()
    STARTED[tag].append(task.request.id)
    if wait:
        GATES[tag].wait(GATE_TIMEOUT)
    INTERVALS[tag].append((start, time.monotonic()))
    return str(task.request.id)


def dead_url() -> str:
    """A Redis URL on a local port nobody listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def base_conf(broker: RedisServer, servers: list[str], name: str) -> dict[str, Any]:
    return {
        "broker_url": server_url(broker, 1),
        "result_backend": server_url(broker, 2),
        "redlock_servers": servers,
        "redlock_ttl": 5.0,
        "redlock_retry_delay": 0.05,
        "task_default_queue": f"{name}-{uuid.uuid4().hex[:8]}",
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "result_expires": 600,
    }


def define_tasks(app: Celery, dead: str) -> SimpleNamespace:
    t = SimpleNamespace()

    @app.task(base=RedlockTask, bind=True, name="ip.hold")
    def hold(self: Any, tag: str, flag: bool = False) -> str:
        return body(self, tag)

    @app.task(base=RedlockTask, bind=True, name="ip.long_ttl", redlock_ttl=30.0)
    def long_ttl(self: Any, tag: str) -> str:
        return body(self, tag, wait=False)

    @app.task(base=RedlockTask, bind=True, name="ip.raises", redlock_on_duplicate="raise")
    def raises(self: Any, tag: str) -> str:
        return body(self, tag)

    @app.task(
        base=RedlockTask,
        bind=True,
        name="ip.retries",
        redlock_on_duplicate="retry",
        redlock_ttl=0.6,
        max_retries=20,
    )
    def retries(self: Any, tag: str) -> str:
        return body(self, tag)

    @app.task(
        base=RedlockTask, bind=True, name="ip.waits", redlock_on_duplicate="wait", redlock_wait=10
    )
    def waits(self: Any, tag: str) -> str:
        return body(self, tag)

    @app.task(base=RedlockTask, bind=True, name="ip.fails")
    def fails(self: Any, tag: str) -> None:
        body(self, tag)
        raise ValueError(f"boom {tag}")

    @app.task(base=RedlockTask, bind=True, name="ip.ignores")
    def ignores(self: Any, tag: str) -> None:
        body(self, tag)
        raise Ignore()

    @app.task(base=RedlockTask, bind=True, name="ip.rejects")
    def rejects(self: Any, tag: str) -> None:
        body(self, tag)
        raise Reject("no thanks", requeue=False)

    @app.task(name="ip.plain")
    def plain(value: Any = None) -> str:
        return f"plain:{value}"

    @app.task(base=RedlockTask, bind=True, name="ip.replaces")
    def replaces(self: Any, tag: str) -> Any:
        body(self, tag)
        return self.replace(plain.s(tag))

    @app.task(base=RedlockTask, bind=True, name="ip.retry_once", redlock_ttl=0.5)
    def retry_once(self: Any, tag: str, countdown: float = 1.5) -> int:
        body(self, tag, wait=False)
        if self.request.retries == 0:
            raise self.retry(countdown=countdown)
        return int(self.request.retries)

    @app.task(base=RedlockTask, bind=True, name="ip.retry_now")
    def retry_now(self: Any, tag: str) -> int:
        body(self, tag, wait=False)
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    @app.task(base=RedlockTask, bind=True, name="ip.retry_elsewhere")
    def retry_elsewhere(self: Any, tag: str, n: int) -> int:
        body(self, tag, wait=False)
        if n == 0:
            raise self.retry(args=(tag, 1), countdown=1.0)
        return n

    @app.task(base=RedlockTask, bind=True, name="ip.hand_over", redlock_key=("tag",))
    def hand_over(self: Any, tag: str, step: int = 0) -> Any:
        body(self, tag, wait=step > 0)
        if step == 0:
            return self.replace(self.s(tag, 1))
        return step

    @app.task(
        base=RedlockTask,
        bind=True,
        name="ip.autoretry_once",
        redlock_ttl=0.5,
        autoretry_for=(KeyError,),
        retry_kwargs={"countdown": 1.5},
    )
    def autoretry_once(self: Any, tag: str) -> int:
        body(self, tag, wait=False)
        if self.request.retries == 0:
            raise KeyError(tag)
        return int(self.request.retries)

    @app.task(base=RedlockTask, bind=True, name="ip.held", redlock_hold=1.5)
    def held(self: Any, tag: str) -> str:
        return body(self, tag, wait=False)

    @app.task(base=RedlockTask, bind=True, name="ip.published", redlock_lock_on="publish")
    def published(self: Any, tag: str) -> str:
        return body(self, tag)

    @app.task(base=RedlockTask, bind=True, name="ip.chain_replace", redlock_key=("tag",))
    def chain_replace(self: Any, tag: str, step: int = 0) -> Any:
        body(self, tag, wait=False)
        if step == 0:  # the chain's first step: a new task id, the same key
            return self.replace(chain(self.si(tag, 1), self.si(tag, 2)))
        return step

    @app.task(
        base=RedlockTask,
        bind=True,
        name="ip.published_retry",
        redlock_lock_on="publish",
        redlock_ttl=0.5,
    )
    def published_retry(self: Any, tag: str) -> int:
        body(self, tag, wait=False)
        if self.request.retries == 0:
            raise self.retry(countdown=1.0)
        return int(self.request.retries)

    @app.task(base=RedlockTask, bind=True, name="ip.short_ttl", redlock_ttl=0.5)
    def short_ttl(self: Any, tag: str, seconds: float) -> bool:
        body(self, tag, wait=False)
        time.sleep(seconds)
        return bool(self.redlock_lost)

    @app.task(base=RedlockTask, bind=True, name="ip.until_lost", redlock_ttl=0.6)
    def until_lost(self: Any, tag: str) -> bool:
        body(self, tag, wait=False)
        deadline = time.monotonic() + 10
        while not self.redlock_lost and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(self.redlock_lost)

    common = {"redlock_servers": [dead], "redlock_node_timeout": 0.05, "redlock_retry_count": 1}

    @app.task(base=RedlockTask, bind=True, name="ip.unavailable_fail", **common)
    def unavailable_fail(self: Any, tag: str) -> str:
        return body(self, tag, wait=False)

    @app.task(
        base=RedlockTask,
        bind=True,
        name="ip.unavailable_run",
        redlock_on_unavailable="run",
        **common,
    )
    def unavailable_run(self: Any, tag: str) -> str:
        return body(self, tag, wait=False)

    @app.task(
        base=RedlockTask,
        bind=True,
        name="ip.unavailable_autoretry",
        autoretry_for=(LockNotAcquired,),
        max_retries=2,
        retry_kwargs={"countdown": 0.05},
        **common,
    )
    def unavailable_autoretry(self: Any, tag: str) -> str:
        return body(self, tag, wait=False)

    @app.task(name="ip.after")
    def after(value: Any) -> str:
        return f"after:{value}"

    class NoSuperCall(RedlockTask):  # type: ignore[misc]
        """Overrides __call__ without super(): only the task_postrun net releases."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.run(*args, **kwargs)

    @app.task(base=NoSuperCall, bind=True, name="ip.no_super_call")
    def no_super_call(self: Any, tag: str) -> str:
        return body(self, tag, wait=False)

    for name, value in list(locals().items()):
        if hasattr(value, "delay"):
            setattr(t, name, value)
    return t


@pytest.fixture(scope="module")
def dead() -> str:
    return dead_url()


@pytest.fixture(scope="module")
def app(broker_server: RedisServer, lock_servers: list[str], dead: str) -> Celery:
    app = Celery("inproc", set_as_current=False)
    app.conf.update(base_conf(broker_server, lock_servers, "inproc"))
    app.redlock_tasks = define_tasks(app, dead)
    return app


@pytest.fixture(scope="module")
def worker(app: Celery) -> Iterator[Any]:
    with start_worker(
        app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=30
    ) as running:
        yield running
        for gate in GATES.values():
            gate.set()
        gc.collect()  # results caught in tracebacks unsubscribe while the backend is up


@pytest.fixture
def t(app: Celery, worker: Any, redis_urls: list[str]) -> SimpleNamespace:
    """The tasks, with a running worker and clean lock nodes."""
    tasks: SimpleNamespace = app.redlock_tasks
    return tasks


@pytest.fixture(scope="module")
def rl(lock_servers: list[str]) -> Iterator[Redlock]:
    with Redlock(lock_servers) as manager:
        yield manager


@pytest.fixture
def tag() -> Iterator[str]:
    name = uuid.uuid4().hex
    yield name
    GATES[name].set()


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every plugin signal sent during the test: (signal name, arguments)."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def record(signal: Any, sender: Any = None, **kwargs: Any) -> None:
        seen.append((signal.name, kwargs))

    signals = (lock_acquired, lock_skipped, lock_released, lock_lost)
    for signal in signals:
        signal.connect(record, weak=False, dispatch_uid=f"test-{signal.name}")
    yield seen
    for signal in signals:
        signal.disconnect(record, dispatch_uid=f"test-{signal.name}")


def holder(rl: Redlock, task: Any, *args: Any, **kwargs: Any) -> str | None:
    return task_id_of(rl.holder(task.redlock_key_for(args, kwargs)))


def started(tag: str, count: int = 1, timeout: float = 10.0) -> None:
    assert wait_for(lambda: len(STARTED[tag]) >= count, timeout), (tag, STARTED[tag])


def released(events: list[tuple[str, dict[str, Any]]], task_id: str) -> list[str]:
    return [
        kw["reason"] for name, kw in events if name == "lock_released" and kw["task_id"] == task_id
    ]


# ---------------------------------------------------------------------------
# Holding and releasing


def test_the_body_runs_under_the_lock_and_it_is_free_once_get_returns(
    t: SimpleNamespace,
    rl: Redlock,
    tag: str,
    redis_nodes: list[RedisServer],
    events: list[tuple[str, dict[str, Any]]],
) -> None:
    result = t.hold.delay(tag)
    started(tag)
    assert holder(rl, t.hold, tag) == result.id
    GATES[tag].set()
    assert result.get(timeout=RESULT_TIMEOUT) == result.id
    # Released before the result was stored: no sleep, no polling.
    assert holder(rl, t.hold, tag) is None
    assert released(events, result.id) == ["success"]
    assert [node.client().keys("redlock:*") for node in redis_nodes] == [[]] * len(redis_nodes)


def test_a_failure_releases_the_lock_before_the_result_is_stored(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    GATES[tag].set()
    result = t.fails.delay(tag)
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=RESULT_TIMEOUT)
    assert holder(rl, t.fails, tag) is None
    assert released(events, result.id) == ["failure"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [("ignores", "ignored"), ("rejects", "rejected"), ("replaces", "replaced")],
)
def test_ignore_reject_and_replace_release_the_lock(
    t: SimpleNamespace,
    rl: Redlock,
    tag: str,
    events: list[tuple[str, dict[str, Any]]],
    name: str,
    reason: str,
) -> None:
    task = getattr(t, name)
    GATES[tag].set()
    result = task.delay(tag)
    started(tag)
    assert wait_for(lambda: released(events, result.id))
    assert released(events, result.id) == [reason]
    assert holder(rl, task, tag) is None
    if name == "replaces":
        assert result.get(timeout=RESULT_TIMEOUT) == f"plain:{tag}"


def test_a_task_overriding_call_without_super_is_released_by_task_postrun(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    result = t.no_super_call.delay(tag)
    assert result.get(timeout=RESULT_TIMEOUT) == result.id
    assert wait_for(lambda: released(events, result.id))
    assert released(events, result.id) == ["postrun:success"]
    assert holder(rl, t.no_super_call, tag) is None


def test_arguments_bound_to_the_signature_give_one_lock(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    first = t.hold.delay(tag)
    started(tag)
    duplicates = [t.hold.delay(tag, False), t.hold.delay(tag=tag), t.hold.apply_async((tag,))]
    assert [d.get(timeout=RESULT_TIMEOUT) for d in duplicates] == [None, None, None]
    other = t.hold.delay(tag, True)  # another flag: another key, runs at once
    started(tag, 2)
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert other.get(timeout=RESULT_TIMEOUT) == other.id
    assert sorted(STARTED[tag]) == sorted([first.id, other.id])


# ---------------------------------------------------------------------------
# Duplicates


def test_skip_ends_the_duplicate_as_success_none_at_once_and_says_who_holds_it(
    t: SimpleNamespace, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    first = t.hold.delay(tag)
    started(tag)
    duplicate = t.hold.delay(tag)
    began = time.monotonic()
    assert duplicate.get(timeout=RESULT_TIMEOUT) is None
    assert time.monotonic() - began < 5
    assert duplicate.state == "SUCCESS"
    skipped = [kw for name, kw in events if name == "lock_skipped"]
    assert len(skipped) == 1
    assert skipped[0]["holder"] == first.id
    assert skipped[0]["task_id"] == duplicate.id
    assert skipped[0]["when"] == "run"
    assert 0 < skipped[0]["ttl_left"] <= 5
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert STARTED[tag] == [first.id]


def test_a_skipped_duplicate_lets_its_chain_go_on(t: SimpleNamespace, tag: str) -> None:
    first = t.hold.delay(tag)
    started(tag)
    result = chain(t.hold.s(tag), t.after.s()).delay()
    assert result.get(timeout=RESULT_TIMEOUT) == "after:None"
    GATES[tag].set()
    first.get(timeout=RESULT_TIMEOUT)


def test_raise_fails_the_duplicate_with_duplicate_task(t: SimpleNamespace, tag: str) -> None:
    first = t.raises.delay(tag)
    started(tag)
    duplicate = t.raises.delay(tag)
    with pytest.raises(DuplicateTask) as caught:
        duplicate.get(timeout=RESULT_TIMEOUT)
    # Rebuilt from the JSON result: every field, and the message, survive.
    assert caught.value.holder == first.id
    assert caught.value.resource == t.raises.redlock_key_for((tag,), {})
    assert caught.value.task_name == "ip.raises"
    assert caught.value.ttl_left is not None
    assert 0 < caught.value.ttl_left <= 5
    assert str(caught.value).startswith("task ip.raises is already running or queued under lock")
    assert duplicate.state == "FAILURE"
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert STARTED[tag] == [first.id]


def test_retry_reruns_the_duplicate_after_the_holder_is_done(t: SimpleNamespace, tag: str) -> None:
    retried: list[str] = []

    def on_retry(request: Any = None, **_: Any) -> None:
        retried.append(request.id)

    task_retry.connect(on_retry, weak=False, dispatch_uid="test-retry-policy")
    try:
        first = t.retries.delay(tag)
        started(tag)
        duplicate = t.retries.delay(tag)
        assert wait_for(lambda: duplicate.id in retried)
        GATES[tag].set()
        assert first.get(timeout=RESULT_TIMEOUT) == first.id
        assert duplicate.get(timeout=RESULT_TIMEOUT) == duplicate.id
    finally:
        task_retry.disconnect(on_retry, dispatch_uid="test-retry-policy")
    assert STARTED[tag] == [first.id, duplicate.id]
    assert not overlaps(INTERVALS[tag])


def test_wait_blocks_the_duplicate_until_the_holder_is_done(t: SimpleNamespace, tag: str) -> None:
    first = t.waits.delay(tag)
    started(tag)
    duplicate = t.waits.delay(tag)
    time.sleep(0.5)
    assert STARTED[tag] == [first.id]  # still waiting for the lock
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert duplicate.get(timeout=RESULT_TIMEOUT) == duplicate.id
    assert STARTED[tag] == [first.id, duplicate.id]
    assert not overlaps(INTERVALS[tag])


# ---------------------------------------------------------------------------
# Retries keep the lock


@pytest.mark.parametrize("name", ["retry_once", "autoretry_once"])
def test_a_retry_keeps_the_lock_through_its_countdown_then_releases(
    t: SimpleNamespace, rl: Redlock, tag: str, name: str
) -> None:
    task = getattr(t, name)
    result = task.delay(tag)
    started(tag)
    time.sleep(0.9)  # past the 0.5 s TTL: only the retry's extension keeps the key
    assert holder(rl, task, tag) == result.id
    duplicate = task.delay(tag)
    assert duplicate.get(timeout=RESULT_TIMEOUT) is None  # skipped: the retry holds it
    assert result.get(timeout=RESULT_TIMEOUT) == 1  # the retried run re-entered
    assert holder(rl, task, tag) is None
    assert STARTED[tag] == [result.id, result.id]


def test_a_retry_hands_its_lock_over_when_sent_so_an_instant_retried_run_is_not_a_duplicate(
    t: SimpleNamespace, rl: Redlock, tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry message is sent before the Retry exception leaves the body: another
    worker thread may start the retried run at once. The lock is handed to the task
    id as the retry is sent, so that run takes it over (here the first run's exit is
    slowed down to make the race certain)."""
    cls = type(t.retry_now._get_current_object())
    slow_exit = threading.Event()
    keep = cls._redlock_keep_for_retry

    def slowly(self: Any, run: Any, retry: Any) -> None:
        slow_exit.wait(0.5)
        keep(self, run, retry)

    monkeypatch.setattr(cls, "_redlock_keep_for_retry", slowly)
    result = t.retry_now.delay(tag)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert STARTED[tag] == [result.id, result.id]
    assert holder(rl, t.retry_now, tag) is None


def test_a_second_delivery_of_a_running_message_waits_for_it_and_never_runs_beside_it(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    """A broker delivering a message again while its first delivery runs (same task
    id): the second must not re-enter the first one's lock. It is sent again for after
    the lock's time left, and runs only once the first is done."""
    first = t.hold.delay(tag)
    started(tag)
    token = rl.holder(t.hold.redlock_key_for((tag,), {}))
    assert token is not None
    assert token != first.id  # the run's own token, not the bare task id
    assert task_id_of(token) == first.id
    t.hold.apply_async((tag,), task_id=first.id)  # the same message again
    assert wait_for(
        lambda: any(n == "lock_skipped" and kw["task_id"] == first.id for n, kw in events)
    )
    skipped = [kw for n, kw in events if n == "lock_skipped"]
    assert skipped[0]["holder"] == first.id
    time.sleep(0.3)
    assert STARTED[tag] == [first.id]  # not beside the first
    assert rl.holder(t.hold.redlock_key_for((tag,), {})) == token
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    # The copy sent again runs later, after the first (at-least-once, never at once).
    started(tag, 2, timeout=15)
    assert STARTED[tag] == [first.id, first.id]
    assert not overlaps(INTERVALS[tag])
    assert wait_for(lambda: holder(rl, t.hold, tag) is None, 5)


def test_a_delivery_finding_a_dead_delivery_s_lock_is_not_lost(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    """The first delivery died with its lock still alive (a worker SIGKILLed, its
    message requeued at once): the new delivery is sent again for after the dead
    lock's time left, and then runs."""
    task_id = str(uuid.uuid4())
    key = t.held.redlock_key_for((tag,), {})
    rl.acquire(key, 1.5, f"{task_id}|0123456789ab")  # the dead delivery's lock
    result = t.held.apply_async((tag,), task_id=task_id)
    assert result.get(timeout=RESULT_TIMEOUT) == task_id
    assert STARTED[tag] == [task_id]


def test_a_run_s_token_carries_the_mark_of_the_process_running_it(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    first = t.hold.delay(tag)
    started(tag)
    token = rl.holder(t.hold.redlock_key_for((tag,), {}))
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert token is not None
    # This machine's host name and the pid of the process running the body (this one,
    # with the threads pool): what the main worker process knows of a child it loses.
    assert token.startswith(f"{first.id}|{run_mark(os.getpid(), socket.gethostname())}")
    assert not token.startswith(f"{first.id}|{run_mark(os.getpid() + 1)}")


def test_the_main_process_frees_the_run_of_its_own_child_and_no_other_delivery_s(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    """A lost or killed child's run is freed by its mark (host name and pid); the same
    message's run on another machine, with the same pid there, keeps its lock."""
    task = t.hold
    key = task.redlock_key_for((tag,), {})
    task_id = str(uuid.uuid4())
    elsewhere = run_token(task_id, run_mark(4242, "elsewhere"))
    rl.acquire(key, 30, elsewhere)

    def request(pid: int | None) -> SimpleNamespace:
        return SimpleNamespace(id=task_id, args=[tag], kwargs={}, worker_pid=pid)

    child = signals._child_of(request(4242))
    assert child == 4242
    assert not task._redlock_release_by_id(task_id, [tag], {}, "worker-lost", child=child)
    assert rl.holder(key) == elsewhere
    # Revoked or expired before it ran here: only what its task id itself holds.
    signals._on_task_revoked(sender=task, request=request(None))
    assert rl.holder(key) == elsewhere
    rl.release(key, elsewhere)

    mine = run_token(task_id, run_mark(4242))  # the run of this machine's child 4242
    rl.acquire(key, 30, mine)
    assert task._redlock_release_by_id(task_id, [tag], {}, "worker-lost", child=child)
    assert rl.holder(key) is None
    # A child lost before it took over its task id's hold (a publish lock): freed too.
    rl.acquire(key, 30, task_id)
    assert task._redlock_release_by_id(task_id, [tag], {}, "time-limit", child=child)
    assert rl.holder(key) is None
    assert released(events, task_id) == ["worker-lost", "time-limit"]

    rl.acquire(key, 30, task_id)  # a publish lock, or a hold kept for a retry
    signals._on_task_revoked(sender=task, request=request(None), expired=True)
    assert rl.holder(key) is None
    assert released(events, task_id) == ["worker-lost", "time-limit", "expired"]
    # Without a known child (the pid is not known yet): the task id and any run of it.
    assert signals._child_of(request(None)) is None
    rl.acquire(key, 30, elsewhere)
    assert task._redlock_release_by_id(task_id, [tag], {}, "worker-lost")
    assert rl.holder(key) is None


def test_a_retry_with_other_arguments_releases_the_old_key(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    result = t.retry_elsewhere.delay(tag, 0)
    assert wait_for(lambda: released(events, result.id))
    assert released(events, result.id) == ["retry-new-arguments"]
    assert holder(rl, t.retry_elsewhere, tag, 0) is None
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert released(events, result.id) == ["retry-new-arguments", "success"]


def test_a_replacement_with_the_same_key_takes_the_lock_over_without_a_release(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    result = t.hand_over.delay(tag)
    started(tag, 2)  # the replacement (same task id) is running
    assert STARTED[tag] == [result.id, result.id]
    assert holder(rl, t.hand_over, tag) == result.id
    assert released(events, result.id) == []  # handed over, never released in between
    assert t.hand_over.delay(tag).get(timeout=RESULT_TIMEOUT) is None  # still a duplicate
    GATES[tag].set()
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert released(events, result.id) == ["success"]
    assert holder(rl, t.hand_over, tag) is None


def test_a_replacing_chain_whose_first_step_has_the_same_key_finds_it_free(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    """The run ends its hold before the replacement is sent: the chain's first step
    (a new task id, the same key) is not taken for a duplicate of the run it
    replaces, however fast a worker picks it up."""
    at_send: list[str | None] = []

    def look(sender: Any = None, headers: Any = None, **_: Any) -> None:
        if sender == "ip.chain_replace" and (headers or {}).get("argsrepr", "").endswith("1)"):
            at_send.append(holder(rl, t.chain_replace, tag))

    before_task_publish.connect(look, weak=False, dispatch_uid="chain-replace")
    try:
        result = t.chain_replace.delay(tag)
        assert result.get(timeout=RESULT_TIMEOUT) == 2
    finally:
        before_task_publish.disconnect(look, dispatch_uid="chain-replace")
    assert at_send == [None]
    assert len(STARTED[tag]) == 3  # the run and both steps ran their bodies
    assert holder(rl, t.chain_replace, tag) is None


def test_publish_lock_sends_group_members_whose_key_is_held_and_the_group_ends(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    """Group members' ids are frozen before they are sent: a member whose key is
    held is sent anyway (its run meets the lock), so the group's get() returns."""
    first = t.published.delay(tag)
    started(tag)  # holds the key, its body waiting on the gate
    members = group(t.published.s(tag), t.published.s(tag)).apply_async()
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    values = members.get(timeout=RESULT_TIMEOUT)
    assert len(values) == 2
    assert all(v is None or v == r.id for v, r in zip(values, members.results))
    assert overlaps(INTERVALS[tag]) == []
    assert holder(rl, t.published, tag) is None


# ---------------------------------------------------------------------------
# redlock_hold, auto-extend, lost locks


def test_hold_keeps_the_key_after_a_quick_run_then_lets_it_expire(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    result = t.held.delay(tag)
    assert result.get(timeout=RESULT_TIMEOUT) == result.id
    info = rl.inspect(t.held.redlock_key_for((tag,), {}))
    assert task_id_of(info.holder) == result.id
    assert info.ttl_left is not None
    assert 0 < info.ttl_left <= 1.5
    assert t.held.delay(tag).get(timeout=RESULT_TIMEOUT) is None  # skipped within the hold
    assert wait_for(lambda: holder(rl, t.held, tag) is None, timeout=3)
    again = t.held.delay(tag)
    assert again.get(timeout=RESULT_TIMEOUT) == again.id
    assert STARTED[tag] == [result.id, again.id]


def test_auto_extend_keeps_the_lock_past_its_ttl_while_the_body_runs(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    result = t.short_ttl.delay(tag, 1.6)
    started(tag)
    time.sleep(1.1)  # more than twice the 0.5 s TTL
    assert holder(rl, t.short_ttl, tag, 1.6) == result.id
    assert result.get(timeout=RESULT_TIMEOUT) is False  # never lost
    assert holder(rl, t.short_ttl, tag, 1.6) is None


def test_a_lost_lock_sets_redlock_lost_and_sends_lock_lost(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    result = t.until_lost.delay(tag)
    started(tag)
    key = t.until_lost.redlock_key_for((tag,), {})
    assert wait_for(lambda: task_id_of(rl.holder(key)) == result.id)
    rl.force_release(key)
    assert result.get(timeout=RESULT_TIMEOUT) is True
    lost = [kw for name, kw in events if name == "lock_lost"]
    assert [kw["task_id"] for kw in lost] == [result.id]
    assert lost[0]["key"] == key


# ---------------------------------------------------------------------------
# redlock_lock_on="publish"


def test_publish_lock_returns_the_holders_result_to_a_duplicate_publisher(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    first = t.published.delay(tag)
    assert holder(rl, t.published, tag) == first.id  # held from the moment it was sent
    second = t.published.delay(tag)
    assert second.id == first.id
    assert [kw["when"] for name, kw in events if name == "lock_skipped"] == ["publish"]
    started(tag)
    GATES[tag].set()
    assert first.get(timeout=RESULT_TIMEOUT) == first.id
    assert holder(rl, t.published, tag) is None
    assert STARTED[tag] == [first.id]


def test_publish_lock_does_not_take_a_retry_for_a_duplicate(
    t: SimpleNamespace, rl: Redlock, tag: str
) -> None:
    result = t.published_retry.delay(tag)
    assert result.get(timeout=RESULT_TIMEOUT) == 1
    assert STARTED[tag] == [result.id, result.id]
    assert holder(rl, t.published_retry, tag) is None


def test_publish_lock_is_released_when_the_queued_task_is_revoked(
    app: Celery, t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    result = t.published.apply_async((tag,), countdown=0.8)
    assert holder(rl, t.published, tag) == result.id
    app.control.revoke(result.id)
    assert wait_for(lambda: released(events, result.id), timeout=10)
    assert released(events, result.id) == ["revoked"]
    assert holder(rl, t.published, tag) is None
    assert STARTED[tag] == []


def test_publish_lock_is_released_when_the_message_expires(
    t: SimpleNamespace, rl: Redlock, tag: str, events: list[tuple[str, dict[str, Any]]]
) -> None:
    result = t.published.apply_async((tag,), countdown=0.8, expires=0.3)
    assert holder(rl, t.published, tag) == result.id
    assert wait_for(lambda: released(events, result.id), timeout=10)
    assert released(events, result.id) == ["expired"]
    assert holder(rl, t.published, tag) is None
    assert STARTED[tag] == []


# ---------------------------------------------------------------------------
# Redis unavailable


def test_unavailable_fail_fails_the_run_with_lock_not_acquired(
    t: SimpleNamespace, tag: str
) -> None:
    result = t.unavailable_fail.delay(tag)
    with pytest.raises(LockNotAcquired) as caught:
        result.get(timeout=RESULT_TIMEOUT)
    assert caught.value.resource == t.unavailable_fail.redlock_key_for((tag,), {})
    assert str(caught.value).startswith(f"lock {caught.value.resource!r}")
    assert "127.0.0.1" in str(caught.value)  # the nodes are listed
    assert STARTED[tag] == []


def test_a_run_failing_on_a_stalled_majority_leaves_no_key_to_skip_the_next_call(
    t: SimpleNamespace, tag: str, redis_nodes: list[RedisServer]
) -> None:
    """Two of the three lock nodes stall past the node timeout while a run acquires:
    it fails (no quorum), and the SETs they apply when they resume are deleted by the
    undo sent again, so the next call of the same key runs instead of being skipped
    for the 30 s TTL with no run behind the key."""
    key = t.long_ttl.redlock_key_for((tag,), {}).encode()
    warm = t.long_ttl.delay(f"{tag}-warm-up")  # the worker's connections are open
    assert warm.get(timeout=RESULT_TIMEOUT) == warm.id
    freed = _resend.get_resender().freed  # (the worker runs in this process)
    down = redis_nodes[:2]
    for node in down:
        node.pause()
    try:
        first = t.long_ttl.delay(tag)
        with pytest.raises(LockNotAcquired):
            first.get(timeout=RESULT_TIMEOUT)
    finally:
        for node in down:
            node.resume()
    assert wait_for(
        lambda: not any(n.client().exists(key) for n in redis_nodes[:3]), timeout=10.0
    ), [n.client().exists(key) for n in redis_nodes[:3]]
    # Freed by the undo sent again, once they answered (so their cool-down is over):
    # the SETs had reached both stalled nodes.
    assert _resend.get_resender().freed - freed >= 2
    second = t.long_ttl.delay(tag)
    assert second.get(timeout=RESULT_TIMEOUT) == second.id  # ran: not skipped
    assert STARTED[tag] == [second.id]


def test_unavailable_run_runs_unlocked_and_warns(
    t: SimpleNamespace, tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_redlock.task"):
        result = t.unavailable_run.delay(tag)
        assert result.get(timeout=RESULT_TIMEOUT) == result.id
    assert any("WITHOUT its lock" in r.getMessage() for r in caplog.records)


def test_unavailable_with_autoretry_for_retries_then_fails(t: SimpleNamespace, tag: str) -> None:
    retried: list[str] = []

    def on_retry(request: Any = None, **_: Any) -> None:
        retried.append(request.id)

    task_retry.connect(on_retry, weak=False, dispatch_uid="test-unavailable-retry")
    try:
        result = t.unavailable_autoretry.delay(tag)
        with pytest.raises(LockNotAcquired):
            result.get(timeout=RESULT_TIMEOUT)
    finally:
        task_retry.disconnect(on_retry, dispatch_uid="test-unavailable-retry")
    assert retried == [result.id, result.id]  # max_retries=2
    assert STARTED[tag] == []


# ---------------------------------------------------------------------------
# Start-up checks


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("redlock_ttl", "soon", "redlock_ttl must be a number"),
        ("redlock_on_duplicate", "ignore", "redlock_on_duplicate must be one of"),
        ("redlock_tll", 5, "did you mean redlock_ttl"),
    ],
)
def test_a_bad_setting_stops_the_worker_at_start_up(
    broker_server: RedisServer, lock_servers: list[str], setting: str, value: Any, message: str
) -> None:
    app = Celery("badconf", set_as_current=False)
    app.conf.update(base_conf(broker_server, lock_servers, "badconf"))
    app.conf[setting] = value

    @app.task(base=RedlockTask, name="bad.task", shared=False)
    def task() -> None: ...

    with (
        pytest.raises(RedlockConfigError, match=message),
        start_worker(app, pool="solo", perform_ping_check=False),
    ):
        pass  # pragma: no cover - the worker must not start
