"""Wake-ups for waiters: a lock's release is announced, so a waiter need not poll.

The release script publishes the released key on the key's own channel,
:func:`channel` (``"celery_redlock:released:" + key``), on every node that
deleted it. A process that waits for a lock (``wait=``) starts one listener
thread per node; each thread subscribes to the channels of the keys this
process waits for (and, for :data:`LINGER` seconds after their last waiter
left, the keys it waited for), so a process hears of no other key's release.
Each waiter registers an event for its key and is woken by the first
announcement from any node. Polling at the retry delay stays as the fallback
(a lock that expires is not announced, a listener may be reconnecting or not
yet subscribed), so a lost message costs latency, never correctness.

Kept apart from :mod:`.redlock` because it is the one part with threads of
its own. Imports no celery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._nodes import Node

__all__ = ["CHANNEL", "LINGER", "Listener", "channel"]

#: The start of every release channel: a key's release is published on :func:`channel`.
CHANNEL = b"celery_redlock:released"
#: Seconds a key stays subscribed after its last waiter left (a process that waits
#: again soon is not unsubscribed and subscribed again in between).
LINGER = 2.0
#: Seconds a listener waits before reconnecting to a node that failed.
RECONNECT_DELAY = 1.0
#: Seconds a listener waits before trying again on a node whose ACL denies it the
#: release channels (told once per node, at WARNING).
DENIED_DELAY = 30.0
#: Nodes whose ACL denied a listener the release channels (warned about once).
_DENIED: set[str] = set()
#: Socket timeout of a listener's connection (a stopped node cannot hold it forever).
LISTEN_TIMEOUT = 10.0
#: Most seconds a listener thread sleeps before it looks at its stop flag and its keys.
IDLE_WAIT = 1.0
#: Seconds between two reads of a subscribed connection that is not a real socket
#: (a test double such as fakeredis), which a selector cannot watch.
POLL_WAIT = 0.02

_log = logging.getLogger(__name__)


_LISTENERS: weakref.WeakSet[Listener] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for listener in list(_LISTENERS):
        listener._forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def channel(key: bytes) -> bytes:
    """The channel a release of ``key`` is announced on (the message is the key)."""
    return CHANNEL + b":" + key


class Listener:
    """Listens for release announcements on every node and wakes registered waiters."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = tuple(nodes)
        self._waiters: dict[bytes, set[threading.Event]] = {}
        self._left: dict[bytes, float] = {}  # key -> when its last waiter left
        # Re-entrant: the collector may run a manager's finalizer (which closes this
        # listener) in a thread holding it.
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._pid = 0
        self._pipes: list[tuple[int, int]] = []  # (read, write): each thread's nudge pipe
        _LISTENERS.add(self)

    def register(self, key: bytes) -> threading.Event:
        """An event set whenever ``key`` is announced released; :meth:`unregister` it after."""
        event = threading.Event()
        with self._mutex:
            if self._pid != os.getpid():
                self._start()
            new = key not in self._waiters and key not in self._left
            self._waiters.setdefault(key, set()).add(event)
            self._left.pop(key, None)
            if new:  # the threads subscribe to its channel now, not at their next look
                self._nudge()
        return event

    def unregister(self, key: bytes, event: threading.Event) -> None:
        with self._mutex:
            events = self._waiters.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[key]
                    self._left[key] = time.monotonic()

    def subscribed_keys(self) -> set[bytes]:
        """The keys whose channels the threads keep subscribed (waited for, or lingering)."""
        now = time.monotonic()
        with self._mutex:
            for key, left in list(self._left.items()):
                if now - left >= LINGER:
                    del self._left[key]
            return set(self._waiters) | set(self._left)

    def close(self) -> None:
        """Stop the listener threads: at once when idle, else once their connection
        attempt or command in progress ends (within :data:`LISTEN_TIMEOUT`)."""
        self._stop.set()
        with self._mutex:
            self._nudge()

    def _nudge(self) -> None:
        # Called with the mutex held (a thread closes its pipe only under it).
        for _, write in self._pipes:
            with contextlib.suppress(OSError):  # full: it has been nudged already
                os.write(write, b"!")

    def _forget_in_child(self) -> None:
        """In a forked child: the parent's threads, waiters and pipes are not ours."""
        self._mutex = threading.RLock()  # a parent thread may have held it at the fork
        self._waiters = {}
        self._left = {}
        for pipe in self._pipes:
            for fd in pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pipes = []
        self._pid = 0

    def _start(self) -> None:
        # Called with the mutex held, once per process (threads do not survive fork).
        self._pid = os.getpid()
        self._stop = threading.Event()
        for node in self.nodes:
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._pipes.append((read, write))
            thread = threading.Thread(
                target=self._listen,
                args=(node, self._stop, read, write),
                name=f"celery_redlock-wakeup-{node.name}",
                daemon=True,
            )
            thread.start()

    def _wake(self, key: bytes) -> None:
        with self._mutex:
            events = list(self._waiters.get(key, ()))
        for event in events:
            event.set()

    def _listen(self, node: Node, stop: threading.Event, nudged: int, nudge: int) -> None:
        try:
            while not stop.is_set():
                try:
                    self._listen_once(node, stop, nudged)
                except redis.exceptions.NoPermissionError as exc:
                    if node.name not in _DENIED:
                        _DENIED.add(node.name)
                        _log.warning(
                            "waiters are not woken by releases on %s: its ACL user may not "
                            "subscribe to the release channels (%s); grant them with "
                            "'&celery_redlock:released:*'. Waiters poll at retry_delay.",
                            node.name,
                            exc,
                        )
                    stop.wait(DENIED_DELAY)
                except Exception as exc:
                    _log.debug("release listener on %s failed: %s; reconnecting", node.name, exc)
                    stop.wait(RECONNECT_DELAY)
        finally:
            with self._mutex:
                if (nudged, nudge) in self._pipes:  # else a fork since: not ours to close
                    self._pipes.remove((nudged, nudge))
                    for fd in (nudge, nudged):
                        with contextlib.suppress(OSError):
                            os.close(fd)

    def _listen_once(self, node: Node, stop: threading.Event, nudged: int) -> None:
        """One connection to ``node``: keep its subscriptions, wake waiters, until it fails."""
        kwargs = dict(node.connection_kwargs)
        kwargs.update(
            socket_timeout=LISTEN_TIMEOUT,
            socket_connect_timeout=LISTEN_TIMEOUT,
            socket_keepalive=True,
            decode_responses=False,
            # No reconnect inside redis-py: it would subscribe again to channels just
            # left, and drop a message half read; this thread reconnects itself.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            retry_on_error=[],
        )
        pool = redis.ConnectionPool(connection_class=node.connection_class, **kwargs)
        client = redis.Redis(connection_pool=pool)
        pubsub: Any = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        selector = selectors.DefaultSelector()
        selector.register(nudged, selectors.EVENT_READ)
        subscribed: set[bytes] = set()
        watched: Any = None  # the pubsub socket the selector watches, while subscribed
        try:
            while not stop.is_set():
                wanted = self.subscribed_keys()
                if not wanted and subscribed:
                    # Nothing to hear: drop the connection, which an idle server could
                    # close unseen (its timeout applies to a client with no channels).
                    pubsub.reset()
                else:
                    if wanted - subscribed:
                        pubsub.subscribe(*(channel(k) for k in wanted - subscribed))
                    if subscribed - wanted:
                        pubsub.unsubscribe(*(channel(k) for k in subscribed - wanted))
                subscribed = wanted
                # Watched only while subscribed: the replies to a last UNSUBSCRIBE are
                # left in the socket until the next SUBSCRIBE reads past them.
                sock = getattr(pubsub.connection, "_sock", None) if subscribed else None
                if sock is not watched:
                    if watched is not None:
                        selector.unregister(watched)
                        watched = None
                    if isinstance(sock, socket.socket):
                        selector.register(sock, selectors.EVENT_READ)
                        watched = sock
                wait = IDLE_WAIT
                if subscribed:
                    self._drain(pubsub)
                    if watched is None:  # not a socket (a test double such as fakeredis): poll
                        wait = POLL_WAIT
                for ready, _ in selector.select(wait):
                    if ready.fd == nudged:
                        with contextlib.suppress(OSError):
                            os.read(nudged, 512)
        finally:
            selector.close()
            try:
                pubsub.close()
                pool.disconnect()
            except Exception:  # pragma: no cover - closing a broken connection
                pass

    def _drain(self, pubsub: Any) -> None:
        """Wake the waiters of every announcement already received (read or buffered)."""
        while pubsub.subscribed and pubsub.connection.can_read(timeout=0):
            # Something came: the rest of a message split across packets may be on
            # its way, so the read may wait for it (a read that cannot wait would
            # fail half-way through the message).
            message = pubsub.get_message(timeout=LISTEN_TIMEOUT)
            if message is None:
                continue  # a subscribe confirmation, read and skipped
            if message.get("type") == "message":
                data = message.get("data")
                if isinstance(data, bytes):
                    self._wake(data)
