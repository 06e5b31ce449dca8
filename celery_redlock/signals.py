"""The plugin's own signals, and its handlers on Celery's.

Signals sent by :class:`~celery_redlock.task.RedlockTask`, each with the task
as sender and ``task_id`` and ``key`` (the Redis key of the lock) among the
arguments::

    from celery_redlock.signals import lock_lost

    @lock_lost.connect
    def page_someone(sender, task_id, key, held_for, **kwargs): ...

- :data:`lock_acquired` (``ttl``, ``validity``, ``waited``): a run (or, with
  ``redlock_lock_on="publish"``, ``apply_async``) took the lock.
- :data:`lock_skipped` (``holder``, ``ttl_left``, ``when``): a duplicate was
  not run (``when="run"``) or not sent (``when="publish"``) because
  ``holder`` holds the lock.
- :data:`lock_released` (``reason``, ``held_for``, ``hold_left``): the lock
  was released, or left to expire after ``hold_left`` seconds
  (``redlock_hold``). ``reason`` is the way the run ended: ``"success"``,
  ``"failure"``, ``"ignored"``, ``"rejected"``, ``"replaced"``, or, from the
  main worker process, ``"terminated"``, ``"cancelled"`` (a running task
  cancelled at a cold shutdown), ``"revoked"``, ``"expired"``,
  ``"worker-lost"``, ``"time-limit"``; ``"retry-new-arguments"`` when a
  retry changes the key; ``"retry"`` for an eager retry (run at once, it takes
  the key again); ``"postrun:<state>"`` when only the ``task_postrun``
  safety net released it (a subclass whose ``__call__`` skips ``super()``).
  ``held_for`` is None when released by the main worker process (which did
  not take the lock).
- :data:`lock_lost` (``held_for``): the renewer could not keep the lock; the
  body may be running without it. ``task.redlock_lost`` is then true. Sent
  from the process's renewer thread, before the run's end can go on: keep a
  receiver quick, and never have it wait for the task's own thread.

Handlers connected on Celery's signals (each with a ``dispatch_uid``):

A run's token starts with a mark of the process running it (its machine's
host name and pid, :func:`~celery_redlock.keys.run_mark`), so the main
worker process frees the run of the child it killed or lost, and not a run
of another delivery of the same message elsewhere.

- :class:`RedlockRequest` (the worker's request class of a ``RedlockTask``,
  main worker process): release the lock of the run whose child process died
  (``WorkerLostError``: at once, before Celery fails, requeues or retries the
  message) or hit its hard time limit (once that child is gone: Celery
  reports it before the kill).
- ``task_revoked`` (main worker process): after a terminate, release the lock
  of the run of the child that was signalled, once that child is gone. A
  child that survives the signal (a handler of its own, stuck in C code)
  still runs the body: its lock stays, renewed, and its run releases it as
  any run does. A task revoked or expired before it ran: release what its
  task id itself holds (a publish lock, or a hold kept for its retry), not a
  run of another delivery of the same message.
- ``task_failure`` (main worker process): as :class:`RedlockRequest`, for a
  task whose request class is not one (by task id: any run of the task).
- ``task_postrun`` (the process that ran the task): a safety net; the run
  normally releases before its result is stored.
- ``worker_init``: add a worker bootstep that validates the ``redlock_*``
  settings, so a bad one stops the worker at start-up (an exception raised by
  a signal receiver would only be logged).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import bootsteps
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.signals import task_failure, task_postrun, task_revoked, worker_init
from celery.utils.dispatch import Signal
from celery.worker.request import Request
from kombu.utils.imports import symbol_by_name

__all__ = [
    "RedlockRequest",
    "RedlockWorkerStep",
    "connect_handlers",
    "lock_acquired",
    "lock_lost",
    "lock_released",
    "lock_skipped",
]

_log = logging.getLogger(__name__)

#: A run (or ``apply_async`` with ``redlock_lock_on="publish"``) took the lock.
lock_acquired = Signal(
    name="lock_acquired",
    providing_args={"task_id", "key", "ttl", "validity", "waited"},
)
#: A duplicate was skipped: not run, or (at publish) not sent.
lock_skipped = Signal(
    name="lock_skipped",
    providing_args={"task_id", "key", "holder", "ttl_left", "when"},
)
#: The lock was released (or, with ``redlock_hold``, left to expire).
lock_released = Signal(
    name="lock_released",
    providing_args={"task_id", "key", "reason", "held_for", "hold_left"},
)
#: The lock was lost while the task ran.
lock_lost = Signal(
    name="lock_lost",
    providing_args={"task_id", "key", "held_for"},
)

#: Seconds between the main worker process's checks that a child it signalled
#: (``revoke(terminate=True)``, hard time limit) is gone, before it releases
#: that child's lock: Celery reports both as soon as the signal is sent (for a
#: time limit, even before), and the child must be gone before another run may
#: take the lock. (Without a known child: the one wait before the release.)
SIGNALLED_RELEASE_DELAY = 0.5
#: Seconds the main worker process watches for a signalled child to go: one
#: still alive after this survived the signal and still runs (or has ended)
#: the run, which releases its own lock.
SIGNALLED_CHILD_WATCH = 60.0


def _is_redlock_task(task: object) -> bool:
    return bool(getattr(task, "__redlock_task__", False))


def _child_of(request: Any) -> int | None:
    """The pid of the pool child running ``request``, when known."""
    pid = getattr(request, "worker_pid", None)
    return pid if type(pid) is int and pid > 0 else None


def _has_redlock_request(task: Any) -> bool:
    """True when the worker builds ``task``'s requests from :class:`RedlockRequest`."""
    try:
        cls = symbol_by_name(getattr(task, "Request", None) or Request)  # type: ignore[no-untyped-call]
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, RedlockRequest)


