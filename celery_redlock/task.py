"""RedlockTask: a Celery task that never has two runs of the same key at once.

::

    from celery_redlock import RedlockTask

    app.conf.redlock_servers = ["redis://r1:6379/0", "redis://r2:6379/0", "redis://r3:6379/0"]

    @app.task(base=RedlockTask)                  # key: task name + all arguments
    def sync_account(account_id, full=False): ...

    @app.task(base=RedlockTask, redlock_key=("account_id",), redlock_on_duplicate="retry")
    def charge(account_id, amount): ...

The lock's key is
``{redlock_key_prefix}{task name}:{sha256 of the canonical arguments}``
(see :mod:`celery_redlock.keys`). Its token is the task id: while a body
runs, the task id and a mark of that run (``"<task id>|<12 hex>"``), so a
second delivery of the same message (a broker redelivering it while the first
delivery still runs) is a duplicate like any other; between a run and its
retry, and from ``apply_async`` to the run with ``redlock_lock_on="publish"``,
the bare task id, which the run takes over. Holders are always reported as
task ids.

The lock's life:

- taken in :meth:`~RedlockTask.before_start`, inside Celery's traced block
  (a duplicate never reaches the body), with ``redlock_ttl`` and, when
  ``redlock_auto_extend`` is true, kept alive by the process's renewer thread
  (:mod:`celery_redlock.renewal`) while the body runs; when it is lost
  anyway, ``self.redlock_lost`` becomes true, :data:`~.signals.lock_lost` is
  sent and an ERROR logged;
- released as soon as the body ends, before the result is stored (so a
  caller woken by ``.get()`` finds the lock free): on success, failure,
  ``Ignore``, ``Reject`` and ``Task.replace()`` (a replacement by the same
  task with the same key takes the lock over instead: it is handed to the
  task id for ``redlock_ttl`` plus the replacement's countdown);
- kept across ``self.retry()`` and ``autoretry_for`` (eager retries, run at
  once by ``apply()``, release it and take it again): when the retry is sent
  (before the message can reach another worker) the lock is handed to the task
  id, its TTL covering the countdown or ETA, and the retried run takes it over;
  released when the retry changes the arguments, and so the key. (With
  ``retry(throw=False)`` the body goes on after handing its lock over.)
- released by the main worker process (:mod:`celery_redlock.signals`), which
  computes the key from the request and frees the run of the child that ran
  it (not another delivery's), when the task is revoked with
  ``terminate=True`` or cancelled, its message expires or is revoked before
  it runs (what its task id holds), its child process dies
  (``WorkerLostError``, also when ``reject_on_worker_lost`` requeues the
  message or ``retry_on_worker_lost`` retries it: the new delivery contends
  like any other), or it hits its hard time limit. A child that was signalled
  is released once it is gone; one that survives the signal (a handler of
  its own) still runs the body under its lock, and its run releases it. After the whole
  worker is SIGKILLed, the lock expires within ``redlock_ttl``;
- with ``redlock_hold``, the key is left to expire ``redlock_hold`` seconds
  after it was acquired by the run, when the run ends sooner (runs ended by
  the main worker process release at once);
- with ``redlock_lock_on="publish"``, also taken in ``apply_async`` (so a
  duplicate is not even sent) with the TTL plus any countdown or ETA; a retry
  (same task id) is not a duplicate.

A delivery of a message whose other delivery holds the lock (the broker
delivered it again: an ``acks_late`` task past the Redis transport's
``visibility_timeout``, a connection lost before the ack, or a worker killed
while its lock lives on) finds its own task id holding the lock. That other
delivery may be running or dead, so, whatever the policy, this one is sent
again to run after about the lock's time left (not a Celery retry: no RETRY
state, ``max_retries`` untouched) and ends without a state (``Ignore``): it
never runs beside the other, and is not lost if the other died. INFO is
logged and :data:`~.signals.lock_skipped` sent with ``holder`` equal to
``task_id``. (With ``"wait"``, it first waits like any duplicate.) An eager
run, which has no broker, fails with ``DuplicateTask`` instead.

Duplicates (``redlock_on_duplicate``):

- ``"skip"`` (default): the body does not run. At run time the duplicate
  ends as SUCCESS with the result None, so a caller waiting on ``.get()``
  gets None at once, and chains and chords go on; INFO is logged and
  :data:`~.signals.lock_skipped` sent (the marker to tell a skipped run
  from one that returned None). Why not another state: ``Ignore`` leaves the
  result PENDING, and a custom state is not ready, so ``.get()`` would wait
  forever; REVOKED would make ``.get()`` raise and fail a chord. A caller
  that must know uses ``"raise"``. At publish time, ``apply_async`` returns
  the AsyncResult of the task that holds the lock.
- ``"raise"``: :class:`~celery_redlock.exceptions.DuplicateTask` naming the
  holder and the time left: raised to the publisher, or the run's failure.
- ``"retry"``: the run retries itself after about the holder's remaining TTL
  (jittered; counts against ``max_retries``, then fails with DuplicateTask).
  At publish time the message is sent with that countdown, unlocked.
- ``"wait"``: block up to ``redlock_wait`` seconds (default ``redlock_ttl``)
  for the lock, then as ``"raise"``.

When a quorum of Redis nodes cannot be reached (``redlock_on_unavailable``):
``"fail"`` raises :class:`~celery_redlock.exceptions.LockNotAcquired` listing
the nodes (retried instead when the task's ``autoretry_for`` covers it), and
``"run"`` runs the body without the lock, logging a WARNING each time.

Settings: see :mod:`celery_redlock.config`. Signals: see
:mod:`celery_redlock.signals`. For your own tests: :mod:`celery_redlock.testing`.

Eager runs (``task_always_eager``, ``.apply()``) lock the same way at run time
(no publish-time lock: the call runs at once). Calling
the task object directly (``sync_account(1)``) runs the function without any
lock, as Celery runs it without a worker. ``send_task`` by name does not go
through this class, so it takes no publish-time lock (the run still locks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

from celery import Task, states
from celery._state import get_current_worker_task
from celery.backends.base import DisabledBackend
from celery.backends.rpc import RPCBackend
from celery.exceptions import Ignore, Reject, Retry
from celery.utils import uuid
from celery.utils.time import get_exponential_backoff_interval
from celery.worker import state as worker_state
from kombu import serialization
from kombu.utils.json import dumps as json_dumps
from kombu.utils.json import loads as json_loads

from . import _process, renewal
from .config import (
    DEFAULTS,
    RedlockSettings,
    get_redlock,
    resolve_settings,
    setting_name,
    task_where,
    unknown_settings,
    validate_value,
)
from .exceptions import (
    DuplicateTask,
    LockNotAcquired,
    QuorumUnavailable,
    RedlockConfigError,
    Vote,
)
from .keys import build_key, run_mark, run_token, task_id_of
from .redlock import MAX_TTL, Lock, LockInfo, Redlock
from .signals import lock_acquired, lock_lost, lock_released, lock_skipped

__all__ = ["RedlockTask"]

_log = logging.getLogger(__name__)

#: Attribute of the request (Context) holding the run's lock state.
_RUN_ATTR = "_redlock_run"
#: Methods and properties that carry the ``redlock_`` prefix but are no settings.
_NOT_SETTINGS = ("redlock_lost", "redlock_key_for", "redlock_info", "redlock_settings")


@dataclass(eq=False)
class _Run:
    """One run's lock: what ``before_start`` took and the end of the run gives back."""

    key: str
    task_id: str
    token: str
    settings: RedlockSettings
    manager: Redlock | None = None
    lock: Lock | None = None
    watch: renewal.Watch | None = None
    acquired_at: float = 0.0
    entered: bool = False
    skipped: bool = False
    lost: bool = False
    done: bool = False
    replaced_by: Any = None


