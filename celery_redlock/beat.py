"""Highly available beat: any number of beat instances, one leader sends.

Run every beat with the scheduler::

    celery -A proj beat -S celery_redlock.beat:RedlockScheduler

Each instance tries to take the leader lock (setting
``redlock_beat_lock_key``, default ``{redlock_key_prefix}beat:{app.main}``)
with a TTL of ``redlock_beat_ttl`` seconds (default 30). The one that holds
it sends due tasks; the process's renewer thread (:mod:`.renewal`) extends
the lock every third of the TTL, also while a send blocks (a broker
reconnecting, a publish lock that waits). The others are standbys: they keep
their schedule in step with the leader (each due entry is advanced as if
sent, but nothing is sent) and try to take the lock every
``redlock_beat_poll`` seconds (default 1), so when the leader dies the next
tick is sent by a standby within the TTL (plus one poll).

Each setting can also be set on a scheduler subclass, as a class attribute
of the same name, which wins over ``app.conf`` (as a task attribute wins
over the app's setting for a task)::

    class QuickFailover(RedlockScheduler):
        redlock_beat_ttl = 5.0

A leader whose renewal fails tries again while its lock is still valid. It
stops sending at once and goes back to standby when a quorum says the key is
gone or holds another beat's token, or when the lock's validity would run
out before a send: it never crashes, and it checks before each send that
its lock is valid for a moment more (a process frozen in the middle of a
send, past its TTL, sends it when it wakes: no lock can stop that).

The leader notes each send that went through in a hash beside the lock
(the lock's key and :data:`SENDS_SUFFIX`, on every node, kept
:data:`SENDS_KEEP` after its last write). A new leader goes on from it:
each entry's last run becomes its last noted send, so a due time a standby
tick advanced past while the old leader was dead (its lock running out) is
sent at once, and one the old leader sent is not sent again (also when the
new leader's clock is behind, by up to ``HANDOVER_SKEW``, 60 s). An entry
no leader noted a send of goes back to its time before this beat's standby
ticks advanced it: no one sent those due times, so the last is sent once.

On a clean shutdown the leader hands the lock over: the lock's token becomes
:data:`HANDOVER_PREFIX` and the leader's last send of each entry, so a
standby (or the next beat to start within ``redlock_beat_ttl``) takes it
over at its next poll, not when the TTL runs out, and goes on from those
sends and the record: an interval entry keeps the old leader's phase, and a
scheduler caching its entries takes the old leader's sends into them.

Limits:

- a leader that dies after a send went out and before it was noted (a few
  milliseconds), or whose notes reached fewer than a quorum of nodes, may
  have that send made again by the next leader; a new leader that cannot
  read the record from a quorum goes on from its own schedule;
- an interval schedule (``"schedule": 10.0``) whose entry no leader sent
  yet has each beat's own phase, counted from when it started;
- with ``redlock_standby_ticks = False`` a standby does not tick; a
  scheduler that keeps its entries in a database (django-celery-beat, which
  re-reads them every 5 minutes and on any change) goes on from the record
  as above, and the new leader stores what it went on from in the entries'
  models, written at the scheduler's next sync (a re-read before that write
  would not undo it: the write comes first).

For a job that must run at most once per period whatever the beats do, make
it a ``RedlockTask`` with ``redlock_hold`` (a period, or a little less): a
second send inside the hold is a duplicate and does not run.

:class:`RedlockSchedulerMixin` wraps any scheduler class::

    from django_celery_beat.schedulers import DatabaseScheduler
    class HADatabaseScheduler(RedlockSchedulerMixin, DatabaseScheduler): ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from celery.beat import PersistentScheduler

from . import renewal
from .config import get_redlock, resolve_settings
from .exceptions import LockNotAcquired, RedlockConfigError, RedlockError
from .redlock import Lock, Redlock

__all__ = ["BEAT_DEFAULTS", "HANDOVER_PREFIX", "RedlockScheduler", "RedlockSchedulerMixin"]

logger = logging.getLogger(__name__)

#: The beat settings (read from ``app.conf``) and their defaults.
BEAT_DEFAULTS: dict[str, Any] = {
    "redlock_beat_lock_key": None,  # None: f"{redlock_key_prefix}beat:{app.main}"
    "redlock_beat_ttl": 30.0,
    "redlock_beat_poll": 1.0,
}


#: On a clean shutdown the leader lock is handed over, not released: its token
#: becomes this prefix and JSON, ``{"from": <old token>, "sent": {<entry name>:
#: <the Unix time of its last send>}}``, for the next leader to take over
#: (``acquire(takeover=token)``) and go on from.
HANDOVER_PREFIX = "handover:"
#: Seconds a handed-over send time may be ahead of this beat's clock and still be
#: taken: an old leader whose clock ran further ahead is not trusted.
HANDOVER_SKEW = 60.0
#: Most bytes of a hand-over token (about 60 per entry): a larger schedule's
#: leader releases its lock instead.
HANDOVER_MAX = 64 * 1024
#: The leader notes each send in a hash beside the lock (the lock's key and this
#: suffix), on every node, for the next leader to go on from also when this one
#: dies without a hand-over.
SENDS_SUFFIX = ":sent"
#: Seconds the record of sends is kept after its last write.
SENDS_KEEP = 35 * 24 * 3600.0


def _handed_time(name: object, stamp: object, limit: float) -> datetime | None:
    """A handed-over Unix time as a UTC datetime; None when it is not a time, or is
    later than ``limit`` (an old leader's clock too far ahead: not trusted)."""
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)):
        return None
    if not stamp >= 0:  # before 1970 (or NaN): not a send time
        return None
    try:
        if not stamp <= limit:
            logger.warning(
                "beat: not taking the old leader's last send of %s: %s is more than %g s "
                "ahead of this beat's clock",
                name,
                stamp,
                HANDOVER_SKEW,
            )
            return None
        when = datetime.fromtimestamp(stamp, timezone.utc)
    except (OverflowError, ValueError, OSError):
        return None
    return when


