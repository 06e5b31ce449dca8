"""RedlockTask in real ``celery worker -P prefork`` subprocesses.

These are the paths only a prefork worker shows, where the child that took
the lock cannot release it and the main worker process must:
``revoke(terminate=True)``, a child SIGKILLed (WorkerLostError), a hard time
limit, and the whole worker SIGKILLed (the lock then expires within its TTL).
Plus 200 duplicates across 2 workers x 4 processes, checked with a ledger of
body intervals. Tasks: tests/integration/celery_apps/prefork_app.py.

Each worker is started with the venv's python in its own session, so the
fixtures end it, and every pool process it forked, by its process group.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import WorkerLostError

from celery_redlock import Redlock
from celery_redlock.keys import task_id_of
from tests.integration.celery_apps.helpers import overlaps, server_url, wait_for
from tests.integration.celery_apps.prefork_app import ledger_file, make_app, pid_file
from tests.servers import RedisServer
from tests.workers import CeleryWorker

APP_MODULE = "tests.integration.celery_apps.prefork_app"
RESULT_TIMEOUT = 60.0
#: A release within this many seconds cannot be the 30 s TTL running out.
RELEASED_WITHIN = 8.0


class Worker(CeleryWorker):
    """A worker of tests/integration/celery_apps/prefork_app.py."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        concurrency: int,
        directory: Path,
        pool: str = "prefork",
    ) -> None:
        super().__init__(APP_MODULE, name, env, directory, concurrency, pool)


class Setup:
    """A client app with the workers' tasks, and what the tests need around it."""

    def __init__(self, app: Celery, directory: Path, env: dict[str, str]) -> None:
        self.app = app
        self.dir = directory
        self.env = env
        self.tasks = app.tasks

    def task(self, name: str) -> Any:
        return self.app.tasks[f"pf.{name}"]

    def worker_pid_of(self, task_id: str, timeout: float = 15.0) -> int:
        path = Path(pid_file(str(self.dir), task_id))
        assert wait_for(path.exists, timeout), f"task {task_id} never started"
        return int(path.read_text())


def make_setup(tmp: Path, broker: str, backend: str, servers: list[str], queue: str) -> Setup:
    env = {
        "REDLOCK_TEST_BROKER": broker,
        "REDLOCK_TEST_BACKEND": backend,
        "REDLOCK_TEST_SERVERS": ",".join(servers),
        "REDLOCK_TEST_QUEUE": queue,
        "REDLOCK_TEST_DIR": str(tmp),
    }
    return Setup(make_app(broker, backend, servers, queue, str(tmp)), tmp, env)