def _on_task_revoked(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    **_: Any,
) -> None:
    if not _is_redlock_task(sender) or request is None:
        return
    if terminated:
        if request.id in _terminating:
            return  # RedlockRequest.terminate frees the run of the very child
        # The child was signalled just now: release once it is gone. Its pid is not
        # known here: by task id (a revoke reaches every worker, and each
        # terminates its delivery of the task).
        _release_later(sender, request.id, request.args, request.kwargs, "terminated")
        return
    # It never ran here: free what its task id holds (a publish lock, a retry's), not
    # a run of another delivery of the same message.
    reason = "expired" if expired else "revoked"
    sender._redlock_release_by_id(
        request.id, request.args, request.kwargs, reason, reservation=True
    )


#: Ids of the tasks RedlockRequest.terminate() is terminating (the task_revoked
#: receiver, called within it, leaves them to it).
_terminating: set[str] = set()


def _release_later(
    task: Any,
    task_id: str,
    args: Any,
    kwargs: Any,
    reason: str,
    child: int | None = None,
) -> None:
    """Release the lock of the run of ``child`` (a pid) once that process is gone.

    Polled every :data:`SIGNALLED_RELEASE_DELAY` seconds from a thread of its
    own. A child still alive after :data:`SIGNALLED_CHILD_WATCH` survived the
    signal: its run goes on under its lock (renewed) and releases it, so it
    is left alone. ``child=None`` (not known): released by task id (any run)
    once, :data:`SIGNALLED_RELEASE_DELAY` later.
    """

    def release_when_gone() -> None:
        deadline = time.monotonic() + SIGNALLED_CHILD_WATCH
        time.sleep(SIGNALLED_RELEASE_DELAY)
        while child is not None and _alive(child):
            if time.monotonic() >= deadline:
                _log.info(
                    "task %s[%s] %s: its child process %s survived the signal; the lock "
                    "is left to its run, which releases it when it ends",
                    getattr(task, "name", "?"),
                    task_id,
                    reason,
                    child,
                )
                return
            time.sleep(SIGNALLED_RELEASE_DELAY)
        task._redlock_release_by_id(task_id, args, kwargs, reason, child=child)

    thread = threading.Thread(target=release_when_gone, name="celery-redlock-release", daemon=True)
    thread.start()


