"""The app a real ``celery worker -P prefork`` subprocess runs in the tests.

``make_app(...)`` builds it (the tests build the same app to send tasks and
compute keys); the module-level ``app`` is built from the environment, which
the test that starts the worker sets:

- ``REDLOCK_TEST_BROKER``, ``REDLOCK_TEST_BACKEND``: broker and result backend URLs
- ``REDLOCK_TEST_SERVERS``: the lock nodes, comma-separated
- ``REDLOCK_TEST_QUEUE``: the queue this worker consumes (unique per run)
- ``REDLOCK_TEST_DIR``: where tasks leave their pid files and ledgers

Start: ``celery -A tests.integration.celery_apps.prefork_app worker -P prefork``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import Celery
from kombu import Queue

from celery_redlock.task import RedlockTask


def pid_file(directory: str, task_id: str) -> str:
    """Where a running task leaves its process id."""
    return os.path.join(directory, f"{task_id}.pid")


def ledger_file(directory: str, run_id: str) -> str:
    """Where the ledger tasks of one run append their intervals."""
    return os.path.join(directory, f"{run_id}.ledger")


def _announce(task: Any) -> bool:
    """Write this process's id to the task's pid file; True on the task's first run."""
    path = pid_file(task.app.conf.test_dir, task.request.id)
    first = not os.path.exists(path)
    with open(path + ".tmp", "w") as out:
        out.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    return first


def sleeper(self: Any, tag: str, seconds: float) -> int:
    """Sleeps under its lock (redlock_ttl 30 s): a release within seconds is not the TTL."""
    _announce(self)
    time.sleep(seconds)
    return os.getpid()


def limited(self: Any, tag: str) -> None:
    """Overruns its 1 s hard time limit, deaf to SIGTERM (as if stuck in C code), so
    the child cannot release its lock: only SIGKILL ends it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _announce(self)
    time.sleep(30)


def stubborn(self: Any, tag: str, seconds: float) -> int:
    """Survives SIGTERM (a handler of its own) and sleeps on; leaves ``<task id>.done``
    when its body ends."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        _announce(self)
        time.sleep(seconds)  # resumed after the handler (PEP 475)
    finally:
        signal.signal(signal.SIGTERM, previous)
    done = pid_file(self.app.conf.test_dir, self.request.id) + ".done"
    with open(done, "w") as out:
        out.write(str(time.monotonic()))
    return os.getpid()


def redelivered(self: Any, tag: str, seconds: float) -> int:
    """Killed on its first delivery by the test; the redelivery re-enters the lock."""
    first = _announce(self)
    time.sleep(seconds if first else 0)
    return os.getpid()


def ledger(self: Any, run_id: str, seconds: float) -> str:
    """Records its body's interval (one short O_APPEND write per run)."""
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    with open(ledger_file(self.app.conf.test_dir, run_id), "a") as out:
        out.write(f"{start:.6f} {end:.6f} {os.getpid()} {self.request.id}\n")
    return str(self.request.id)


TASKS: dict[str, tuple[Any, dict[str, Any]]] = {
    "sleeper": (sleeper, {}),
    "short_sleeper": (sleeper, {"redlock_ttl": 3.0}),
    "limited": (limited, {"time_limit": 1}),
    "stubborn": (stubborn, {}),
    "redelivered": (redelivered, {"acks_late": True, "reject_on_worker_lost": True}),
    "ledger": (ledger, {}),
    "ledger_wait": (ledger, {"redlock_on_duplicate": "wait", "redlock_wait": 120}),
}


def make_app(
    broker: str | None, backend: str | None, servers: list[str], queue: str, directory: str
) -> Celery:
    """The worker's app: one task per entry of :data:`TASKS`, named ``pf.<key>``."""
    app = Celery("prefork_app", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        redlock_servers=servers,
        redlock_retry_delay=0.02,
        task_default_queue=queue,
        task_queues=[Queue(queue, auto_delete=broker is not None and broker.startswith("amqp"))],
        broker_connection_retry_on_startup=True,
        result_expires=600,
        worker_hijack_root_logger=False,
        test_dir=directory,
    )
    for name, (func, options) in TASKS.items():
        app.task(base=RedlockTask, bind=True, name=f"pf.{name}", shared=False, **options)(func)
    return app


app = make_app(
    os.environ.get("REDLOCK_TEST_BROKER"),
    os.environ.get("REDLOCK_TEST_BACKEND"),
    [s for s in os.environ.get("REDLOCK_TEST_SERVERS", "").split(",") if s],
    os.environ.get("REDLOCK_TEST_QUEUE", "redlock-test"),
    os.environ.get("REDLOCK_TEST_DIR", "/tmp"),
)
