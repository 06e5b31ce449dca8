"""Redis masters: parsing server specs, raw connections and the fan-out.

A :class:`Node` is one independent Redis master. A :class:`Fanout` sends one
packed command to every node's connection before it reads any reply, so a
round trip to N nodes costs about as much as a round trip to one. Each reply
is read with the per-node timeout; once one node has timed out, the others
are only read if their reply is already there, so a call never waits much
longer than one timeout however many nodes stall.

A connection whose reply timed out or failed is closed (a late reply must
never be read as the answer to the next command) and reconnects on next use.
Idle connection sets are dropped in a forked child: a socket is never shared
between two processes.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.connection import parse_url as _parse_url
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from ._scripts import Script
from .exceptions import NodeVote, RedlockConfigError, Vote

#: A redis-py connection; redis-py leaves most of its methods untyped.
Conn = Any

__all__ = ["Fanout", "Node", "ServerSpec", "pack", "parse_servers", "redact"]

#: What a server may be given as: a URL, "host:port", or a ready client.
ServerSpec = Union[str, "redis.Redis"]

DEFAULT_PORT = 6379
_URL_CREDENTIALS = re.compile(r"(?<=://)[^@/]*@")
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:/\s\[\]]+))(?::(?P<port>\d+))?$"
)


def redact(spec: str) -> str:
    """``spec`` with any user name and password in a URL replaced by ``***``."""
    return _URL_CREDENTIALS.sub("***@", spec)


def _encode(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return str(arg).encode()


def pack(*args: bytes | str | int) -> bytes:
    """Encode one command in RESP, the Redis wire format."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@dataclass(frozen=True)