@pytest.fixture(scope="module")
def redis_setup(
    broker_server: RedisServer, lock_servers: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Setup:
    return make_setup(
        tmp_path_factory.mktemp("prefork"),
        server_url(broker_server, 5),
        server_url(broker_server, 6),
        lock_servers,
        f"redlock-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="module")
def pair(redis_setup: Setup) -> Iterator[Setup]:
    """Two prefork workers of 4 processes each, on one Redis broker and queue."""
    workers = [Worker(f"w{i}", redis_setup.env, 4, redis_setup.dir) for i in (1, 2)]
    try:
        for worker in workers:
            worker.start()
        yield redis_setup
        gc.collect()  # results caught in tracebacks unsubscribe while the backend is up
    finally:
        for worker in workers:
            worker.kill()


@pytest.fixture(scope="module")
def rl(lock_servers: list[str]) -> Iterator[Redlock]:
    with Redlock(lock_servers) as manager:
        yield manager


def holder(rl: Redlock, task: Any, *args: Any) -> str | None:
    return task_id_of(rl.holder(task.redlock_key_for(args, {})))


# ---------------------------------------------------------------------------
# Released by the main worker process


def test_revoke_terminate_releases_the_lock_from_the_main_process(
    pair: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    sleeper = pair.task("sleeper")
    result = sleeper.delay("terminate", 60)
    pair.worker_pid_of(result.id)
    assert holder(rl, sleeper, "terminate", 60) == result.id
    began = time.monotonic()
    pair.app.control.revoke(result.id, terminate=True, signal="SIGKILL")
    assert wait_for(lambda: holder(rl, sleeper, "terminate", 60) is None, RELEASED_WITHIN)
    assert time.monotonic() - began < RELEASED_WITHIN  # not the 30 s TTL
    assert wait_for(lambda: result.state == "REVOKED", 10)


def test_a_child_that_survives_a_terminate_keeps_its_lock_until_its_run_ends(
    pair: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    """revoke(terminate=True) with SIGTERM, which the body survives: the main process
    does not free the lock while the child still runs the body; the run frees it."""
    stubborn = pair.task("stubborn")
    result = stubborn.delay("survivor", 4.0)
    child = pair.worker_pid_of(result.id)
    done = Path(pid_file(str(pair.dir), result.id) + ".done")
    assert holder(rl, stubborn, "survivor", 4.0) == result.id
    pair.app.control.revoke(result.id, terminate=True)  # SIGTERM
    assert wait_for(lambda: result.state == "REVOKED", 10)  # the worker has signalled it
    time.sleep(1.5)  # 3 x the main process's check interval
    assert not done.exists()  # the body still runs...
    assert _alive(child)
    assert holder(rl, stubborn, "survivor", 4.0) == result.id  # ...under its lock
    assert wait_for(done.exists, 10)
    assert wait_for(lambda: holder(rl, stubborn, "survivor", 4.0) is None, 5)
    # The pool would report the next task this child runs as terminated: replace it.
    os.kill(child, signal.SIGKILL)
    assert wait_for(lambda: not _alive(child), 10)


def test_a_sigkilled_child_gets_its_lock_released_by_the_main_process(
    pair: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    sleeper = pair.task("sleeper")
    result = sleeper.delay("child-lost", 60)
    child = pair.worker_pid_of(result.id)
    assert holder(rl, sleeper, "child-lost", 60) == result.id
    os.kill(child, signal.SIGKILL)
    assert wait_for(lambda: holder(rl, sleeper, "child-lost", 60) is None, RELEASED_WITHIN)
    with pytest.raises(WorkerLostError):
        result.get(timeout=RESULT_TIMEOUT)


def test_a_hard_time_limit_gets_the_lock_released_by_the_main_process(
    pair: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    limited = pair.task("limited")
    result = limited.delay("time-limit")
    child = pair.worker_pid_of(result.id)
    assert holder(rl, limited, "time-limit") == result.id
    assert wait_for(lambda: holder(rl, limited, "time-limit") is None, RELEASED_WITHIN)
    assert wait_for(lambda: result.state == "FAILURE", 10)
    assert "TimeLimitExceeded" in repr(result.result)
    assert wait_for(lambda: not _alive(child), 5)  # released after the child was killed


def test_a_redelivered_task_re_enters_its_lock_after_its_child_died(
    pair: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    """acks_late + reject_on_worker_lost: the lock is kept (no release), the
    redelivered message (same task id) re-enters it, then releases it."""
    task = pair.task("redelivered")
    result = task.delay("redelivered", 60)
    child = pair.worker_pid_of(result.id)
    os.kill(child, signal.SIGKILL)
    assert result.get(timeout=RESULT_TIMEOUT) != child
    assert holder(rl, task, "redelivered", 60) is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


# ---------------------------------------------------------------------------
# 200 duplicates across 2 workers x 4 processes


def _ledger(setup: Setup, run_id: str) -> list[tuple[float, float]]:
    path = Path(ledger_file(str(setup.dir), run_id))
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(float(row[0]), float(row[1])) for row in rows]


@pytest.mark.parametrize(("name", "seconds"), [("ledger", 0.02), ("ledger_wait", 0.01)])
def test_200_duplicates_never_overlap_and_leave_no_key(
    pair: Setup,
    rl: Redlock,
    redis_urls: list[str],
    redis_nodes: list[RedisServer],
    name: str,
    seconds: float,
) -> None:
    task = pair.task(name)
    run_id = uuid.uuid4().hex
    results = [task.delay(run_id, seconds) for _ in range(200)]
    values = [r.get(timeout=RESULT_TIMEOUT) for r in results]
    assert all(r.state == "SUCCESS" for r in results)  # every message ended, none hung
    intervals = _ledger(pair, run_id)
    assert overlaps(intervals) == []
    ran = [v for v in values if v is not None]
    assert len(intervals) == len(ran) >= 1
    if name == "ledger_wait":
        assert len(ran) == 200  # every duplicate waited its turn and ran
    else:
        assert len(ran) < 200  # duplicates were skipped
    assert [n.client().keys("redlock:*") for n in redis_nodes] == [[]] * len(redis_nodes)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("pool", "concurrency", "copies"), [("gevent", 20, 200), ("eventlet", 20, 200), ("solo", 1, 40)]
)
def test_on_green_and_solo_pools_duplicates_never_overlap_and_leave_no_key(
    redis_setup: Setup,
    rl: Redlock,
    redis_urls: list[str],
    redis_nodes: list[RedisServer],
    pool: str,
    concurrency: int,
    copies: int,
) -> None:
    """Two ``-P gevent`` (or eventlet) workers of 20 greenlets each, or two ``-P
    solo`` workers (the task runs in the worker's main process): the runs of one
    key never overlap, the waiting ones all run, no key is left held, and a run's
    lock is renewed past its TTL."""
    if pool != "solo" and importlib.util.find_spec(pool) is None:  # not imported here
        pytest.skip(f"{pool} is not installed")
    setup = own_queue(redis_setup)
    workers = [Worker(f"{pool}{i}", setup.env, concurrency, setup.dir, pool=pool) for i in (1, 2)]
    try:
        for worker in workers:
            worker.start()
        warm = setup.task("ledger")
        for result in [warm.delay(uuid.uuid4().hex, 0.0) for _ in range(40)]:
            result.get(timeout=RESULT_TIMEOUT)  # every greenlet's connections open
        keys = []
        for name in ("ledger", "ledger_wait"):
            task = setup.task(name)
            run_id = uuid.uuid4().hex
            keys.append(task.redlock_key_for((run_id, 0.01), {}).encode())
            results = [task.delay(run_id, 0.01) for _ in range(copies)]
            values = [r.get(timeout=RESULT_TIMEOUT) for r in results]
            assert all(r.state == "SUCCESS" for r in results)
            intervals = _ledger(setup, run_id)
            assert overlaps(intervals) == []
            ran = [v for v in values if v is not None]
            assert len(intervals) == len(ran) >= 1
            if name == "ledger_wait":
                assert len(ran) == copies  # every duplicate waited its turn and ran
            elif pool != "solo":  # (a solo worker runs one at a time: maybe no duplicate met)
                assert len(ran) < copies, (name, len(ran))
        # No key is left. A node that timed out (20 greenlets starting at once) is
        # skipped for a second; a release that missed it is sent again after that.
        for key in keys:
            deadline = time.monotonic() + 15.0  # (a re-send that fails backs off 1, 2, 4 s)
            while any(n.client().exists(key) for n in redis_nodes[:3]):
                assert time.monotonic() < deadline, [
                    n.client().exists(key) for n in redis_nodes[:3]
                ]
                time.sleep(0.05)
            assert rl.holder(key.decode()) is None
        # The renewer (a greenlet under gevent and eventlet) keeps a 3 s lock past its
        # TTL while the body sleeps (and so yields), and the run's end frees it.
        task = setup.task("short_sleeper")
        result = task.delay(pool, 4.5)
        setup.worker_pid_of(result.id)
        time.sleep(3.8)
        assert holder(rl, task, pool, 4.5) == result.id
        result.get(timeout=RESULT_TIMEOUT)
        assert holder(rl, task, pool, 4.5) is None
    finally:
        for worker in workers:
            worker.kill()


# ---------------------------------------------------------------------------
# The whole worker SIGKILLed


def own_queue(redis_setup: Setup) -> Setup:
    """The same broker, backend and lock nodes, and a queue of its own: for a worker
    a test stops, apart from the module's pair."""
    env = redis_setup.env
    return make_setup(
        redis_setup.dir,
        env["REDLOCK_TEST_BROKER"],
        env["REDLOCK_TEST_BACKEND"],
        env["REDLOCK_TEST_SERVERS"].split(","),
        f"redlock-test-{uuid.uuid4().hex[:8]}",
    )


def test_after_the_whole_worker_is_sigkilled_the_lock_is_gone_within_its_ttl(
    redis_setup: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    setup = own_queue(redis_setup)
    worker = Worker("doomed", setup.env, 2, setup.dir).start()
    try:
        task = setup.task("short_sleeper")  # redlock_ttl = 3 s, renewed every second
        result = task.delay("sigkill", 60)
        setup.worker_pid_of(result.id)
        time.sleep(4)  # past the TTL: held only because it is renewed
        assert holder(rl, task, "sigkill", 60) == result.id
        worker.kill()
        killed = time.monotonic()
        assert wait_for(lambda: holder(rl, task, "sigkill", 60) is None, 3.5, 0.05)
        assert time.monotonic() - killed <= 3.5
    finally:
        worker.kill()


def test_a_cold_shutdown_cancelling_the_running_task_releases_its_lock(
    redis_setup: Setup, rl: Redlock, redis_urls: list[str]
) -> None:
    """SIGQUIT: Celery cancels the running task (no task_revoked is sent; its child
    is sent SIGTERM): the run's lock is freed as the run ends, not by the 30 s TTL,
    and the worker exits."""
    setup = own_queue(redis_setup)
    worker = Worker("cold", setup.env, 2, setup.dir).start()
    try:
        sleeper = setup.task("sleeper")
        result = sleeper.delay("cold-shutdown", 60)
        setup.worker_pid_of(result.id)
        assert holder(rl, sleeper, "cold-shutdown", 60) == result.id
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGQUIT)
        began = time.monotonic()
        assert wait_for(lambda: holder(rl, sleeper, "cold-shutdown", 60) is None, RELEASED_WITHIN)
        assert time.monotonic() - began < RELEASED_WITHIN  # not the 30 s TTL
        assert wait_for(lambda: not worker.alive(), 20), worker.tail()
    finally:
        worker.kill()


# ---------------------------------------------------------------------------
# RabbitMQ as the broker


@pytest.mark.rabbitmq
def test_with_rabbitmq_duplicates_are_skipped_and_terminate_releases(
    rabbitmq_url: str,
    broker_server: RedisServer,
    lock_servers: list[str],
    redis_urls: list[str],
    rl: Redlock,
    tmp_path: Path,
) -> None:
    queue = f"redlock-test-amqp-{uuid.uuid4().hex[:8]}"
    setup = make_setup(tmp_path, rabbitmq_url, server_url(broker_server, 7), lock_servers, queue)
    worker = Worker("rabbit", setup.env, 2, setup.dir)
    try:
        worker.start()
        sleeper = setup.task("sleeper")
        first = sleeper.delay("rabbit", 60)
        setup.worker_pid_of(first.id)
        assert holder(rl, sleeper, "rabbit", 60) == first.id
        assert sleeper.delay("rabbit", 60).get(timeout=RESULT_TIMEOUT) is None
        setup.app.control.revoke(first.id, terminate=True, signal="SIGKILL")
        assert wait_for(lambda: holder(rl, sleeper, "rabbit", 60) is None, RELEASED_WITHIN)
    finally:
        worker.kill()
        with contextlib.suppress(Exception), setup.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
