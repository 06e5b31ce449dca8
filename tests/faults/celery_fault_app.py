"""The app the real ``celery worker -P prefork`` subprocesses of the Celery fault
scenarios run (tests/faults/test_celery_faults.py).

``make_app(...)`` builds it (the test process builds the same app to publish
tasks and compute keys); the module-level ``app`` is built from the
environment the test sets when it starts a worker:

- ``REDLOCK_FAULTS_BROKER``, ``REDLOCK_FAULTS_BACKEND``: broker and result backend URLs
- ``REDLOCK_FAULTS_SERVERS``: the lock nodes, comma-separated
- ``REDLOCK_FAULTS_QUEUE``: the queue the worker consumes (unique per scenario)
- ``REDLOCK_FAULTS_VISIBILITY``: the Redis transport's ``visibility_timeout``
  (seconds after which an unacknowledged message is delivered again)
- ``REDLOCK_FAULTS_LEDGER`` (:data:`~tests.faults.harness.LEDGER_ENV`): where
  every body appends its interval (:class:`~tests.faults.harness.Hold`)
- ``REDLOCK_FAULTS_BAD_TASK=1``: also register a task with a bad
  ``redlock_ttl``, so the worker must refuse to start

Every task runs :func:`body` under its lock, keyed on the ``key`` argument
alone (``redlock_key=("key",)``) except ``cf.whole`` (all its arguments). A
body writes a start mark (``pid<N>.starts``: start, task id, pid, key) when
it begins, and its hold (start, end, task id@pid, ``task name|key``) to the
harness ledger when it ends, normally or by an exception; a body SIGKILLed in
between leaves only its start mark, and the test closes it at the moment it
killed the process (or saw it dead).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from celery_redlock.task import RedlockTask
from tests.faults.harness import LEDGER_ENV, Hold, LedgerWriter

#: Most seconds a duplicate waits for the lock (policy "wait").
WAIT = 120.0
#: The hard time limit of ``cf.limited``.
TIME_LIMIT = 1.0
#: The TTL of ``cf.short`` (the whole-worker SIGKILL scenario).
SHORT_TTL = 3.0
#: The TTL of ``cf.late10`` (a stall of the whole TTL is told from a prompt release).
LATE10_TTL = 10.0
#: The TTL of every other task (the default): a release within seconds is not the TTL.
TTL = 30.0

_WAIT = {"redlock_key": ("key",), "redlock_on_duplicate": "wait", "redlock_wait": WAIT}
_LATE = {"acks_late": True, "reject_on_worker_lost": True}

#: Task short name -> task options. All are bound RedlockTasks named ``cf.<name>``.
TASKS: dict[str, dict[str, Any]] = {
    "wait": {**_WAIT},
    "late": {**_WAIT, **_LATE},
    "short": {**_WAIT, **_LATE, "redlock_ttl": SHORT_TTL},
    "late10": {**_WAIT, **_LATE, "redlock_ttl": LATE10_TTL},
    "limited": {**_WAIT, "time_limit": TIME_LIMIT},
    "whole": {**_WAIT, "redlock_key": None},
}


@dataclass(frozen=True)
class Start:
    """A body's start mark."""

    start: float
    task_id: str
    pid: int
    resource: str  #: ``task name|key argument``: one per lock

    @property
    def client(self) -> str:
        """The id its hold has in the ledger: ``task id@pid`` (a redelivery runs elsewhere)."""
        return f"{self.task_id}@{self.pid}"


def read_starts(directory: str | Path) -> list[Start]:
    """Every start mark in ``directory`` (a torn last line is skipped)."""
    starts: list[Start] = []
    for path in sorted(Path(directory).glob("*.starts")):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                start, task_id, pid, resource = line.rstrip("\n").split("\t")
                starts.append(Start(float(start), task_id, int(pid), resource))
    return starts


