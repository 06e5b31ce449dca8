"""Highly available beat: any number of beat instances, one leader sends.

Run every beat with the scheduler::

    celery -A proj beat -S celery_redlock.beat:RedlockScheduler

Each instance tries to take the leader lock (setting
``redlock_beat_lock_key``, default ``{redlock_key_prefix}beat:{app.main}``)
with a TTL of ``redlock_beat_ttl`` seconds (default 30). The one that holds
it sends due tasks and renews the lock every third of the TTL. The others
are standbys: they keep their schedule in step with the leader (each due
entry is advanced as if sent, but nothing is sent) and try to take the lock
every ``redlock_beat_poll`` seconds (default 1), so when the leader dies the
next tick is sent by a standby within the TTL (plus one poll).

A leader that cannot renew, or whose lock's validity would run out before a
send, stops sending at once and goes back to standby: it never crashes and
never sends without the lock. On a clean shutdown it releases the lock, so a
standby takes over at its next poll.

:class:`RedlockSchedulerMixin` wraps any scheduler class::

    from django_celery_beat.schedulers import DatabaseScheduler
    class HADatabaseScheduler(RedlockSchedulerMixin, DatabaseScheduler): ...
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from celery.beat import PersistentScheduler

from .config import get_redlock, resolve_settings
from .exceptions import LockNotAcquired, RedlockConfigError, RedlockError
from .redlock import Lock, Redlock

__all__ = ["BEAT_DEFAULTS", "RedlockScheduler", "RedlockSchedulerMixin"]

logger = logging.getLogger(__name__)

#: The beat settings (read from ``app.conf``) and their defaults.
BEAT_DEFAULTS: dict[str, Any] = {
    "redlock_beat_lock_key": None,  # None: f"{redlock_key_prefix}beat:{app.main}"
    "redlock_beat_ttl": 30.0,
    "redlock_beat_poll": 1.0,
}


def _seconds(app: Any, name: str) -> float:
    value = app.conf.get(name)
    if value is None:
        value = BEAT_DEFAULTS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise RedlockConfigError(
            f"the setting {name} must be a number of seconds > 0, not {value!r}"
        )
    return float(value)


class RedlockSchedulerMixin:
    """Leader election for a :class:`celery.beat.Scheduler` subclass.

    Put it first in the bases: ``class S(RedlockSchedulerMixin, SomeScheduler)``.
    """

    app: Any
    max_interval: float

    #: the leader lock's key (``redlock_beat_lock_key``)
    redlock_beat_lock_key: str
    #: seconds the leader lock lives without renewal (``redlock_beat_ttl``)
    redlock_beat_ttl: float
    #: seconds between a standby's attempts to take the lock (``redlock_beat_poll``)
    redlock_beat_poll: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._leader: Lock | None = None
        self._standby_tick = False
        self._next_renew = 0.0
        self._next_try = 0.0
        super().__init__(*args, **kwargs)
        app = self.app
        self.redlock_beat_ttl = _seconds(app, "redlock_beat_ttl")
        self.redlock_beat_poll = _seconds(app, "redlock_beat_poll")
        settings = resolve_settings(app)
        key = app.conf.get("redlock_beat_lock_key")
        if key is None:
            key = f"{settings.key_prefix}beat:{app.main or 'celery'}"
        if not isinstance(key, str) or not key:
            raise RedlockConfigError(
                f"the setting redlock_beat_lock_key must be a non-empty str, not {key!r}"
            )
        self.redlock_beat_lock_key = key
        self._settings = settings
        #: this instance's token in the leader lock: host, pid and a random part
        self.redlock_beat_token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"

    # -- leadership -----------------------------------------------------------

    @property
    def redlock(self) -> Redlock:
        """The process's Redlock for the app's settings."""
        return get_redlock(self._settings)

    @property
    def is_leader(self) -> bool:
        """True while this instance holds a leader lock valid for a moment more.

        The margin (a tenth of the TTL, at most 0.5 s) covers the send itself.
        """
        lock = self._leader
        margin = min(0.5, self.redlock_beat_ttl / 10)
        return (
            lock is not None
            and lock.expires_at is not None
            and time.monotonic() + margin < lock.expires_at
        )

    def _try_lead(self) -> None:
        now = time.monotonic()
        if now < self._next_try:
            return
        self._next_try = now + self.redlock_beat_poll
        try:
            self._leader = self.redlock.acquire(
                self.redlock_beat_lock_key,
                self.redlock_beat_ttl,
                self.redlock_beat_token,
                retry_count=0,
            )
        except LockNotAcquired as exc:
            if exc.unavailable:
                logger.warning("beat: cannot reach a quorum for the leader lock: %s", exc)
            else:
                logger.debug("beat: standby; %s is held by another beat", exc.resource)
            return
        except RedlockError as exc:
            logger.error("beat: leader election failed: %s", exc)
            return
        self._next_renew = time.monotonic() + self.redlock_beat_ttl / 3
        logger.info(
            "beat: leader now (lock %s, ttl %ss); sending due tasks",
            self.redlock_beat_lock_key,
            self.redlock_beat_ttl,
        )

    def _renew(self) -> None:
        lock = self._leader
        if lock is None:
            return
        try:
            renewed = self.redlock.extend(lock, self.redlock_beat_ttl)
        except RedlockError as exc:
            logger.error("beat: renewing the leader lock failed: %s", exc)
            renewed = False
        if renewed:
            self._next_renew = time.monotonic() + self.redlock_beat_ttl / 3
        else:
            self._step_down("the leader lock could not be renewed on a quorum")

    def _step_down(self, why: str) -> None:
        if self._leader is not None:
            logger.error("beat: stepping down to standby, sending stopped: %s", why)
        self._leader = None
        self._next_try = time.monotonic() + self.redlock_beat_poll

    # -- the scheduler's hooks -----------------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One scheduler iteration: keep or seek leadership, then tick (dry when standby)."""
        if self._leader is None:
            self._try_lead()
        elif time.monotonic() >= self._next_renew:
            self._renew()
        leading = self._leader is not None
        self._standby_tick = not leading
        try:
            interval = float(super().tick(*args, **kwargs))  # type: ignore[misc]
        finally:
            self._standby_tick = False
        now = time.monotonic()
        wake = self._next_renew if leading else self._next_try
        return max(0.0, min(interval, wake - now))

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Send a due entry, only as a leader whose lock is valid; a standby skips it."""
        if self._standby_tick:
            logger.debug("beat: standby, not sending %s", getattr(entry, "name", entry))
            return
        if not self.is_leader:
            self._step_down("the leader lock's validity ran out before a send")
            return
        super().apply_entry(entry, producer=producer)  # type: ignore[misc]

    def close(self) -> None:
        """Release the leader lock (a standby takes over at once), then close."""
        lock, self._leader = self._leader, None
        if lock is not None:
            try:
                self.redlock.release(lock)
                logger.info("beat: released the leader lock %s", self.redlock_beat_lock_key)
            except RedlockError as exc:  # pragma: no cover - best effort at shutdown
                logger.warning("beat: releasing the leader lock failed: %s", exc)
        super().close()  # type: ignore[misc]


class RedlockScheduler(RedlockSchedulerMixin, PersistentScheduler):  # type: ignore[misc]
    """Celery's default PersistentScheduler with leader election."""
