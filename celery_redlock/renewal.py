"""Keeping held locks alive: one renewer thread per process.

:func:`watch` hands a held :class:`~celery_redlock.redlock.Lock` to the
process's :class:`Renewer`, which re-arms it with ``extend(ttl)`` every
``ttl / 3`` seconds until :meth:`Watch.cancel` is called. When the lock is
lost, the watch's ``on_lost`` callback is called once, from the renewer
thread, and the lock is no longer renewed. A lock counts as lost when:

- a quorum can no longer hold it: enough nodes answered that the key is
  gone or holds another token (taken over, expired, force-released); or
- it could not be re-armed before its validity ran out (nodes erred or
  timed out on every try). A failed renewal that leaves time is retried
  sooner (a third of what is left), so one slow reply does not lose a lock.

There is one thread per process, started lazily by the first :func:`watch`.
A forked child does not inherit the thread nor the parent's watches: its
first :func:`watch` starts its own.

This module does not import celery.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _process
from .exceptions import LockExtendError, Vote
from .redlock import MAX_TTL, Lock

__all__ = ["Renewer", "Watch", "get_renewer", "watch"]

_log = logging.getLogger(__name__)

#: Renew at this share of the TTL.
RENEW_SHARE = 1 / 3
#: The longest TTL or interval a watch takes: the longest lock TTL (10 years).
MAX_WAIT = MAX_TTL
#: Never renew more often than this (seconds), however short the TTL.
MIN_INTERVAL = 0.01
#: Seconds the thread may oversleep so that watches due close together share a wake-up.
SLACK = 0.05
#: Drop cancelled watches from the queue once it holds this many entries (doubling after).
COMPACT_AT = 1024
#: With no live watch queued, the thread sleeps for the last watch's interval (a new watch
#: like it is due no sooner), doubling while none comes, up to this many seconds.
IDLE_MAX = 60.0

OnLost = Callable[["Watch"], object]


class Watch:
    """One lock kept alive by a :class:`Renewer`.

    ``lost`` becomes True when the lock is lost (before ``on_lost`` is
    called); ``renewals`` counts the successful extends.
    """

    __slots__ = ("_busy", "cancelled", "interval", "lock", "lost", "on_lost", "renewals", "ttl")

    def __init__(self, lock: Lock, ttl: float, interval: float, on_lost: OnLost | None) -> None:
        self.lock = lock
        self.ttl = ttl
        self.interval = interval
        self.on_lost = on_lost
        self.cancelled = False
        self.lost = False
        self.renewals = 0
        # Held while a renewal, or the on_lost call after it, is in flight (an RLock:
        # on_lost may cancel its own watch).
        self._busy = threading.RLock()

    def cancel(self) -> None:
        """Stop renewing. Idempotent.

        Returns once no renewal is in flight, so the caller may then release
        the lock, or re-arm it with a TTL of its own, and no late renewal
        overwrites that TTL.
        """
        with self._busy:
            self.cancelled = True

    def __repr__(self) -> str:
        state = "lost" if self.lost else "cancelled" if self.cancelled else "watched"
        return f"<Watch {self.lock.resource!r} every {self.interval:.3g}s {state}>"


class Renewer:
    """Renews watched locks from one daemon thread, started on first use.

    ``clock`` and ``sleep``-free waiting make it testable with a fake clock:
    the thread waits on a condition until the next renewal is due.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, name: str = "celery-redlock-renewer"
    ) -> None:
        self.clock = clock
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[tuple[float, int, Watch]] = []
        self._seq = itertools.count()
        self._compact_at = COMPACT_AT
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: The time the waiting thread waits for (None: it is not waiting): a watch due
        #: before it wakes the thread, a later one does not (the thread, woken for
        #: the first due, handles every watch due by then, also ones pushed meanwhile).
        self._waiting_for: float | None = None
        #: The interval of the last watch queued.
        self._last_interval = MIN_INTERVAL
        #: How many times the thread woke up (the tests read it).
        self.wakeups = 0

    def _ensure_own(self) -> None:
        if self._pid != _process.pid():  # a forked child: nothing of the parent's is ours
            self._reset()

    def watch(
        self,
        lock: Lock,
        ttl: float,
        on_lost: OnLost | None = None,
        *,
        interval: float | None = None,
    ) -> Watch:
        """Keep ``lock`` alive by extending it to ``ttl`` seconds every ``interval``.

        ``interval`` defaults to ``ttl / 3``. ``lock.manager`` must be set.
        Returns the :class:`Watch`; call its ``cancel()`` before releasing.
        """
        if lock.manager is None:
            raise ValueError(f"lock {lock.resource!r} has no manager to extend it with")
        for name, value in (("ttl", ttl), ("interval", interval)):
            if value is not None and not (0 < value <= MAX_WAIT):
                # (The thread's wait would overflow, and the thread end: every other
                # watch would go unrenewed.)
                raise ValueError(f"{name} must be in (0, {MAX_WAIT:g}] seconds, not {value!r}")
        every = max(MIN_INTERVAL, ttl * RENEW_SHARE if interval is None else interval)
        item = Watch(lock, ttl, every, on_lost)
        self._ensure_own()
        with self._cond:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                # (A thread a stop() did not wait out, still in a renewal, sees it is
                # no longer the current one and ends after it.)
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._push(self.clock() + every, item)
        return item

    def _push(self, due: float, item: Watch) -> None:
        if self._stopping:
            return  # stop() dropped the watches: a renewal in flight does not bring one back
        if len(self._queue) >= self._compact_at:  # cancelled watches wait until due: drop them
            self._queue = [entry for entry in self._queue if not entry[2].cancelled]
            heapq.heapify(self._queue)
            self._compact_at = max(COMPACT_AT, 2 * len(self._queue))
        heapq.heappush(self._queue, (due, next(self._seq), item))
        self._last_interval = item.interval
        if self._waiting_for is None or due < self._waiting_for:
            self._cond.notify_all()  # the current thread, and any old one still to end

    def cancel(self, item: Watch) -> None:
        """Stop renewing ``item`` (same as ``item.cancel()``)."""
        item.cancel()

    def __len__(self) -> int:
        """How many watches are still renewed."""
        with self._cond:
            return sum(1 for _, _, w in self._queue if not (w.cancelled or w.lost))

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread (watches are dropped, not released)."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the thread ---------------------------------------------------------------

    def _next_due(self) -> Watch | None:
        """Wait until a live watch is due; None when stopping.

        A cancelled watch is dropped when it reaches the head of the queue,
        without waiting for its time: the thread sleeps until the first live
        watch is due (oversleeping a little, a tenth of the interval, at most
        ``SLACK``, so that watches due close together share a wake-up). So a
        stream of short runs, each watched and cancelled long before its
        renewal, costs the thread about one wake-up per interval, not one per
        run. With no live watch queued it sleeps for the last watch's interval
        (a new watch like it is due no sooner), doubling while none comes, up to
        ``IDLE_MAX``. A new watch due before the time the thread waits for
        wakes it (:meth:`_push`).
        """
        with self._cond:
            idle: float | None = None
            while not self._stopping and self._thread is threading.current_thread():
                queue = self._queue  # (compaction replaces the list)
                arrived = bool(queue)
                while queue and queue[0][2].cancelled:
                    heapq.heappop(queue)
                now = self.clock()
                if queue:
                    due, _, item = queue[0]
                    if due <= now:
                        heapq.heappop(queue)
                        return item
                    self._waiting_for = due
                    wait = due - now + min(SLACK, item.interval / 10)
                    idle = None
                else:
                    if idle is None or arrived:
                        idle = self._last_interval
                    else:  # nothing came while it slept
                        idle = min(2 * idle, IDLE_MAX)
                    wait = idle
                    self._waiting_for = now + wait
                try:
                    self._cond.wait(wait)
                finally:
                    self._waiting_for = None
                    self.wakeups += 1
            return None

    def _run(self) -> None:
        while True:
            item = self._next_due()
            if item is None:
                return
            try:
                self._renew(item)
            except Exception:  # never let the thread die; the watch is off the queue now
                _log.exception("renewal of lock %r failed unexpectedly", item.lock.resource)
                with item._busy:
                    if not item.cancelled and not item.lost:
                        item.lost = True  # no longer renewed: its holder must be told
                        self._tell_lost(item)

    def _renew(self, item: Watch) -> None:
        # on_lost is called under _busy too: a cancel() that returned (the run
        # ended) is never followed by a "lost" call for that run.
        with item._busy:
            if item.cancelled:
                return
            # Cancelled meanwhile without waiting for this renewal (a run's end cut
            # short by a signal handler, which then freed the key): not "lost".
            if self._extend(item) and not item.cancelled:
                self._tell_lost(item)

    @staticmethod
    def _tell_lost(item: Watch) -> None:
        if item.on_lost is not None:
            try:
                item.on_lost(item)
            except Exception:
                _log.exception("the on_lost callback of lock %r raised", item.lock.resource)

    def _extend(self, item: Watch) -> bool:
        """Renew ``item`` once and schedule the next try; True when the lock is lost."""
        lock = item.lock
        manager = lock.manager
        assert manager is not None
        lost_now = False
        try:
            ok = manager.extend(lock, item.ttl, strict=True)
        except LockExtendError as exc:
            ok = False
            nodes = len(manager.nodes)
            gone = sum(1 for v in exc.votes if v.vote is Vote.HELD)
            # No votes: the lock had expired before the extend was even sent.
            lost_now = not exc.votes or gone > nodes - manager.quorum
        except Exception as exc:  # a transport failure; treat as "no answer"
            _log.debug("renewal of lock %r raised %r", lock.resource, exc)
            ok = False
        if ok:
            item.renewals += 1
            with self._cond:
                self._push(self.clock() + item.interval, item)
            return False
        remaining = lock.remaining
        if not lost_now and remaining is not None and remaining > MIN_INTERVAL:
            _log.debug(
                "renewal of lock %r failed; %.3fs left, trying again", lock.resource, remaining
            )
            with self._cond:
                self._push(self.clock() + max(MIN_INTERVAL, remaining / 3), item)
            return False
        item.lost = True
        return True


_renewers = _process.PerProcess(Renewer)


def get_renewer() -> Renewer:
    """This process's :class:`Renewer` (a forked child gets its own)."""
    return _renewers.get()


def watch(lock: Lock, ttl: float, on_lost: OnLost | None = None, **kwargs: Any) -> Watch:
    """Keep ``lock`` alive from this process's renewer thread; see :meth:`Renewer.watch`."""
    return get_renewer().watch(lock, ttl, on_lost, **kwargs)