class _Marks:
    """This process's ledger and start-mark file (opened after the fork, once)."""

    def __init__(self) -> None:
        self.pid = -1
        self.ledger: LedgerWriter | None = None
        self.starts_fd = -1

    def _open(self) -> None:
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.ledger = LedgerWriter.from_env()
        directory = os.environ.get(LEDGER_ENV)
        if directory:
            path = os.path.join(directory, f"pid{self.pid}.starts")
            self.starts_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def started(self, mark: Start) -> None:
        self._open()
        if self.starts_fd >= 0:
            line = f"{mark.start:.6f}\t{mark.task_id}\t{mark.pid}\t{mark.resource}\n"
            os.write(self.starts_fd, line.encode())

    def ended(self, mark: Start, end: float, ttl: float) -> None:
        self._open()
        if self.ledger is not None:
            # The lock is renewed while the body runs: its validity has no fixed
            # deadline, so the checker holds every body to its whole interval.
            hold = Hold(mark.start, end, float("inf"), ttl, None, mark.client, mark.resource)
            self.ledger.write(hold)


_marks = _Marks()


def body(self: Any, key: str, seconds: float, deaf: bool = False, payload: Any = None) -> int:
    """Hold ``key``'s lock ``seconds`` (deaf to SIGTERM when ``deaf``); return the pid.

    ``payload`` is carried and ignored (big or odd arguments); it is part of
    the key only for ``cf.whole``.
    """
    if deaf:  # as if stuck in C code: only SIGKILL ends it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        # The ledger's resource is the lock's: the task name and the key argument
        # (cf.whole also hashes its payload: the test gives each payload its own key).
        resource = f"{self.name}|{key}"
        mark = Start(time.monotonic(), str(self.request.id), os.getpid(), resource)
        _marks.started(mark)
        try:
            time.sleep(seconds)
        finally:
            # Also when an exception ends the body (a pool child's SIGTERM handler
            # raises): the lock is released after this, by RedlockTask.__call__.
            _marks.ended(mark, time.monotonic(), self.redlock_settings.ttl)
    finally:
        if deaf:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    return os.getpid()


def make_app(
    broker: str | None,
    backend: str | None,
    servers: list[str],
    queue: str,
    visibility_timeout: float | None = None,
    bad_task: bool = False,
) -> Celery:
    """The workers' app: one task per entry of :data:`TASKS`, named ``cf.<name>``."""
    app = Celery("celery_fault_app", set_as_current=False)
    transport: dict[str, Any] = {}
    if visibility_timeout is not None:
        # Restore unacknowledged messages of a dead worker soon, and look often.
        transport = {
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # a worker SIGKILLed inside a restore must not block the others' for 5 min
            "unacked_mutex_expire": 5,
        }
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        broker_transport_options=transport,
        redlock_servers=servers,
        redlock_retry_delay=0.02,
        task_default_queue=queue,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        # Enough for a broker restart; an orphaned worker (its test process killed)
        # gives up within minutes once the broker is gone.
        broker_connection_max_retries=20,
        result_expires=600,
        worker_hijack_root_logger=False,
    )
    for name, options in TASKS.items():
        app.task(base=RedlockTask, bind=True, name=f"cf.{name}", shared=False, **options)(body)
    if bad_task:
        app.task(base=RedlockTask, bind=True, name="cf.bad", shared=False, redlock_ttl="x")(body)
    return app


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


app = make_app(
    os.environ.get("REDLOCK_FAULTS_BROKER"),
    os.environ.get("REDLOCK_FAULTS_BACKEND"),
    [s for s in os.environ.get("REDLOCK_FAULTS_SERVERS", "").split(",") if s],
    os.environ.get("REDLOCK_FAULTS_QUEUE", "redlock-faults"),
    _env_float("REDLOCK_FAULTS_VISIBILITY"),
    os.environ.get("REDLOCK_FAULTS_BAD_TASK") == "1",
)