def _seconds_until(when: object) -> float:
    """Seconds until a countdown (number) or an ETA (datetime or ISO str), at least 0.

    A naive ETA is UTC, as Celery reads it (not the host's local time).
    """
    if when is None:
        return 0.0
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return max(0.0, float(when))
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return 0.0
    if isinstance(when, datetime):
        if when.tzinfo is None:  # naive: UTC, as Celery reads it (maybe_make_aware)
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    return 0.0


def _interrupted(run: _Run, *tokens: str) -> None:
    """A run's end was interrupted (an exception from a signal handler): stop its
    renewals and try once more to free its key where it holds ``tokens`` (the
    run's lock, when none are given)."""
    if run.watch is not None:
        run.watch.cancelled = True  # a renewal still in flight cannot revive a freed key
    if run.lock is None or run.manager is None:
        return
    if not tokens:
        with contextlib.suppress(Exception):
            run.manager.release(run.lock)
    for token in tokens:
        with contextlib.suppress(Exception):
            run.manager.release(run.key, token)


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def _jitter(seconds: float) -> float:
    """About ``seconds`` (x0.75 to x1.25), at least 0.1."""
    return max(0.1, seconds * random.uniform(0.75, 1.25))


class RedlockTask(Task):  # type: ignore[misc]
    """A task whose runs with the same key never overlap, on any number of workers.

    Settings come from the task attribute of the same name when the task
    sets it (None counts for ``redlock_key``, ``redlock_wait`` and
    ``redlock_servers``), else from ``app.conf.get("redlock_<name>")``, else the default
    (see :mod:`celery_redlock.config`). They are validated when the task is
    registered (attributes) and when a worker starts (the configuration),
    and resolved on first use in each process.

    A subclass overriding :meth:`before_start`, :meth:`__call__`,
    :meth:`apply_async` or :meth:`on_replace` must call ``super()``.
    """

    #: Marks the tasks the plugin's signal handlers act on.
    __redlock_task__: ClassVar[bool] = True

    #: The worker's request class: frees the lock of a lost child also when
    #: Celery requeues or retries its message. A task that sets its own must
    #: subclass :class:`celery_redlock.signals.RedlockRequest`.
    Request = "celery_redlock.signals:RedlockRequest"

    #: Redis masters holding the locks: one URL or a list (``redis://``,
    #: ``rediss://``, ``unix://``, ``"host:port"``, or ``redis.Redis`` clients).
    #: Default: the broker's server, when the broker is Redis.
    redlock_servers: Any = None

    #: Seconds the lock lives without being extended (default 30).
    redlock_ttl: float | None = None

    #: Attempts to acquire the lock (default 3; 0 means one).
    redlock_retry_count: int | None = None

    #: Most seconds between two attempts; each wait is random in [0, x] (default 0.2).
    redlock_retry_delay: float | None = None

    #: Clock drift allowance, as a share of the TTL (default 0.01).
    redlock_drift_factor: float | None = None

    #: Seconds to wait for one Redis node's reply (default 0.1).
    redlock_node_timeout: float | None = None

    #: Prefix of the lock keys (default ``"redlock:"``).
    redlock_key_prefix: str | None = None

    #: What identifies a run: None (all arguments, the default), a list of
    #: argument names, a callable taking the task's arguments and returning a
    #: str, or ``""`` (the task name alone: one run of the task at a time).
    redlock_key: Any = None

    #: What a duplicate does: ``"skip"`` (default), ``"raise"``, ``"retry"`` or ``"wait"``.
    redlock_on_duplicate: str | None = None

    #: Most seconds the ``"wait"`` policy blocks (default: ``redlock_ttl``).
    redlock_wait: float | None = None

    #: When the lock is taken: ``"run"`` (default), or ``"publish"``: also in
    #: ``apply_async``, so a duplicate is not even sent.
    redlock_lock_on: str | None = None

    #: Renew the lock every TTL/3 while the body runs (default True).
    redlock_auto_extend: bool | None = None

    #: Seconds the key stays held at least, counted from acquiring, even when
    #: the run ends sooner (default 0): a periodic job sent by several beat
    #: instances runs once per period.
    redlock_hold: float | None = None

    #: When no quorum of Redis nodes answers: ``"fail"`` (default) or
    #: ``"run"`` (run unlocked, logging a WARNING).
    redlock_on_unavailable: str | None = None

    #: Check the nodes' Redis version when the process first uses them (default True).
    redlock_version_check: bool | None = None

    # -- registration ---------------------------------------------------------

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Validate the task's ``redlock_*`` attributes when it is registered."""
        super().on_bound(app)
        name = cls.name or cls.__qualname__
        typos = unknown_settings(n for n in dir(cls) if n not in _NOT_SETTINGS)
        if typos:
            raise RedlockConfigError(f"task {name}: {typos[0]}")
        func = _run_signature_of(cls)
        for short in DEFAULTS:
            value = getattr(cls, setting_name(short), None)
            if value is not None:
                validate_value(short, value, task_where(short, name), func)
        cls._redlock_resolved = None

    _redlock_resolved: ClassVar[RedlockSettings | None] = None

    @property
    def redlock_settings(self) -> RedlockSettings:
        """This task's resolved settings (cached on first use in the process)."""
        settings = self._redlock_resolved
        if settings is None:
            settings = resolve_settings(self._get_app(), self, func=self.run, require_servers=False)
            type(self)._redlock_resolved = settings
        return settings

    def redlock_key_for(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> str:
        """The Redis key of this task's lock for a call with ``args`` and ``kwargs``."""
        settings = self.redlock_settings
        return build_key(settings.key_prefix, self.name, self.run, args, kwargs, settings.key)

    def redlock_info(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> LockInfo:
        """Who holds the lock of a call with ``args`` and ``kwargs`` now, and for how long.

        ``.holder`` is the task id holding it on a quorum (None when free),
        ``.ttl_left`` the seconds left; for dashboards and tests.
        """
        settings = self.redlock_settings
        return _by_task_id(get_redlock(settings).inspect(self.redlock_key_for(args, kwargs)))

    @property
    def redlock_lost(self) -> bool:
        """True once the running task's lock was lost (the renewer could not keep it).

        Only a renewed lock (``redlock_auto_extend``) is watched; a body that
        must not go on without its lock checks this between steps.
        """
        run = getattr(self.request, _RUN_ATTR, None)
        return isinstance(run, _Run) and run.lost

    # -- acquiring --------------------------------------------------------------

    def _redlock_take(
        self,
        key: str,
        token: str,
        ttl: float,
        settings: RedlockSettings,
        takeover: str | None = None,
        wait: bool = True,
    ) -> tuple[Redlock | None, Lock | LockInfo | LockNotAcquired]:
        """Try to take ``key``: the lock, the holder's info (a duplicate), or the failure.

        ``takeover``: the task id, whose reservation a run's token takes over.
        ``wait=False``: no waiting, whatever ``redlock_on_duplicate`` says.
        The info's holder is a task id.
        """
        try:
            manager = get_redlock(settings)
        except QuorumUnavailable as exc:
            return None, LockNotAcquired(key, exc.votes, 0, message=f"lock {key!r}: {exc}")
        if wait and settings.on_duplicate == "wait":
            try:
                return manager, manager.acquire(
                    key, ttl, token, wait=settings.wait_for, takeover=takeover
                )
            except LockNotAcquired as exc:
                if exc.unavailable:
                    return manager, exc
                info = manager.inspect(key)
                if _revoked_hold(info.holder, self) is None:
                    return manager, _holder_or(exc, info)
        attempts = max(1, settings.retry_count)
        failure: LockNotAcquired | None = None
        for attempt in range(attempts):
            try:
                return manager, manager.acquire(key, ttl, token, retry_count=0, takeover=takeover)
            except LockNotAcquired as exc:
                failure = exc
                if not exc.unavailable:
                    info = manager.inspect(key)
                    if info.holder is not None and info.holder not in (token, takeover):
                        revoked = _revoked_hold(info.holder, self)
                        if revoked is None:
                            return manager, _by_task_id(info)  # held on a quorum by another run
                        # A hold for a queued message that was revoked: it will not run.
                        try:
                            return manager, manager.acquire(
                                key, ttl, token, retry_count=0, takeover=revoked
                            )
                        except LockNotAcquired as again:
                            failure = again
            if attempt + 1 < attempts:  # split votes or failing nodes: try again
                time.sleep(random.uniform(0, settings.retry_delay))
        assert failure is not None
        if failure.unavailable:
            return manager, failure
        return manager, _holder_or(failure, manager.inspect(key))

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Take the lock before the body runs (Celery calls this inside the traced block).

        A duplicate is skipped, raised, retried or waits, per ``redlock_on_duplicate``.
        """
        super().before_start(task_id, args, kwargs)
        settings = self.redlock_settings
        key = self.redlock_key_for(args, kwargs)
        run = _Run(key, task_id, run_token(task_id, run_mark(_process.pid())), settings)
        setattr(self.request, _RUN_ATTR, run)
        started = time.monotonic()
        manager, outcome = self._redlock_take(key, run.token, settings.ttl, settings, task_id)
        run.manager = manager
        if isinstance(outcome, Lock):
            self._redlock_hold_lock(run, outcome, time.monotonic() - started)
        elif isinstance(outcome, LockInfo):
            self._redlock_duplicate(run, outcome)
        elif any(v.vote is Vote.HELD for v in outcome.votes) and not outcome.unavailable:
            # (Held by another token on some node: contention. Granted too slowly, or
            # nodes down, is a failure to lock: as when the nodes cannot be reached.)
            self._redlock_contended(run, outcome)
        else:
            self._redlock_unavailable(run, outcome)

    def _redlock_hold_lock(self, run: _Run, lock: Lock, waited: float) -> None:
        run.lock = lock
        run.acquired_at = time.monotonic()
        try:
            if run.settings.auto_extend:
                run.watch = renewal.watch(
                    lock, run.settings.ttl, functools.partial(self._redlock_on_lost, run)
                )
            lock_acquired.send(
                sender=self,
                task_id=run.task_id,
                key=run.key,
                ttl=run.settings.ttl,
                validity=lock.validity,
                waited=waited,
            )
        except BaseException:
            self._redlock_end(run, "failure")
            raise

    def _redlock_duplicate(self, run: _Run, info: LockInfo) -> None:
        settings = run.settings
        policy = settings.on_duplicate
        if info.holder == run.task_id:
            self._redlock_delivered_again(run, info)
        if policy == "skip":
            run.skipped = True
            _log.info(
                "task %s[%s] skipped: lock %s is held by task %s (%s s left)",
                self.name,
                run.task_id,
                run.key,
                info.holder,
                _seconds(info.ttl_left),
            )
            self._redlock_send_skipped(run, info)
            return
        error = DuplicateTask(run.key, info.holder, info.ttl_left, self.name)
        if policy == "retry" and not self.request.is_eager:
            # (Eager, apply() would run the retry at once, again and again: it fails.)
            raise self.retry(exc=error, countdown=_jitter(info.ttl_left or settings.ttl))
        raise error

    def _redlock_delivered_again(self, run: _Run, info: LockInfo) -> None:
        """Another delivery of this very message holds the lock (a broker delivered it again).

        That delivery may be running, or dead with its lock not yet expired: this one
        is sent again to run after about the lock's time left (not a retry: no RETRY
        state, ``max_retries`` untouched) and ends without a state (``Ignore``). So
        two bodies never run at once, and the message is not lost if the other
        delivery died. Eager runs have no broker: they fail with DuplicateTask.
        """
        if self.request.is_eager:
            raise DuplicateTask(run.key, info.holder, info.ttl_left, self.name)
        # After the lock's time left, not before: a dead delivery's lock must be gone.
        delay = (info.ttl_left or run.settings.ttl) * random.uniform(1.0, 1.25)
        _log.info(
            "task %s[%s] delivered again while another delivery of it holds its lock %s "
            "(%s s left): sent again to run in %.1f s",
            self.name,
            run.task_id,
            run.key,
            _seconds(info.ttl_left),
            delay,
        )
        self._redlock_send_skipped(run, info)
        self.signature_from_request(countdown=delay).apply_async()
        run.skipped = True
        run.done = True
        raise Ignore()

    def _redlock_contended(self, run: _Run, failure: LockNotAcquired) -> None:
        """No one holds the key on a quorum, and this run could not take it either
        (votes split between contenders, or a holder's nodes down): the run is no
        proven duplicate, so it is neither skipped nor run unlocked, but sent again
        to run after the most common token's time left (or about
        ``redlock_retry_delay``), like a delivery meeting its own lock: no RETRY
        state, ``max_retries`` untouched, the same task id. Eager, it fails."""
        if self.request.is_eager:
            raise failure
        left = None
        if run.manager is not None:
            with contextlib.suppress(Exception):
                left = run.manager.inspect(run.key).ttl_left
        delay = max(0.1, run.settings.retry_delay if left is None else left)
        delay *= random.uniform(1.0, 1.25)
        _log.info(
            "task %s[%s]: no one holds its lock %s on a quorum, and it could not take it "
            "(%s): sent again to run in %.1f s",
            self.name,
            run.task_id,
            run.key,
            failure,
            delay,
        )
        self.signature_from_request(countdown=delay).apply_async()
        run.skipped = True
        run.done = True
        raise Ignore()

    def _redlock_send_skipped(self, run: _Run, info: LockInfo) -> None:
        lock_skipped.send(
            sender=self,
            task_id=run.task_id,
            key=run.key,
            holder=info.holder,
            ttl_left=info.ttl_left,
            when="run",
        )

    def _redlock_unavailable(self, run: _Run, error: LockNotAcquired) -> None:
        if run.settings.on_unavailable == "run":
            _log.warning(
                "task %s[%s] runs WITHOUT its lock %s (redlock_on_unavailable='run'): %s",
                self.name,
                run.task_id,
                run.key,
                error,
            )
            return
        autoretry = tuple(getattr(self, "autoretry_for", ()) or ())
        dont = tuple(getattr(self, "dont_autoretry_for", ()) or ())
        if autoretry and isinstance(error, autoretry) and not (dont and isinstance(error, dont)):
            raise self.retry(exc=error, **self._redlock_autoretry_kwargs())
        raise error

    def _redlock_autoretry_kwargs(self) -> dict[str, Any]:
        """The retry options ``autoretry_for`` would use (celery/app/autoretry.py)."""
        options = dict(getattr(self, "retry_kwargs", None) or {})
        backoff = float(getattr(self, "retry_backoff", False) or 0)
        if backoff:
            options["countdown"] = get_exponential_backoff_interval(
                factor=int(max(1.0, backoff)),
                retries=self.request.retries,
                maximum=int(getattr(self, "retry_backoff_max", 600)),
                full_jitter=getattr(self, "retry_jitter", True),
            )
        return options

    def _redlock_on_lost(self, run: _Run, watch: renewal.Watch) -> None:
        """Called from the renewer thread when the run's lock is lost."""
        run.lost = True
        held_for = time.monotonic() - run.acquired_at
        _log.error(
            "task %s[%s] lost its lock %s after %.1f s: another run may start; "
            "check the Redis nodes and redlock_ttl",
            self.name,
            run.task_id,
            run.key,
            held_for,
        )
        lock_lost.send(sender=self, task_id=run.task_id, key=run.key, held_for=held_for)

    # -- running ----------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the body under the lock ``before_start`` took, then release it.

        Called directly (not by a worker or ``apply``), runs the body unlocked.
        """
        request = self.request_stack.top
        run = getattr(request, _RUN_ATTR, None) if request is not None else None
        if not isinstance(run, _Run) or run.entered:  # a direct call, even from the body
            return super().__call__(*args, **kwargs)
        run.entered = True
        if run.skipped:
            run.done = True
            return None
        try:
            result = self.run(*args, **kwargs)
        except Retry as exc:
            self._redlock_keep_for_retry(run, exc)
            raise
        except Reject:
            self._redlock_end(run, "rejected")
            raise
        except Ignore:
            self._redlock_end(run, "replaced" if run.replaced_by is not None else "ignored")
            raise
        except BaseException:
            self._redlock_end(run, "failure")
            raise
        self._redlock_end(run, "success")
        return result

    def on_replace(self, sig: Any) -> Any:
        """End the run's hold before the replacement is sent (or, eager, run).

        A replacement with this task id and key takes the lock over from the
        task id; anything else finds the key free, so a replacement (or the
        first step of a replacing chain) with the same key is never taken for
        a duplicate of the run it replaces.
        """
        run = getattr(self.request, _RUN_ATTR, None)
        handed = False
        if isinstance(run, _Run) and not run.done:
            run.replaced_by = sig
            handed = run.lock is not None and self._redlock_same_work(run, sig)
            options = getattr(sig, "options", None) or {}
            delay = _seconds_until(options.get("countdown") or options.get("eta"))
            # hold=False: the work goes on in the replacement, whose same-key steps
            # must not find the key held for the rest of redlock_hold.
            self._redlock_end(run, "replaced", delay=delay, hold=False)
        try:
            return super().on_replace(sig)
        except Ignore:
            raise
        except BaseException:
            if handed and isinstance(run, _Run) and run.manager is not None:
                # Not sent: nothing will take the task id's hold over.
                with contextlib.suppress(Exception):
                    run.manager.release(run.key, run.task_id)
            raise

    def _redlock_end(
        self, run: _Run, reason: str, *, delay: float = 0.0, hold: bool = True
    ) -> None:
        """Release the run's lock (or leave it to expire at the end of ``redlock_hold``).

        ``reason="replaced"`` by the same work (this task id and key): the lock
        is handed to the task id for ``redlock_ttl + delay`` instead, for the
        replacement to take over. ``hold=False``: released even within
        ``redlock_hold`` (an eager retry, run at once under the same task id).
        """
        if run.done:
            return
        if reason == "replaced" and self._redlock_same_work(run, run.replaced_by):
            self._redlock_hand_over(run, delay)
            return
        lock, manager = run.lock, run.manager
        held_for = time.monotonic() - run.acquired_at
        hold_left = 0.0
        try:
            # Inside the try: an interruption before it leaves the run to the postrun
            # net; one after it frees the key below.
            run.done = True
            if run.watch is not None:
                run.watch.cancel()  # waits out a renewal in flight
            if lock is None or manager is None:
                return
            hold_left = run.settings.hold - held_for if hold else 0.0
            if hold_left >= 0.001:
                manager.extend(lock, hold_left)
            else:
                hold_left = 0.0
                manager.release(lock)
        except BaseException:
            # Interrupted (a soft time limit firing in the cancel or the release):
            # no renewal after this, and the release tried once more, or the key
            # stays held (renewed, even) with no run behind it.
            _interrupted(run)
            raise
        lock_released.send(
            sender=self,
            task_id=run.task_id,
            key=run.key,
            reason=reason,
            held_for=held_for,
            hold_left=hold_left,
        )

    def _redlock_same_work(self, run: _Run, sig: Any) -> bool:
        """True when ``sig`` is a call of this task with the same key."""
        if sig is None or getattr(sig, "task", None) != self.name:
            return False
        try:
            return self.redlock_key_for(sig.args, sig.kwargs) == run.key
        except Exception:
            return False

    def _redlock_keep_for_retry(self, run: _Run, retry: Retry) -> None:
        """Keep the lock for the retried run (same task id), its TTL covering the delay.

        A retry sent by a worker was handed the lock in :meth:`apply_async`;
        this covers a retry that was not sent through it. An eager retry is run
        by ``apply()`` at once, or not at all (``task_eager_propagates``): its
        lock is released (past ``redlock_hold`` too), and the retried run takes
        the key again.
        """
        if run.done:
            return
        if self.request.is_eager:
            # apply() runs the retry at once, or not at all (task_eager_propagates
            # raises the Retry to the caller): nothing to keep it for.
            self._redlock_end(run, "retry", hold=False)
            return
        sig = getattr(retry, "sig", None)
        if sig is not None and not self._redlock_same_work(run, sig):
            self._redlock_end(run, "retry-new-arguments")
            return
        self._redlock_hand_over(run, _seconds_until(retry.when))

    def _redlock_hand_over(self, run: _Run, delay: float) -> None:
        """End the run's hold, leaving the lock to its task id for ``redlock_ttl + delay``."""
        if run.lock is None or run.manager is None:
            run.done = True
            if run.watch is not None:
                run.watch.cancel()
            return
        token = run.lock.value
        try:
            run.done = True  # (inside the try, as in _redlock_end)
            if run.watch is not None:
                run.watch.cancel()
            handed = run.manager.reassign(
                run.lock, run.task_id, min(MAX_TTL, run.settings.ttl + delay)
            )
        except BaseException:
            # Interrupted: the retry or replacement is not sent, nothing takes over.
            _interrupted(run, token, run.task_id)
            raise
        if not handed:
            # Free what is left of it (this run's token, or the task id where the swap
            # went through), so the retried run takes the key like any other; not a
            # token of another delivery of this task id that took the key meanwhile.
            run.manager.release(run.key, token)
            run.manager.release(run.key, run.task_id)
            _log.warning(
                "task %s[%s]: its lock %s could not be handed to its task id for the next "
                "run (a retry or a replacement; lost, or nodes down): released; that run "
                "takes it like any other",
                self.name,
                run.task_id,
                run.key,
            )

    def _redlock_own_run(self, task_id: str | None, key: str) -> _Run | None:
        """The current run of ``task_id`` with ``key``: it is sending itself again."""
        if task_id is None:
            return None
        request = self.request_stack.top
        run = getattr(request, _RUN_ATTR, None) if request is not None else None
        if isinstance(run, _Run) and not run.done and run.task_id == task_id and run.key == key:
            return run
        return None

    def _redlock_own_key(self, key: str) -> bool:
        """True when the current run of this task holds ``key`` (and has not ended)."""
        request = self.request_stack.top
        run = getattr(request, _RUN_ATTR, None) if request is not None else None
        return isinstance(run, _Run) and not run.done and run.lock is not None and run.key == key

    def _redlock_after_run(self, state: str | None) -> None:
        """``task_postrun``: release a lock the run did not (a safety net)."""
        run = getattr(self.request, _RUN_ATTR, None)
        if isinstance(run, _Run) and run.done and run.watch is not None and not run.watch.cancelled:
            # Ended, but its end was cut short before the renewals stopped: they would
            # keep the key held for as long as this process lives.
            _interrupted(run)
        if isinstance(run, _Run) and not run.done:
            if state == "RETRY" and not self.request.is_eager:
                self._redlock_hand_over(run, 0.0)
                return
            self._redlock_end(run, f"postrun:{(state or 'failure').lower()}")

    # -- main worker process --------------------------------------------------

    def _redlock_release_by_id(
        self,
        task_id: str,
        args: Any,
        kwargs: Any,
        reason: str,
        *,
        child: int | None = None,
        reservation: bool = False,
    ) -> bool:
        """Release the lock of task ``task_id``, from any process.

        ``child``: the pid of the pool child (on this machine) that ran it:
        that child's run, or the task id's own hold it had not taken over yet,
        is freed, and no other delivery's run. ``reservation``: the message
        never ran here: only the task id's own hold (a publish lock, a
        retry's) is freed. Neither: the task id's hold and any run of it.
        """
        try:
            key = self.redlock_key_for(args, kwargs)
            manager = get_redlock(self.redlock_settings)
            if child is not None:
                run = f"{task_id}|{run_mark(child)}"
                released = manager.release(key, run, prefix=True)
                released = manager.release(key, task_id) or released
            else:
                released = manager.release(key, task_id, owner=not reservation)
        except Exception as exc:
            _log.warning(
                "could not release the lock of task %s[%s] (%s): %s; it expires by its TTL",
                self.name,
                task_id,
                reason,
                exc,
            )
            return False
        if released:
            _log.info("task %s[%s] %s: released its lock %s", self.name, task_id, reason, key)
            lock_released.send(
                sender=self,
                task_id=task_id,
                key=key,
                reason=reason,
                held_for=None,
                hold_left=0.0,
            )
        return released

    # -- publishing -------------------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Send the task; with ``redlock_lock_on="publish"``, take its lock first.

        The key is computed here in every case, so arguments that cannot be
        encoded fail now, naming the argument. A run sending itself again (a
        retry, or a replacement by the same call) hands its lock to its task
        id first, so the new message finds it reserved wherever it lands.
        """
        settings = self.redlock_settings
        key_args, key_kwargs = args, kwargs
        dump = getattr(self, "_dump_pydantic_arguments", None)  # pydantic=True (Celery 5.5+)
        keyed_by = settings.key if callable(settings.key) else None
        serializer = None
        if dump is not None or keyed_by is not None:
            serializer = options.get("serializer") or self._get_exec_options().get("serializer")
        if dump is not None and serializer != "pickle":
            key_args, key_kwargs = dump(args, kwargs)  # as the worker will receive them
        if keyed_by is not None and serializer != "pickle":
            # A key function sees the arguments as the worker will (lists for tuples,
            # str dict keys), so the run computes the key the publish lock is under.
            key_args, key_kwargs = _as_delivered(key_args, key_kwargs, serializer)
        key = self.redlock_key_for(key_args, key_kwargs)
        send = functools.partial(
            super().apply_async,
            args=args,
            kwargs=kwargs,
            producer=producer,
            link=link,
            link_error=link_error,
            shadow=shadow,
        )
        own = self._redlock_own_run(task_id, key)
        if own is not None:
            if own.lock is None or own.manager is None:  # it holds nothing to hand over
                return send(task_id=task_id, **options)
            assert task_id is not None
            delay = _seconds_until(options.get("countdown") or options.get("eta"))
            self._redlock_hand_over(own, delay)
            try:
                return send(task_id=task_id, **options)
            except BaseException:
                own.manager.release(key, task_id)  # the hold nothing will take over
                raise
        if settings.lock_on != "publish" or self.app.conf.task_always_eager:
            # Eager: apply() runs it at once, and the run locks.
            return send(task_id=task_id, **options)
        if self._redlock_own_key(key):
            # A call made by the run holding this key (a task scheduling its next
            # round): no duplicate of that run. Its own run meets the lock.
            _log.info(
                "task %s sent without its publish lock %s: sent by the run holding it",
                self.name,
                key,
            )
            return send(task_id=task_id or uuid(), **options)
        # A task id chosen before the call (a workflow member, a retry), or a callback
        # the worker sends for the task that has just run (parent_id: that task's id;
        # a failure here would be the parent's): never dropped or held up here.
        given = task_id is not None or _sent_for_parent(options)
        task_id = task_id or uuid()
        delay = _seconds_until(options.get("countdown") or options.get("eta"))
        started = time.monotonic()
        manager, outcome = self._redlock_take(
            key, task_id, min(MAX_TTL, settings.ttl + delay), settings, wait=not given
        )
        if isinstance(outcome, Lock):
            assert manager is not None
            lock_acquired.send(
                sender=self,
                task_id=task_id,
                key=key,
                ttl=min(MAX_TTL, settings.ttl + delay),
                validity=outcome.validity,
                waited=time.monotonic() - started,
            )
            try:
                return send(task_id=task_id, **options)
            except BaseException:
                # By name: a bare task id may be taken again (a send retried with it),
                # so a release that missed nodes is not sent to them later.
                manager.release(key, task_id)
                raise
        if isinstance(outcome, LockNotAcquired) and not outcome.unavailable:
            # No one holds the key on a quorum (it may be changing hands): not a
            # duplicate; its run meets the lock.
            outcome = LockInfo(key, None, None, 0)
        if isinstance(outcome, LockNotAcquired):
            if settings.on_unavailable == "run" or given:
                _log.warning(
                    "task %s[%s] sent WITHOUT its publish lock %s (%s): %s",
                    self.name,
                    task_id,
                    key,
                    "its task id was given: its run meets the lock"
                    if given
                    else "redlock_on_unavailable='run'",
                    outcome,
                )
                return send(task_id=task_id, **options)
            raise outcome
        return self._redlock_publish_duplicate(
            key, task_id, outcome, settings, send, options, given, delay
        )

    def _redlock_publish_duplicate(
        self,
        key: str,
        task_id: str,
        info: LockInfo,
        settings: RedlockSettings,
        send: functools.partial[Any],
        options: dict[str, Any],
        given: bool,
        delay: float,
    ) -> Any:
        if info.holder is not None and info.ttl_left is not None and delay > info.ttl_left:
            # Due after the holder's lock runs out (unless renewed): a later round of
            # the work, not a duplicate of the run holding it now. Its run meets the lock.
            _log.info(
                "task %s[%s] sent without its publish lock %s: due in %.1f s, after the "
                "lock of task %s (%s s left); its run meets the lock",
                self.name,
                task_id,
                key,
                delay,
                info.holder,
                _seconds(info.ttl_left),
            )
            return send(task_id=task_id, **options)
        if given or info.holder is None:
            # A task id chosen before the call (a group, chord or chain member, a retry,
            # a caller that waits on it) is waited on: never dropped here. Nor is a
            # call whose key no one holds on a quorum. Its run meets the lock.
            _log.info(
                "task %s[%s] sent without its publish lock %s (%s): its run meets the lock",
                self.name,
                task_id,
                key,
                "its task id was given"
                if given
                else "held by no one on a quorum; it may be changing hands",
            )
            return send(task_id=task_id, **options)
        policy = settings.on_duplicate
        if policy == "skip":
            _log.info(
                "task %s not sent: lock %s is held by task %s (%s s left)",
                self.name,
                key,
                info.holder,
                _seconds(info.ttl_left),
            )
            lock_skipped.send(
                sender=self,
                task_id=task_id,
                key=key,
                holder=info.holder,
                ttl_left=info.ttl_left,
                when="publish",
            )
            return self.AsyncResult(info.holder)
        if policy == "retry":
            # Sent to run after the holder's time left, and never before the caller asked.
            options = {k: v for k, v in options.items() if k not in ("countdown", "eta")}
            countdown = max(delay, _jitter(info.ttl_left or settings.ttl))
            return send(task_id=task_id, countdown=countdown, **options)
        raise DuplicateTask(key, info.holder, info.ttl_left, self.name)


def _as_delivered(args: Any, kwargs: Any, serializer: str | None) -> tuple[Any, Any]:
    """``args`` and ``kwargs`` as a worker receives them through ``serializer``
    (kombu's registry: json, yaml, msgpack, ...)."""
    data = [list(args or ()), dict(kwargs or {})]
    if serializer in (None, "json"):
        sent = json_dumps(data)  # type: ignore[no-untyped-call]
        return tuple(json_loads(sent))  # type: ignore[no-untyped-call]
    content_type, encoding, payload = serialization.dumps(data, serializer=serializer)  # type: ignore[no-untyped-call]
    delivered = serialization.loads(payload, content_type, encoding, force=True)  # type: ignore[no-untyped-call]
    if isinstance(delivered, (list, tuple)) and len(delivered) == 2:
        return delivered[0], delivered[1]
    return args, kwargs  # a serializer this process cannot decode: as given


def _revoked_hold(holder: str | None, task: Any) -> str | None:
    """``holder`` when it is a task id's own hold (a publish lock, a retry's, not a
    run's) and that task was revoked (this process was told, or the task's result
    backend says so: Celery stores REVOKED for a queued task when the revoke
    reaches a worker): its message will not run, so its hold is not a duplicate's.

    The backend is asked once, without Celery's retries (a backend down answers
    "not revoked"); not an RPC backend, which knows only this client's tasks."""
    if holder is None or task_id_of(holder) != holder:
        return None  # no one, or a run: a revoked run that runs on keeps its lock
    if holder in worker_state.revoked:
        return holder
    backend = task.backend
    meta_for = getattr(backend, "_get_task_meta_for", None)
    if (
        task.app.conf.task_always_eager
        or meta_for is None
        or isinstance(backend, (DisabledBackend, RPCBackend))
    ):
        return None
    try:
        state = meta_for(holder).get("status")
    except Exception:  # the backend cannot be reached: not known to be revoked
        return None
    return holder if state == states.REVOKED else None


def _sent_for_parent(options: Mapping[str, Any]) -> bool:
    """True for a callback (``link=``) the worker sends for the task it has just run:
    sent with ``parent_id``, that running task's id."""
    parent_id = options.get("parent_id")
    if parent_id is None:
        return False
    current = get_current_worker_task()
    return current is not None and getattr(current.request, "id", None) == parent_id


def _holder_or(failure: LockNotAcquired, info: LockInfo) -> LockInfo | LockNotAcquired:
    """The holder's info (as a task id) when someone holds the key on a quorum; else
    ``failure``: no one does (votes split between contenders, or keys left on a
    minority), so the call is no proven duplicate, and must not be skipped as one
    (see :meth:`RedlockTask._redlock_contended`)."""
    return failure if info.holder is None else _by_task_id(info)


def _by_task_id(info: LockInfo) -> LockInfo:
    """``info`` with its holder as a task id (a run's token carries a mark after it)."""
    holder = task_id_of(info.holder)
    return info if holder == info.holder else dataclasses.replace(info, holder=holder)


def _run_signature_of(cls: type) -> Any:
    """A callable with the signature a call of the task binds to (no ``self``)."""
    raw = inspect.getattr_static(cls, "run", None)
    if isinstance(raw, staticmethod):
        return raw.__func__
    if callable(raw):
        return functools.partial(raw, None)  # bind=True or a class-based task: drop self
    return None
