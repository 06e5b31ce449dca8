"""Wake-ups for waiters: a lock's release is announced, so a waiter need not poll.

The release script publishes the released key on :data:`CHANNEL` on every
node that deleted it. A process that waits for a lock (``wait=``) starts one
listener thread per node, subscribed to that channel; each waiter registers
an event for its key and is woken by the first announcement from any node.
Polling at the retry delay stays as the fallback (a lock that expires is not
announced, a listener may be reconnecting), so a lost message costs latency,
never correctness.

Kept apart from :mod:`.redlock` because it is the one part with threads of
its own. Imports no celery.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

import redis

from ._nodes import Node

__all__ = ["CHANNEL", "Listener"]

#: The channel the release script publishes each released key on.
CHANNEL = b"celery_redlock:released"
#: Seconds a listener waits before reconnecting to a node that failed.
RECONNECT_DELAY = 1.0
#: Socket timeout of a listener's connection (a stopped node cannot hold it forever).
LISTEN_TIMEOUT = 10.0

_log = logging.getLogger(__name__)


class Listener:
    """Listens for release announcements on every node and wakes registered waiters."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = tuple(nodes)
        self._waiters: dict[bytes, set[threading.Event]] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._pid = 0

    def register(self, key: bytes) -> threading.Event:
        """An event set whenever ``key`` is announced released; :meth:`unregister` it after."""
        event = threading.Event()
        with self._mutex:
            self._waiters.setdefault(key, set()).add(event)
            if self._pid != os.getpid():
                self._start()
        return event

    def unregister(self, key: bytes, event: threading.Event) -> None:
        with self._mutex:
            events = self._waiters.get(key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[key]

    def close(self) -> None:
        """Stop the listener threads (they exit within their poll interval)."""
        self._stop.set()

    def _start(self) -> None:
        # Called with the mutex held, once per process (threads do not survive fork).
        self._pid = os.getpid()
        self._stop = threading.Event()
        for node in self.nodes:
            thread = threading.Thread(
                target=self._listen,
                args=(node, self._stop),
                name=f"celery_redlock-wakeup-{node.name}",
                daemon=True,
            )
            thread.start()

    def _wake(self, key: bytes) -> None:
        with self._mutex:
            events = list(self._waiters.get(key, ()))
        for event in events:
            event.set()

    def _listen(self, node: Node, stop: threading.Event) -> None:
        while not stop.is_set():
            kwargs = dict(node.connection_kwargs)
            kwargs.update(
                socket_timeout=LISTEN_TIMEOUT,
                socket_connect_timeout=LISTEN_TIMEOUT,
                socket_keepalive=True,
                decode_responses=False,
            )
            pool = redis.ConnectionPool(connection_class=node.connection_class, **kwargs)
            client = redis.Redis(connection_pool=pool)
            pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(CHANNEL)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self._wake(data)
            except Exception as exc:
                _log.debug("release listener on %s failed: %s; reconnecting", node.name, exc)
                stop.wait(RECONNECT_DELAY)
            finally:
                try:
                    pubsub.close()
                    pool.disconnect()
                except Exception:  # pragma: no cover - closing a broken connection
                    pass