def _alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass  # no /proc: ask the kernel (a zombie then counts as alive)
    else:
        return state not in ("Z", "X", "x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, not ours to signal
    return True


def _on_task_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    if not _is_redlock_task(sender) or task_id is None or _has_redlock_request(sender):
        return  # RedlockRequest frees the run of the very child (on_failure, on_timeout)
    if isinstance(exception, WorkerLostError):
        sender._redlock_release_by_id(task_id, args, kwargs, "worker-lost")
    elif isinstance(exception, TimeLimitExceeded):
        # Sent by the main process just before it kills the child: release after.
        _release_later(sender, task_id, args, kwargs, "time-limit")


def _on_task_postrun(
    sender: Any = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    task = task if task is not None else sender
    if _is_redlock_task(task):
        task._redlock_after_run(state)


class RedlockRequest(Request):  # type: ignore[misc]
    """The request class of :class:`~celery_redlock.task.RedlockTask` (main worker process).

    When the child running the task is lost, frees that child's run of the
    task at once (or the task id's own hold it had not taken over yet),
    whatever Celery does with the message next: with ``acks_late`` and
    ``reject_on_worker_lost`` it is requeued and with ``retry_on_worker_lost``
    retried, and in both cases no ``task_failure`` is sent. The dead run's
    lock would otherwise keep the key until it expires, while duplicates
    queued before the new delivery wait for it. On a hard time limit
    (:meth:`on_timeout`, called before the child is killed) the same is
    freed once that child is gone.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # an ExceptionWithTraceback
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, (SystemExit, KeyboardInterrupt))
            and not getattr(self, "_already_cancelled", False)
            and not getattr(self, "_already_revoked", False)
        )
        if lost and _is_redlock_task(self.task):
            # The child is gone; free its run's lock before Celery requeues or retries
            # the message, so its new delivery never finds the dead run's lock.
            self.task._redlock_release_by_id(
                self.id, self.args, self.kwargs, "worker-lost", child=_child_of(self)
            )
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def terminate(self, pool: Any, signal: Any = None) -> Any:
        """``revoke(terminate=True)``: free the run of the signalled child once it is
        gone; a child that survives the signal still runs the body under its lock."""
        if not self.time_start or not _is_redlock_task(self.task):
            return super().terminate(pool, signal)  # not started: terminated on its ack
        _terminating.add(self.id)
        try:
            return super().terminate(pool, signal)
        finally:
            _terminating.discard(self.id)
            _release_later(
                self.task, self.id, self.args, self.kwargs, "terminated", _child_of(self)
            )

    def cancel(self, pool: Any, signal: Any = None, **kwargs: Any) -> Any:
        """A running task cancelled (cold shutdown, or the broker connection lost with
        ``worker_cancel_long_running_tasks_on_connection_loss``): free the run of the
        signalled child once it is gone."""
        started = bool(self.time_start)
        try:
            return super().cancel(pool, signal, **kwargs)  # emit_retry= from Celery 5.6
        finally:
            if started and _is_redlock_task(self.task):
                _release_later(
                    self.task, self.id, self.args, self.kwargs, "cancelled", _child_of(self)
                )

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft and _is_redlock_task(self.task):
            # Called just before the child is killed: free its run's lock after.
            _release_later(
                self.task, self.id, self.args, self.kwargs, "time-limit", _child_of(self)
            )
        return super().on_timeout(soft, timeout)


class RedlockWorkerStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Validates the ``redlock_*`` settings when the worker is built.

    Raises :class:`~celery_redlock.exceptions.RedlockConfigError`, which stops
    the worker before it consumes anything.
    """

    label = "Redlock"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        from .config import validate_app

        super().__init__(parent, **kwargs)
        app = parent.app
        tasks = [t for t in app.tasks.values() if _is_redlock_task(t)]
        validate_app(app, tasks)

    def include_if(self, parent: Any) -> bool:
        return False  # nothing to start or stop: the check is all


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        app.steps["worker"].add(RedlockWorkerStep)


_connected = False
_connect_guard = threading.Lock()


def connect_handlers() -> None:
    """Connect the handlers on Celery's signals (idempotent; done on import)."""
    global _connected
    with _connect_guard:
        if _connected:
            return
        task_revoked.connect(_on_task_revoked, weak=False, dispatch_uid="celery_redlock.revoked")
        task_failure.connect(_on_task_failure, weak=False, dispatch_uid="celery_redlock.failure")
        task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="celery_redlock.postrun")
        worker_init.connect(_on_worker_init, weak=False, dispatch_uid="celery_redlock.worker_init")
        _connected = True


connect_handlers()