def _as_entry_time(when: datetime, own: object) -> datetime:
    """A UTC time as an entry keeps its last run (``own``): naive (UTC, as Celery
    reads a naive time) or in its zone."""
    if not isinstance(own, datetime):
        return when
    return when.replace(tzinfo=None) if own.tzinfo is None else when.astimezone(own.tzinfo)


def _setting(scheduler: object, app: Any, name: str) -> tuple[Any, str]:
    """A beat setting's value: the scheduler class's attribute when not None, else
    ``app.conf``'s; and how an error names where it came from."""
    value = getattr(type(scheduler), name, None)
    if value is not None:
        return value, f"the attribute {name} of {type(scheduler).__name__}"
    return app.conf.get(name), f"the setting {name}"


def _seconds(scheduler: object, app: Any, name: str) -> float:
    value, where = _setting(scheduler, app, name)
    if value is None:
        value = BEAT_DEFAULTS[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not value > 0
    ):
        raise RedlockConfigError(
            f"{where} must be a finite number of seconds > 0 "
            f"(default {BEAT_DEFAULTS[name]}), not {value!r}"
        )
    return float(value)


def _app_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The app a Scheduler is constructed with: ``Scheduler(app, ...)`` or ``app=``."""
    return kwargs["app"] if "app" in kwargs else args[0] if args else None


class RedlockSchedulerMixin:
    """Leader election for a :class:`celery.beat.Scheduler` subclass.

    Put it first in the bases: ``class S(RedlockSchedulerMixin, SomeScheduler)``.
    """

    app: Any
    max_interval: float

    # Each defaults to None, meaning ``app.conf``'s setting of the same name (or
    # its default); read once, when the scheduler is built, and then set on the
    # instance to the value in use.

    #: The leader lock's key (default ``{redlock_key_prefix}beat:{app.main}``).
    redlock_beat_lock_key: Any = None
    #: Seconds the leader lock lives without renewal (default 30).
    redlock_beat_ttl: Any = None
    #: Seconds between a standby's attempts to take the lock (default 1).
    redlock_beat_poll: Any = None
    #: Whether a standby ticks its own schedule dry (advancing entries without
    #: sending) to stay in step with the leader. True for schedulers that keep
    #: their state per instance (PersistentScheduler's file); set it False for
    #: one whose state all beats share (django-celery-beat's database, RedBeat's
    #: Redis), where the leader's ticks already advance it.
    redlock_standby_ticks: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._leader: Lock | None = None
        #: the renewer thread's watch on the leader lock: renewed also while a send
        #: blocks, and marked lost when the lock is
        self._watch: renewal.Watch | None = None
        self._standby_tick = False
        #: entry name -> its last run as this beat's schedule had it before a standby
        #: tick first advanced it without sending (see :meth:`_catch_up`)
        self._dry_from: dict[str, Any] = {}
        self._bids = 0
        #: entry name -> Unix time of its last send this beat knows of: its own
        #: (successful) sends as leader, and those a hand-over gave it
        self._sent: dict[str, float] = {}
        self._next_try = 0.0
        self._complaint = ""
        # Settings first: a bad one fails before the scheduler opens its store.
        app = _app_of(args, kwargs)
        if app is None:
            name = type(self).__name__
            raise TypeError(f"{name} needs the Celery app: {name}(app, ...) or {name}(app=app)")
        self._ttl = _seconds(self, app, "redlock_beat_ttl")
        self._poll = _seconds(self, app, "redlock_beat_poll")
        settings = resolve_settings(app)
        key, where = _setting(self, app, "redlock_beat_lock_key")
        if key is None:
            key = f"{settings.key_prefix}beat:{app.main or 'celery'}"
        if not isinstance(key, str) or not key:
            raise RedlockConfigError(
                f"{where} must be a non-empty str "
                f"(default: '{{redlock_key_prefix}}beat:{{app.main}}'), not {key!r}"
            )
        self._key: str = key
        self.redlock_beat_lock_key = key
        self.redlock_beat_ttl = self._ttl
        self.redlock_beat_poll = self._poll
        self._settings = settings
        #: this instance's name: host, pid and a random part; its token in the leader
        #: lock is the name and the number of its bid (a new token each bid, so what
        #: a failed bid left on a node is never re-armed by the next)
        self._name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.redlock_beat_token = self._name
        super().__init__(*args, **kwargs)

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
        margin = min(0.5, self._ttl / 10)
        watch = self._watch
        return (
            lock is not None
            and not (watch is not None and watch.lost)
            and lock.expires_at is not None
            and time.monotonic() + margin < lock.expires_at
        )

    def _try_lead(self) -> None:
        now = time.monotonic()
        if now < self._next_try:
            return
        self._next_try = now + self._poll
        self._sent = {}  # what others sent is known from the record and a hand-over
        self._bids += 1
        self.redlock_beat_token = f"{self._name}.{self._bids}"
        try:
            self._leader = self.redlock.acquire(
                self._key,
                self._ttl,
                self.redlock_beat_token,
                retry_count=0,
            )
            handed = None
        except LockNotAcquired as exc:
            if exc.unavailable:
                self._complain(
                    logging.WARNING, "beat: cannot reach a quorum for the leader lock: %s", exc
                )
                return
            try:  # who holds it: the old leader may have handed it over as it stopped
                handed = self.redlock.holder(self._key)
            except RedlockError:
                handed = None
            if handed is None or not handed.startswith(HANDOVER_PREFIX):
                self._standby_note(handed)
                return
            try:  # take it over
                self._leader = self.redlock.acquire(
                    self._key, self._ttl, self.redlock_beat_token, retry_count=0, takeover=handed
                )
            except RedlockError:
                self._standby_note(None)  # another beat took it first
                return
        except RedlockError as exc:
            self._complain(logging.ERROR, "beat: leader election failed: %s", exc)
            return
        except BaseException:
            # Stopped mid-election (a SIGTERM's SystemExit): the nodes that answered may
            # hold this beat's token, which no one would free before its TTL; every
            # other beat would wait that out. This beat is going: free it.
            with contextlib.suppress(Exception):
                self.redlock.release(self._key, self.redlock_beat_token)
            raise
        lock = self._leader
        assert lock is not None
        self._watch = renewal.watch(lock, self._ttl, self._on_lost)
        self._catch_up()
        if handed is not None:
            try:
                self._go_on_from(handed)
            except Exception as exc:  # a token not of ours: go on from this beat's own state
                logger.warning("beat: the handed-over leader lock could not be read: %r", exc)
        self._complaint = ""
        logger.info(
            "beat: leader now (lock %s, ttl %ss); sending due tasks",
            self._key,
            self._ttl,
        )

    def _on_lost(self, watch: renewal.Watch) -> None:
        """From the renewer thread: the leader lock is lost (the key is gone or another
        beat's on a quorum, or it could not be renewed before its validity ran out).
        Sending stops at once (:attr:`is_leader`); the next tick steps down."""
        logger.error(
            "beat: the leader lock %s is lost (no longer this beat's on a quorum, or not "
            "renewed in time); sending stops",
            self._key,
        )

    def _sends_key(self) -> str:
        return self._key + SENDS_SUFFIX

    def _note_send(self, name: str, when: float) -> None:
        """Note a send in the record beside the lock (best effort: a failure is logged)."""
        try:
            taken = self.redlock.raise_times(self._sends_key(), {name: when}, SENDS_KEEP)
        except Exception as exc:
            taken, why = 0, f": {exc}"
        else:
            why = ""
        if taken < self.redlock.quorum:
            logger.warning(
                "beat: the send of %s was noted on %d of %d nodes%s; if this beat dies "
                "before its next send of it, the next leader may send it again",
                name,
                taken,
                len(self.redlock.nodes),
                why,
            )

    def _catch_up(self) -> None:
        """As a new leader, go on from the last sends any leader noted (the record
        beside the lock): each entry's last run becomes its last noted send, also
        when a standby tick had advanced it past a due time that the old leader,
        dead since, never sent; and an entry no leader noted a send of goes back
        to its time before this beat's standby ticks advanced it (no one sent
        those due times). Due times missed that way are then sent, once."""
        try:
            noted, answered = self.redlock.read_times(self._sends_key())
        except Exception as exc:
            logger.warning("beat: the record of sends could not be read: %s", exc)
            noted, answered = {}, 0
        dry, self._dry_from = self._dry_from, {}
        if answered < self.redlock.quorum:
            logger.warning(
                "beat: the record of sends answered from %d of %d nodes: going on from "
                "this beat's own schedule",
                answered,
                len(self.redlock.nodes),
            )
            return
        limit = time.time() + HANDOVER_SKEW
        schedule = self.schedule  # type: ignore[attr-defined]
        changed = 0
        for name, entry in schedule.items():
            own = getattr(entry, "last_run_at", None)
            stamp = noted.get(str(name))
            when: datetime | None
            if stamp is not None:
                when = _handed_time(name, stamp, limit)
                if when is None:
                    continue
                self._sent[str(name)] = float(stamp)
                when = _as_entry_time(when, own)
            else:
                before = dry.get(str(name))
                if not isinstance(before, datetime):
                    continue
                when = before
            model = getattr(getattr(entry, "model", None), "last_run_at", when)
            # (A database scheduler's tick moves the model, not the entry it keeps.)
            if when != own or when != model:
                self._set_last_run(str(name), entry, when)
                changed += 1
        if changed and hasattr(self, "_heap"):
            self._heap = None  # Celery's scheduler re-reads every entry's next time
        if changed:
            logger.info("beat: %d entries go on from the last sends noted by any leader", changed)
        # Notes of entries gone from the schedule, not sent for SENDS_KEEP, are dropped
        # (a database schedule's one-off tasks would add a field each for good).
        old = time.time() - SENDS_KEEP
        stale = [n for n, t in noted.items() if t < old and n not in schedule]
        if stale:
            with contextlib.suppress(Exception):
                self.redlock.raise_times(self._sends_key(), {}, SENDS_KEEP, forget=stale)

    def _go_on_from(self, token: str) -> None:
        """Take the old leader's sends into this beat's schedule.

        ``sent``: each entry's last send, as the old leader knew it exactly
        (its own sends, or a hand-over's): taken as this beat's own, so the
        new leader neither sends again what the old one sent (its clock
        behind the old leader's, or entries it caches from before) nor keeps
        a phase of its own for an interval schedule, and it sends what the
        old leader had not. ``since``: other entries' last run as the old
        leader's schedule had it: only moves an entry's time forward. A time
        further ahead of this beat's clock than ``HANDOVER_SKEW`` is not taken.
        """
        data = json.loads(token[len(HANDOVER_PREFIX) :])
        sent = data.get("sent") if isinstance(data, dict) else None
        since = data.get("since") if isinstance(data, dict) else None
        sent = sent if isinstance(sent, dict) else {}
        since = since if isinstance(since, dict) else {}
        limit = time.time() + HANDOVER_SKEW
        schedule = self.schedule  # type: ignore[attr-defined]
        taken = 0
        for exact, times in ((True, sent), (False, since)):
            for name, stamp in times.items():
                entry = schedule.get(name)
                when = _handed_time(name, stamp, limit)
                if entry is None or when is None:
                    continue
                own = getattr(entry, "last_run_at", None)
                when = _as_entry_time(when, own)
                if not exact and isinstance(own, datetime) and when <= own:
                    continue
                self._set_last_run(str(name), entry, when)
                if exact:
                    self._sent[str(name)] = float(stamp)
                taken += 1
        if taken and hasattr(self, "_heap"):
            self._heap = None  # Celery's scheduler re-reads every entry's next time
        logger.info(
            "beat: took the leader lock over from %s; %d entries go on from its sends",
            data.get("from", "?") if isinstance(data, dict) else "?",
            taken,
        )

    def _set_last_run(self, name: str, entry: Any, when: datetime) -> None:
        """Set ``entry``'s last run; for a scheduler keeping its entries in a database
        (django-celery-beat's ModelEntry), in the model too, marked for its next
        write: it re-reads its entries from the database now and then, and would
        otherwise take back what it had stored before."""
        entry.last_run_at = when
        model = getattr(entry, "model", None)
        if model is not None and hasattr(model, "last_run_at"):
            model.last_run_at = when
            dirty = getattr(self, "_dirty", None)
            if isinstance(dirty, set):
                dirty.add(name)

    def _handed_over_times(self) -> dict[str, dict[str, float]]:
        """What a hand-over carries: ``sent``, each entry's last send this beat knows
        exactly; ``since``, the other entries' last run as its schedule has it (the
        shared model's for a scheduler that caches its entries)."""
        since: dict[str, float] = {}
        for name, entry in self.schedule.items():  # type: ignore[attr-defined]
            if name in self._sent:
                continue
            model = getattr(entry, "model", None)  # django-celery-beat's ModelEntry
            last = getattr(model, "last_run_at", None) or getattr(entry, "last_run_at", None)
            if isinstance(last, datetime):
                if last.tzinfo is None:  # as celery.schedules reads it
                    last = last.replace(tzinfo=timezone.utc)
                since[str(name)] = last.timestamp()
        return {"sent": dict(self._sent), "since": since}

    def _standby_note(self, holder: str | None) -> None:
        """Say once at INFO (then at DEBUG) who leads (``holder``, the lock's token when
        read): a beat that stays standby for good (another project's beat on the
        same key) can be told from its log."""
        if self._complaint == "standby":
            logger.debug("beat: standby; %s is held by another beat", self._key)
            return
        self._complaint = "standby"
        logger.info(
            "beat: standby; the leader lock %s is held by %s (host:pid:id); this beat "
            "takes over when it is released or expires",
            self._key,
            holder or "another beat",
        )

    def _complain(self, level: int, msg: str, *args: object) -> None:
        """Log a failure to lead; the same kind again, until it changes, only at DEBUG."""
        kind = msg if level > logging.DEBUG else ""
        logger.log(level if kind != self._complaint else logging.DEBUG, msg, *args)
        self._complaint = kind

    def _stop_renewing(self) -> None:
        watch, self._watch = self._watch, None
        if watch is None:
            return
        try:
            watch.cancel()  # waits out a renewal in flight
        except BaseException:
            # Interrupted while waiting (SIGTERM's SystemExit): no renewal after the
            # one in flight, or the lock would be kept alive for the process's life.
            watch.cancelled = True
            raise

    def _step_down(self, why: str) -> None:
        lock, self._leader = self._leader, None
        self._next_try = time.monotonic() + self._poll
        self._stop_renewing()
        dirty = getattr(self, "_dirty", None)
        if isinstance(dirty, set) and lock is not None:
            # A database scheduler's entries this beat changed as leader, not yet
            # written: written later (at close), they could go over the new leader's
            # newer writes. The sends among them are noted; the new leader stores them.
            dirty.clear()
        if lock is None:
            return
        logger.error("beat: stepping down to standby, sending stopped: %s", why)
        # Where the key still holds this token, free it: a standby need not wait for the TTL.
        try:
            self.redlock.release(lock)
        except RedlockError as exc:  # pragma: no cover - best effort
            logger.debug("beat: releasing the leader lock after stepping down failed: %s", exc)

    # -- the scheduler's hooks -----------------------------------------------

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One scheduler iteration: keep or seek leadership, then tick (dry when standby)."""
        if self._leader is None:
            self._try_lead()
        elif self._watch is None or self._watch.lost:
            self._step_down("the leader lock was lost")
        leading = self._leader is not None
        if not leading and not self.redlock_standby_ticks:
            return max(0.0, self._next_try - time.monotonic())
        self._standby_tick = not leading
        try:
            interval = float(super().tick(*args, **kwargs))  # type: ignore[misc]
        finally:
            self._standby_tick = False
        if leading:  # (the renewer thread keeps the lock)
            return max(0.0, interval)
        return max(0.0, min(interval, self._next_try - time.monotonic()))

    @property
    def info(self) -> str:
        """The banner lines ``celery beat`` prints: the scheduler's, and the leader lock's."""
        base = str(super().info)  # type: ignore[misc]
        mine = (
            f"    . redlock leader lock -> {self._key} "
            f"(ttl {self._ttl:g} s, standby poll {self._poll:g} s)"
        )
        return f"{base}\n{mine}" if base else mine

    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        """Send a due entry, only as a leader whose lock is valid; a standby skips it."""
        if self._standby_tick:
            name = str(getattr(entry, "name", entry))
            logger.debug("beat: standby, not sending %s", name)
            # (The due time the tick now advances past: see _catch_up.)
            self._dry_from.setdefault(name, getattr(entry, "last_run_at", None))
            return
        if not self.is_leader:
            name = str(getattr(entry, "name", entry))
            logger.warning("beat: not sending %s: the leader lock's validity ran out first", name)
            # (Celery's tick has advanced it past this due time: see _catch_up.)
            self._dry_from.setdefault(name, getattr(entry, "last_run_at", None))
            self._step_down("the leader lock's validity ran out before a send")
            return
        super().apply_entry(entry, producer=producer)  # type: ignore[misc]

    def apply_async(self, entry: Any, *args: Any, **kwargs: Any) -> Any:
        """Send ``entry``, only as a leader whose lock is valid (also for a scheduler
        that sends without :meth:`apply_entry`, as RedBeat does); a send that went
        through is noted for a hand-over."""
        if self._standby_tick or not self.is_leader:
            self.apply_entry(entry)  # says why, and steps down when the lock ran out
            return None
        # The time the send began (its due time, about): a send blocked past the
        # entry's next due time must not be noted as covering that one too.
        began = time.time()
        result = super().apply_async(entry, *args, **kwargs)  # type: ignore[misc]
        self._sent[str(entry.name)] = began
        self._note_send(str(entry.name), began)
        return result

    def close(self) -> None:
        """Hand the leader lock over (a standby takes it at its next poll), then close.

        The lock's token becomes :data:`HANDOVER_PREFIX` and the last send of
        each entry this beat knows of (its own sends that went through, and
        those handed to it), for ``redlock_beat_ttl`` seconds: the next leader
        goes on from those sends. A send cut short or failed is not among
        them. When the token would pass :data:`HANDOVER_MAX` bytes, or the
        hand-over fails, the lock is released.
        """
        lock, self._leader = self._leader, None
        self._stop_renewing()
        if lock is not None:
            try:
                token = HANDOVER_PREFIX + json.dumps(
                    {"from": lock.value, **self._handed_over_times()},
                    separators=(",", ":"),
                    sort_keys=True,
                )
                if len(token) <= HANDOVER_MAX and self.redlock.reassign(lock, token, self._ttl):
                    logger.info("beat: handed the leader lock %s over", self._key)
                else:
                    self.redlock.release(lock)
                    logger.info("beat: released the leader lock %s", self._key)
            except Exception as exc:  # best effort at shutdown: the lock then expires
                logger.warning("beat: handing the leader lock over failed: %s", exc)
        super().close()  # type: ignore[misc]


class RedlockScheduler(RedlockSchedulerMixin, PersistentScheduler):  # type: ignore[misc]
    """Celery's default PersistentScheduler with leader election."""
