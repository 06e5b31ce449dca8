"""Releases that did not reach every node, sent again once the node answers.

A release, or a failed attempt's undo, that a node did not get (it timed
out, or was skipped during its cool-down after a failure) would leave the
key there until its TTL. When the nodes left out were a majority (they
stalled past the node timeout together, then came back), that key is held
on a quorum with no one behind it: every other contender is refused until
it expires.

So such a delete is kept here and sent again, only to the nodes that did
not get it, from one daemon thread per process: first when their cool-down
ends, then with a doubling delay (up to 8 s), until each node answered. A
node that answers "not held" is asked once more at the next send, because
a SET left queued on a connection that timed out can be applied after a
delete sent on a new one. This goes on past the key's TTL, since a stalled
node applies a queued SET, with its whole TTL, only when it wakes; a node
that never answers is given up a TTL (at least a minute) past it. The
delete is the token-checked release script: it never removes a key that
another token holds. :class:`~celery_redlock.redlock.Redlock` keeps only
what it knows the TTL of, with a token it knows is not taken again
elsewhere: the release of a ``Lock`` it armed (to the nodes that may hold
it), and the undo of an attempt with a new token.

A new acquire or hand-over of the same key and token in this process
first drops what is kept for them (waiting for a send in flight), so a
late delete never removes a lock taken again with the same token; closing
the manager drops what it kept. A forked child keeps nothing of its
parent's.

This module does not import celery.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import _process, _scripts
from ._nodes import NODE_COOLDOWN, Fanout

__all__ = ["Resender", "drop", "forget", "get_resender", "resend"]

_log = logging.getLogger("celery_redlock.redlock")

#: Longest wait between two sends to a node that still does not answer (seconds).
MAX_BACKOFF = 8.0


@dataclass(eq=False)
class _Item:
    fanout: weakref.ref[Fanout]
    key: bytes
    token: str
    #: node indexes still to be sent the delete
    targets: set[int]
    due: float
    #: when the key expires by its TTL, had no node stalled
    until: float
    #: nothing is sent after this, whatever the nodes answered (see _send)
    cap: float
    backoff: float = NODE_COOLDOWN
    #: nodes that answered "not held" once: asked once more, then left
    answered: set[int] = field(default_factory=set)
    #: being sent now, by the thread (outside the condition's lock)
    sending: bool = False
    #: dropped (forget, drop): never sent again, removed once not being sent
    gone: bool = False


#: Seconds past the key's TTL a node that never answered is still sent the delete:
#: a stalled node applies a queued SET (with its whole TTL) only when it wakes.
LATE_MARGIN = 60.0


class Resender:
    """Sends kept deletes again from one daemon thread, started on first use.

    An item stays listed while the thread sends it, so a ``forget`` always
    finds it: it is marked gone, and ``forget`` waits until no send of it is in
    flight (``drop`` marks them gone without waiting: a gone item is never sent
    again). Items are indexed by manager, key and token, so a ``forget`` costs
    the same however many are kept.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        # Reentrant: drop() runs from a manager's finalizer, which a garbage
        # collection may start in this very module, with the lock held.
        self._cond = threading.Condition(threading.RLock())
        self._items: list[_Item] = []
        self._index: dict[tuple[int, bytes, str], list[_Item]] = {}
        self._thread: threading.Thread | None = None
        #: deletes that freed a key (the tests read it)
        self.freed = 0

    def _ensure_own(self) -> None:
        if self._pid != _process.pid():  # a forked child: nothing of the parent's is ours
            self._reset()

    def pending(self, key: bytes) -> int:
        """How many deletes of ``key`` are kept (the tests read it)."""
        with self._cond:
            return sum(1 for i in self._items if i.key == key and not i.gone)

    def add(
        self, fanout: Fanout, key: bytes, token: str, targets: Iterable[int], until: float
    ) -> None:
        """Send the release of ``key`` holding ``token`` again to ``targets``: until
        each answered, past ``until`` (the key's TTL) for a node that had not."""
        nodes = set(targets)
        if not nodes:
            return
        self._ensure_own()
        now = self.clock()
        cap = max(until, now) + max(until - now, LATE_MARGIN)
        due = self._due(fanout, nodes, now)
        item = _Item(weakref.ref(fanout), key, token, nodes, due, until, cap)
        with self._cond:
            self._items.append(item)
            self._index.setdefault((id(fanout), key, token), []).append(item)
            self._cond.notify_all()
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(
                    target=self._run, name="celery-redlock-resender", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # the interpreter is shutting down: keys expire by TTL
                    item.gone = True
                    self._prune()
                    return
                self._thread = thread

    def forget(self, fanout: Fanout, key: bytes, token: str) -> tuple[set[int], float] | None:
        """Drop what is kept for ``key`` and ``token``, once no send of it is in flight.

        Returns the nodes it was still to reach and until when (None: nothing
        was kept), for a caller that fails to take the key to keep it again.
        Interrupted while it waits (a signal handler's exception), it drops
        nothing.
        """
        if not self._items:  # (items leave the list only after their send)
            return None
        with self._cond:
            mine = [i for i in self._index.get((id(fanout), key, token), ()) if not i.gone]
            mine = [i for i in mine if i.fanout() is fanout]
            if not mine:
                return None
            targets: set[int] = set()
            until = 0.0
            for item in mine:
                item.gone = True
                targets |= item.targets
                until = max(until, item.until)
            try:
                while any(i.sending for i in mine):
                    self._cond.wait(1.0)
            except BaseException:
                for item in mine:  # interrupted: keep them, as if never asked
                    item.gone = False
                raise
            self._prune()
        return targets, until

    def drop(self, fanout: Fanout) -> None:
        """Drop everything kept for ``fanout`` (its manager is closed); never sent again."""
        if not self._items:
            return
        with self._cond:
            for item in self._items:
                if item.fanout() is fanout:
                    item.gone = True
            self._prune()

    def _prune(self) -> None:
        """Unlist the gone items no send holds (with the condition's lock held)."""
        if not any(i.gone and not i.sending for i in self._items):
            return
        self._items = [i for i in self._items if not i.gone or i.sending]
        index: dict[tuple[int, bytes, str], list[_Item]] = {}
        for item in self._items:
            fanout = item.fanout()
            if fanout is not None:
                index.setdefault((id(fanout), item.key, item.token), []).append(item)
        self._index = index

    @staticmethod
    def _due(fanout: Fanout, nodes: set[int], now: float) -> float:
        """When the cool-down of the nodes ends (the first of them), at least a moment
        from now."""
        ends = [fanout.cooling_until(i) for i in nodes]
        return max(now + 0.05, min(ends) + 0.01)

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._thread is not threading.current_thread():
                        return
                    now = self.clock()
                    due = [i for i in self._items if i.due <= now and not i.gone]
                    if due:
                        break
                    if not self._items:
                        self._cond.wait(60.0)
                        if not self._items:
                            self._thread = None  # idle: the next add starts another
                            return
                        continue
                    self._cond.wait(min(i.due for i in self._items) - now)
                for item in due:
                    item.sending = True
            kept: list[bool] = []
            try:
                for item in due:
                    keep = False
                    try:
                        keep = not item.gone and self._send(item)
                    except Exception:  # never let the thread die; this delete is dropped
                        _log.exception("sending the release of %r again failed", item.key)
                    kept.append(keep)
            finally:
                with self._cond:
                    for i, item in enumerate(due):
                        item.sending = False
                        if i >= len(kept) or not kept[i]:
                            item.gone = True
                    self._prune()
                    self._cond.notify_all()  # a forget() waiting for a send in flight

    def _send(self, item: _Item) -> bool:
        """Send ``item``'s delete to its nodes once; True while it is to be sent again.

        A node is done when it answers that it deleted the key, or answers "not
        held" twice (a SET still queued on a connection that timed out can be
        applied after the first). That holds past ``until`` (the key's TTL) too:
        a stalled node applies a queued SET, with its whole TTL, only when it
        wakes. Nothing is sent after ``cap``.
        """
        fanout = item.fanout()
        now = self.clock()
        if fanout is None or now >= item.cap:
            return False
        targets = sorted(item.targets)
        replies = fanout.script(_scripts.RELEASE, (item.key,), (item.token,), targets=targets)
        failed = set()
        for i in targets:
            reply = replies[i]
            if isinstance(reply, Exception):
                failed.add(i)
            elif reply == 1 and type(reply) is int:
                item.targets.discard(i)
                self.freed += 1
                _log.info(
                    "lock %r: a release that had not reached %s was sent again and freed it",
                    item.key.decode(errors="replace"),
                    fanout.nodes[i].name,
                )
            elif i in item.answered:
                item.targets.discard(i)
            else:
                item.answered.add(i)
        if not item.targets:
            return False
        now = self.clock()
        if failed:
            item.due = max(now + item.backoff, self._due(fanout, failed, now))
            item.backoff = min(MAX_BACKOFF, 2 * item.backoff)
        else:
            item.due = now + NODE_COOLDOWN
        return True


_resenders = _process.PerProcess(Resender)


def get_resender() -> Resender:
    """This process's :class:`Resender` (a forked child gets its own)."""
    return _resenders.get()


def resend(fanout: Fanout, key: bytes, token: str, targets: Iterable[int], until: float) -> None:
    """Keep a delete that ``targets`` did not get; see :meth:`Resender.add`."""
    get_resender().add(fanout, key, token, targets, until)


def forget(fanout: Fanout, key: bytes, token: str) -> tuple[set[int], float] | None:
    """Before ``key`` is taken with ``token`` again: no late delete of it from here.

    What was kept, for an attempt that fails to keep again (see :meth:`Resender.forget`).
    """
    resender = _resenders.peek()
    if resender is None:
        return None
    return resender.forget(fanout, key, token)


def drop(fanout: Fanout) -> None:
    """``fanout``'s manager is closed: nothing kept for it is sent again."""
    resender = _resenders.peek()
    if resender is not None:
        resender.drop(fanout)