class Node:
    """One Redis master: a printable address and how to open connections to it."""

    #: "host:port[/db]" or "unix:/path[/db]", prefixed "rediss://" for TLS; never a password
    name: str
    connection_class: type[AbstractConnection]
    connection_kwargs: tuple[tuple[str, Any], ...]

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two nodes the same server and database (for the duplicate check)."""
        kw = dict(self.connection_kwargs)
        return (kw.get("path"), kw.get("host"), kw.get("port"), kw.get("db", 0))

    def connect(self, timeout: float) -> Conn:
        """A new, not yet connected, connection with ``timeout`` for connect and reads."""
        kwargs = dict(self.connection_kwargs)
        kwargs.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=False,
        )
        return self.connection_class(**kwargs)

    def __repr__(self) -> str:
        return f"Node({self.name!r})"


def _node_name(kwargs: dict[str, Any]) -> str:
    db = int(kwargs.get("db") or 0)
    suffix = f"/{db}" if db else ""
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}{suffix}"
    host = str(kwargs.get("host") or "localhost")
    if ":" in host:
        host = f"[{host}]"
    name = f"{host}:{kwargs.get('port') or DEFAULT_PORT}{suffix}"
    cls = kwargs.get("connection_class")
    if cls is not None and issubclass(cls, redis.SSLConnection):
        return "rediss://" + name
    return name


def _from_kwargs(kwargs: dict[str, Any]) -> Node:
    cls = kwargs.pop("connection_class", None) or redis.Connection
    kwargs.pop("retry", None)
    return Node(_node_name({**kwargs, "connection_class": cls}), cls, tuple(sorted(kwargs.items())))


def parse_server(spec: object) -> Node:
    """Turn one server spec (URL, "host:port" or ``redis.Redis``) into a :class:`Node`."""
    if isinstance(spec, redis.Redis):
        pool = spec.connection_pool
        kwargs = dict(pool.connection_kwargs)
        kwargs["connection_class"] = pool.connection_class
        return _from_kwargs(kwargs)
    if not isinstance(spec, str):
        raise RedlockConfigError(
            f"server {spec!r} is a {type(spec).__name__}; give a URL like "
            "'redis://host:6379/0', a 'host:port' string or a redis.Redis client"
        )
    text = spec.strip()
    if not text:
        raise RedlockConfigError("a server spec is empty; give a URL like 'redis://host:6379/0'")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise RedlockConfigError(
                f"server {redact(text)!r} has scheme {scheme!r}; use redis://, rediss:// "
                "(TLS) or unix://"
            )
        try:
            kwargs = _parse_url(text)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise RedlockConfigError(
                f"server {redact(text)!r} is not a valid Redis URL ({redact(str(exc))}); "
                "expected e.g. 'redis://user:password@host:6379/0'"
            ) from None
        if scheme == "unix" and not kwargs.get("path"):
            raise RedlockConfigError(
                f"server {redact(text)!r} has no socket path; use 'unix:///path/to/redis.sock'"
            )
        if scheme != "unix" and not kwargs.get("host"):
            raise RedlockConfigError(f"server {redact(text)!r} has no host name")
        return _from_kwargs(kwargs)
    match = _HOST_PORT.match(text)
    if match is None:
        raise RedlockConfigError(
            f"server {redact(text)!r} is neither a URL nor 'host:port'; "
            "expected e.g. '127.0.0.1:6379' or 'redis://127.0.0.1:6379/0'"
        )
    port = int(match["port"]) if match["port"] else DEFAULT_PORT
    if not 0 < port < 65536:
        raise RedlockConfigError(f"server {text!r} has port {port}; a port is 1-65535")
    return _from_kwargs({"host": match["v6"] or match["host"], "port": port, "db": 0})


def parse_servers(servers: object) -> list[Node]:
    """Parse a server list: one spec or an iterable of specs, none repeated."""
    if servers is None:
        raise RedlockConfigError(
            "no Redis servers given; pass servers=['redis://host1:6379/0', ...] (3 or 5 "
            "independent masters are usual)"
        )
    items: Sequence[object]
    if isinstance(servers, (str, redis.Redis)):
        items = [servers]
    elif isinstance(servers, Iterable):
        items = list(servers)
    else:
        raise RedlockConfigError(
            f"servers must be a URL or a list of URLs/'host:port'/redis.Redis, "
            f"not {type(servers).__name__}"
        )
    if not items:
        raise RedlockConfigError(
            "the server list is empty; give at least one Redis master (3 or 5 are usual)"
        )
    nodes = [parse_server(s) for s in items]
    seen: dict[tuple[Any, ...], str] = {}
    for node in nodes:
        if node.identity in seen:
            raise RedlockConfigError(
                f"server {node.name} is listed twice; each Redlock node must be a "
                "different, independent Redis master"
            )
        seen[node.identity] = node.name
    return nodes


#: A reply: the decoded RESP value, or the exception the node gave instead.
Reply = Any

_FANOUTS: weakref.WeakSet[Fanout] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for fanout in list(_FANOUTS):
        fanout._forget_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Fanout:
    """Sends one command to many nodes at once and collects the replies.

    Thread-safe: each call takes a whole set of connections (one per node)
    from an idle list, or opens a new set when none is idle.
    """

    def __init__(self, nodes: Sequence[Node], timeout: float) -> None:
        self.nodes = tuple(nodes)
        self.timeout = timeout
        self._idle: list[list[Conn]] = []
        _FANOUTS.add(self)

    def _forget_connections(self) -> None:
        # In a forked child: the parent's sockets are not ours to use or shut down.
        self._idle = []

    def _checkout(self) -> list[Conn]:
        try:
            return self._idle.pop()
        except IndexError:
            return [node.connect(self.timeout) for node in self.nodes]

    def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, []
        for conns in idle:
            for conn in conns:
                conn.disconnect()

    def script(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[bytes | str | int],
        targets: Iterable[int] | None = None,
    ) -> list[Reply]:
        """Run ``script`` by EVALSHA on every node (or ``targets``); see :meth:`call`."""
        return self.call(
            pack(b"EVALSHA", script.sha, len(keys), *keys, *args),
            lambda: pack(b"EVAL", script.source, len(keys), *keys, *args),
            targets,
        )

    def call(
        self,
        packed: bytes,
        fallback: Callable[[], bytes] | None = None,
        targets: Iterable[int] | None = None,
    ) -> list[Reply]:
        """Send ``packed`` to every node (or to ``targets``) and return the replies in order.

        A reply is the node's value, or the exception that stands for it
        (:class:`redis.TimeoutError`, :class:`redis.ConnectionError`, or a
        :class:`redis.ResponseError` the node answered). Nodes not targeted get
        ``None``. A node that answers NOSCRIPT (its script cache was flushed)
        is sent ``fallback()``, the same call as EVAL.
        """
        conns = self._checkout()
        replies: list[Reply] = [None] * len(conns)
        sent: list[int] = []
        chunk = [packed]
        try:
            for i in range(len(conns)) if targets is None else targets:
                try:
                    conns[i].send_packed_command(chunk, check_health=False)
                    sent.append(i)
                except Exception as exc:  # connection refused, reset, TLS or auth failure
                    replies[i] = exc
            late = False
            for i in sent:
                conn = conns[i]
                try:
                    if late and not conn.can_read(timeout=0):
                        conn.disconnect()
                        replies[i] = redis.TimeoutError(
                            f"no reply from {self.nodes[i].name} within {self.timeout}s"
                        )
                        continue
                    replies[i] = conn.read_response()
                except NoScriptError as exc:
                    replies[i] = _resend(conn, fallback, exc)
                except ResponseError as exc:
                    replies[i] = exc
                except (TimeoutError, redis.TimeoutError) as exc:
                    late = True
                    replies[i] = exc
                except Exception as exc:
                    replies[i] = exc
        except BaseException:
            # Interrupted half-way (KeyboardInterrupt): replies may be left unread.
            for conn in conns:
                conn.disconnect()
            raise
        finally:
            self._idle.append(conns)
        return replies

    def admin_call(self, commands: Sequence[bytes], timeout: float) -> list[list[Reply]]:
        """Send ``commands`` to every node on new connections with ``timeout``.

        For rare administrative work (version checks, the CLI). Returns, per
        node, one reply per command.
        """
        conns = [node.connect(timeout) for node in self.nodes]
        replies: list[list[Reply]] = [[] for _ in conns]
        try:
            for i, conn in enumerate(conns):
                try:
                    conn.send_packed_command([b"".join(commands)], check_health=False)
                except Exception as exc:
                    replies[i] = [exc] * len(commands)
            for i, conn in enumerate(conns):
                while len(replies[i]) < len(commands):
                    try:
                        replies[i].append(conn.read_response())
                    except ResponseError as exc:
                        replies[i].append(exc)
                    except Exception as exc:
                        replies[i].extend([exc] * (len(commands) - len(replies[i])))
        finally:
            for conn in conns:
                conn.disconnect()
        return replies


def _resend(conn: Conn, fallback: Callable[[], bytes] | None, exc: Exception) -> Reply:
    if fallback is None:
        return exc
    try:
        conn.send_packed_command([fallback()], check_health=False)
        return conn.read_response()
    except Exception as exc2:
        return exc2


def classify(node: Node, reply: Reply, yes: bool) -> NodeVote:
    """Turn one reply into a :class:`NodeVote` (``yes`` decides between YES and HELD)."""
    if isinstance(reply, (TimeoutError, redis.TimeoutError)):
        return NodeVote(node.name, Vote.TIMEOUT, "no reply within the per-node timeout")
    if isinstance(reply, BaseException):
        return NodeVote(node.name, Vote.ERROR, f"{type(reply).__name__}: {redact(str(reply))}")
    return NodeVote(node.name, Vote.YES if yes else Vote.HELD)
