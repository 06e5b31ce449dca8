"""Redis masters: parsing server specs, raw connections and the fan-out.

A :class:`Node` is one independent Redis master. A :class:`Fanout` sends one
packed command to every node's connection before it reads any reply, so a
round trip to N nodes costs about as much as a round trip to one. Each reply
is read with the per-node timeout; once one node has timed out, the others
are only read if their reply is already there, so a call never waits much
longer than one timeout however many nodes stall. (Nodes each answering a
little under one timeout after the previous one is read can stretch a call
to several timeouts; a lock's validity is measured from before the sends,
so this costs time, never safety.)

A connection whose reply timed out or failed is closed (a late reply must
never be read as the answer to the next command) and reconnects on next use.
Idle connection sets are dropped in a forked child: a socket is never shared
between two processes.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.connection import parse_url as _redis_parse_url
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

from . import _scripts
from ._scripts import Script
from .exceptions import NodeVote, RedlockConfigError, Vote

#: A redis-py connection; redis-py leaves most of its methods untyped.
Conn = Any

__all__ = ["UNREAD", "Fanout", "Node", "ServerSpec", "pack", "pack_args", "parse_servers", "redact"]

#: What a server may be given as: a URL, "host:port", or a ready client.
ServerSpec = Union[str, "redis.Redis"]

DEFAULT_PORT = 6379
#: URL options a lock server's URL may give (those its connection class takes too).
#: Every other one is refused at once: passed on, it would fail each connect later.
_URL_OPTIONS = frozenset(
    {
        "db", "username", "password", "client_name", "lib_name", "lib_version", "protocol",
        "socket_keepalive", "socket_read_size", "encoding", "encoding_errors",
        # taken, then replaced by the lock's own: node_timeout for both timeouts, no
        # retries, no health checks, replies as bytes
        "socket_timeout", "socket_connect_timeout", "retry_on_timeout",
        "health_check_interval", "decode_responses",
        "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path",
        "ssl_ca_data", "ssl_password", "ssl_check_hostname", "ssl_min_version",
        "ssl_ciphers", "ssl_include_verify_flags", "ssl_exclude_verify_flags",
        "ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "legacy_responses",
    }
)  # fmt: skip
#: Options of a redis-py connection pool (``from_url``) that mean nothing for the
#: lock's connections, one per node per call in flight: accepted and ignored.
_POOL_OPTIONS = frozenset({"max_connections"})
#: A password given as a query parameter (``?password=...``): in a spec, its value
#: runs to the next option a lock server's URL may give (an unencoded "&" may be
#: part of it), else to the end; in free text, to a "&", space or quote.
_SPEC_QUERY_PASSWORD = re.compile(
    r"(?i)([?&](?:ssl_)?password=).*?(?=&(?-i:"
    + "|".join(sorted(_URL_OPTIONS | _POOL_OPTIONS))
    + r")=|$)",
    re.DOTALL,
)
_TEXT_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl_)?password=)[^&\s'\"]*")
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:/\s\[\]]+))(?::(?P<port>\d+))?$"
)
#: A URL option name that may be shown in an error (one that is not could be a
#: piece of a password holding an unencoded delimiter).
_OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
_ENCODE_HINT = (
    "; a '/', '?', '#' or '@' in a user name or password must be percent-encoded "
    "(%2F, %3F, %23, %40)"
)


def _hide_credentials(text: str) -> str:
    """Everything from the first ``://`` to the last ``@`` after it becomes ``***``.

    Credentials end at the last ``@`` as URL parsers read them, and a password may
    hold an unencoded ``/``, ``?``, ``#`` or even ``://``: when in doubt, hide more.
    """
    start = text.find("://")
    if start < 0:
        return text
    at = text.rfind("@", start + 3)
    if at < 0:
        return text
    return text[: start + 3] + "***" + text[at:]


def _scrub(text: str) -> str:
    """``text`` (an error message) with the credentials of any URL in it hidden."""
    return _TEXT_QUERY_PASSWORD.sub(r"\1***", _hide_credentials(text))


def redact(spec: str) -> str:
    """``spec`` with any user name and password replaced by ``***``.

    In a URL, everything between ``://`` and the last ``@`` is hidden (credentials
    end at the last ``@``, and an unencoded ``/``, ``?`` or ``#`` in a password
    must not let part of it show), and so is a ``?password=`` value.
    """
    if "://" in spec:
        return _SPEC_QUERY_PASSWORD.sub(r"\1***", _hide_credentials(spec))
    if "@" in spec and not any(ch.isspace() for ch in spec):  # "user:pw@host:port"
        return "***@" + spec.rpartition("@")[2]
    return spec


def _encode(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return str(arg).encode()


def pack_args(*args: bytes | str | int) -> bytes:
    """Encode arguments as RESP bulk strings (a command without its array header)."""
    parts = []
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def pack(*args: bytes | str | int) -> bytes:
    """Encode one command in RESP, the Redis wire format."""
    return b"*%d\r\n" % len(args) + pack_args(*args)


@dataclass(frozen=True)
class Node:
    """One Redis master: a printable address and how to open connections to it."""

    #: "host:port[/db]" or "unix:/path[/db]", prefixed "rediss://" for TLS; never a password
    name: str
    connection_class: type[AbstractConnection]
    connection_kwargs: tuple[tuple[str, Any], ...]

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two nodes the same server (for the duplicate check).

        Two databases of one server are one node: they fail together.
        """
        kw = dict(self.connection_kwargs)
        if kw.get("path"):
            return (kw["path"], None, None)
        return (None, kw.get("host"), kw.get("port") or DEFAULT_PORT)  # "redis://h": 6379

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

    def client(self, timeout: float) -> redis.Redis:
        """A new ``redis.Redis`` for this node, for administrative commands (SCAN, INFO).

        Its pool is passed in, so ``close()`` leaves its connections open: also call
        ``client.connection_pool.disconnect()``.
        """
        kwargs = dict(self.connection_kwargs)
        kwargs.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        pool = redis.ConnectionPool(connection_class=self.connection_class, **kwargs)
        return redis.Redis(connection_pool=pool)

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


_ACCEPTED: dict[type, frozenset[str]] = {}


def _accepted_options(cls: type) -> frozenset[str]:
    """The URL options ``cls`` (a connection class) takes, of :data:`_URL_OPTIONS`."""
    taken = _ACCEPTED.get(cls)
    if taken is None:
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            try:
                params = inspect.signature(init).parameters.values()
            except (TypeError, ValueError):  # pragma: no cover - a C or odd __init__
                continue
            names.update(
                p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
        taken = _ACCEPTED[cls] = frozenset(names & _URL_OPTIONS)
    return taken


def _check_options(text: str, shown: str, kwargs: dict[str, Any], hint: str) -> None:
    """Refuse a URL option the connection would not take; drop pool-only ones."""
    query = urlsplit(text).query
    if not query:
        return
    cls = kwargs.get("connection_class") or redis.Connection
    accepted = _accepted_options(cls)
    after_password = False
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name in _POOL_OPTIONS:
            kwargs.pop(name, None)
        elif name not in accepted:
            if after_password or not _OPTION_NAME.match(name):
                # It may be a piece of a password holding an unencoded "&", "?" or "@".
                what = (
                    "an option that a Redis connection does not take (not shown: it "
                    "follows password= or is no option name; a '&' in a password must "
                    "be percent-encoded as %26)"
                )
            else:
                what = f"the option {name!r}, which a Redis connection does not take"
                if name.lower() in accepted:
                    what += f" (option names are lower case: {name.lower()!r})"
                elif name.startswith("ssl_") and cls is not redis.SSLConnection:
                    what += " (TLS options need a rediss:// URL)"
                elif name == "timeout":
                    what += " (the per-node timeout is node_timeout, redlock_node_timeout)"
            raise RedlockConfigError(
                f"server {shown!r} has {what}; a lock server's URL may give "
                f"{', '.join(sorted(accepted))}; max_connections is accepted and ignored "
                f"(each lock call uses one connection per node){hint}"
            )
        if name.lower() == "password":
            after_password = True


def _parse_url(text: str) -> Node:
    shown = redact(text)
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise RedlockConfigError(
            f"server {shown!r} has scheme {scheme!r}; use redis://, rediss:// (TLS) or unix://"
        )
    if "://" in rest:
        raise RedlockConfigError(
            f"server {shown!r} holds {text.count('://')} URLs in one string; give several "
            "servers as a list of URLs, not one string joined by ','"
        )
    # An "@" after the end of the host part: a user name or password may hold an
    # unencoded delimiter, and pieces of the URL before that "@" must not be shown.
    authority_end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    hint = _ENCODE_HINT if "@" in rest[authority_end:] else ""
    try:
        kwargs = _redis_parse_url(text)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        at = rest.rfind("@")
        if at < 0:
            said = str(exc)
        else:  # redis-py may quote a piece of the password: say what the rest gives
            try:
                _redis_parse_url(f"{scheme}://{rest[at + 1 :]}")  # type: ignore[no-untyped-call]
            except ValueError as bare:
                said = str(bare)
            else:
                said = "its user name and password cannot be read"
                hint = _ENCODE_HINT
        raise RedlockConfigError(
            f"server {shown!r} is not a valid Redis URL ({_scrub(said)}); expected e.g. "
            f"'redis://user:password@host:6379/0'{hint}"
        ) from None
    if urlsplit(text).fragment:
        raise RedlockConfigError(
            f"server {shown!r} has a '#' part, which a Redis URL does not take; a '#' in a "
            "password must be percent-encoded as %23"
        )
    if scheme == "unix" and not kwargs.get("path"):
        raise RedlockConfigError(
            f"server {shown!r} has no socket path; use 'unix:///path/to/redis.sock'{hint}"
        )
    if scheme != "unix" and not kwargs.get("host"):
        raise RedlockConfigError(f"server {shown!r} has no host name{hint}")
    if scheme != "unix":
        path = urlsplit(text).path.lstrip("/")
        if path and not path.isdigit():
            told = f"database {path!r}" if not hint and "@" not in path else "a path"
            raise RedlockConfigError(
                f"server {shown!r} has {told}; the path of a Redis URL is a database "
                f"number, e.g. 'redis://host:6379/0'{hint}"
            )
    _check_options(text, shown, kwargs, hint)
    reqs = kwargs.get("ssl_cert_reqs")
    if isinstance(reqs, str):
        # kombu's spelling (the broker URL Celery's docs show) as redis-py's
        name = reqs.lower().removeprefix("cert_")
        if name not in ("none", "optional", "required"):
            raise RedlockConfigError(
                f"server {shown!r} has ssl_cert_reqs={reqs!r}; use required, optional or "
                "none (or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)"
            )
        kwargs["ssl_cert_reqs"] = name
    return _from_kwargs(kwargs)


def _parse_client(client: redis.Redis) -> Node:
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool) or issubclass(
        pool.connection_class, SentinelManagedConnection
    ):
        raise RedlockConfigError(
            "a Sentinel client (Sentinel.master_for/slave_for) is not a lock server: the "
            "master it points to changes on failover, and a lock held on the old one is "
            "lost; pass the URL of each master instead, e.g. 'redis://host:6379/0' (Redlock "
            "wants independent masters, not a failover group)"
        )
    kwargs = dict(pool.connection_kwargs)
    if not kwargs.get("host") and not kwargs.get("path"):
        raise RedlockConfigError(
            f"a redis.Redis client whose pool ({type(pool).__name__}) names no host or "
            "socket path is not a lock server; pass the server's URL instead, e.g. "
            "'redis://host:6379/0'"
        )
    kwargs["connection_class"] = pool.connection_class
    return _from_kwargs(kwargs)


def parse_server(spec: object) -> Node:
    """Turn one server spec (URL, "host:port" or ``redis.Redis``) into a :class:`Node`."""
    if isinstance(spec, redis.Redis):
        return _parse_client(spec)
    if not isinstance(spec, str):
        raise RedlockConfigError(
            f"server {spec!r} is a {type(spec).__name__}; give a URL like "
            "'redis://host:6379/0', a 'host:port' string or a redis.Redis client"
        )
    text = spec.strip()
    if not text:
        raise RedlockConfigError("a server spec is empty; give a URL like 'redis://host:6379/0'")
    if "://" in text:
        return _parse_url(text)
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
                f"server {node.name} is listed twice (databases of one server count as one); "
                "each Redlock node must be a different, independent Redis master"
            )
        seen[node.identity] = node.name
    return nodes


#: A reply: the decoded RESP value, or the exception the node gave instead.
Reply = Any


class _Unread:
    """The reply of a node that was not read because a quorum had answered first."""

    def __repr__(self) -> str:
        return "UNREAD"


#: Stands for a reply :meth:`Fanout.call` left to be read by the next call.
UNREAD: Any = _Unread()


class _Incomplete(Exception):
    """The buffer ends before the reply does."""


#: What a timed-out send or receive raises: Python's timeout, or the kernel's
#: (EAGAIN from SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket).
_TIMEOUTS = (TimeoutError, BlockingIOError)


def _plain_socket(sock: object) -> bool:
    """True for the standard library's own ``socket.socket`` (not TLS, not a test
    double, and not the socket of gevent or eventlet, whose monkey-patching puts
    their class in its place: theirs wait in their hub under Python's timeout, so
    the kernel's timeouts and a non-blocking ``recv`` flag do not hold for them)."""
    cls = type(sock)
    return cls.__name__ == "socket" and cls.__module__ == "socket"


#: recv() flag for a read that never waits (0 where the platform has none).
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
#: Kernel socket timeouts take a struct timeval of two C longs on Linux.
_KERNEL_TIMEOUTS = sys.platform.startswith("linux")


def _timeval(seconds: float) -> bytes:
    """``seconds`` as the struct timeval of SO_RCVTIMEO/SO_SNDTIMEO: at least 1 µs,
    since a timeval of zero means no timeout at all (a read would wait for ever)."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole <= 0 and micro <= 0:
        whole, micro = 0, 1
    return struct.pack("ll", whole, micro)


#: The scripts every new connection loads (SCRIPT LOAD is idempotent on a node). Every
#: script a call may leave unread (``enough``) is among them: an unread NOSCRIPT is only
#: answered by the connection's next call.
_PRELOADED = (
    _scripts.ACQUIRE,
    _scripts.RELEASE,
    _scripts.EXTEND,
    _scripts.RELEASE_OWNED,
    _scripts.REASSIGN,
    _scripts.UNDO,
)
_PRELOAD = b"".join(pack(b"SCRIPT", b"LOAD", script.source) for script in _PRELOADED)


class _Stale(Exception):
    """An idle connection turned out closed by the server (it restarted): reconnect, resend."""


#: What a node's failure raises, kept as that node's reply. Anything else raised
#: mid-call (a signal handler's exception, such as Celery's soft time limit) may
#: leave a reply in flight: every connection of the call is closed and it propagates.
_IO_ERRORS = (redis.RedisError, OSError)


def _parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    """Parse one RESP2/RESP3 reply from ``buf`` at ``pos``; (value, position after it)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos : pos + 1]
    line = buf[pos + 1 : end]
    nxt = end + 2
    if kind == b":":
        return int(line), nxt
    if kind in (b"$", b"=", b"!"):  # bulk string, RESP3 verbatim string, RESP3 blob error
        size = int(line)
        if size < 0:
            return None, nxt
        if len(buf) < nxt + size + 2:
            raise _Incomplete
        data = buf[nxt : nxt + size]
        if kind == b"=":
            data = data[4:]  # "txt:" or "mkd:"
        elif kind == b"!":
            return ResponseError(data.decode("utf-8", "replace")), nxt + size + 2
        return data, nxt + size + 2
    if kind == b"+":
        return line, nxt
    if kind == b"-":
        text = line.decode("utf-8", "replace")
        if text.startswith("NOSCRIPT"):
            return NoScriptError(text), nxt
        return ResponseError(text), nxt
    if kind in (b"*", b"~", b">"):
        count = int(line)
        if count < 0:
            return None, nxt
        items = []
        for _ in range(count):
            item, nxt = _parse(buf, nxt)
            items.append(item)
        return items, nxt
    if kind == b"_":
        return None, nxt
    if kind == b"#":
        return line == b"t", nxt
    if kind == b",":
        return float(line), nxt
    if kind == b"(":
        return int(line), nxt
    if kind == b"%":
        pairs = {}
        for _ in range(int(line)):
            name, nxt = _parse(buf, nxt)
            value, nxt = _parse(buf, nxt)
            pairs[name] = value
        return pairs, nxt
    raise redis.ConnectionError(f"unexpected reply type {kind!r} from Redis")


#: Most replies a connection may leave unread for its next call to read (see
#: Fanout.call): a call on a connection owing this many reads them and its own.
MAX_OWED = 8

#: Seconds a node is skipped after it failed or timed out, so that a stalled
#: node costs one timeout per cool-down, not one per call (a reconnect to a
#: stopped process would wait out its own timeout each time).
NODE_COOLDOWN = 1.0


class _Health:
    """Shared by every connection to one node: until when it is skipped, and why."""

    __slots__ = ("down_until", "reason")

    def __init__(self) -> None:
        self.down_until = 0.0
        self.reason = ""


class _Wire:
    """One connection to one node, used for our own commands only.

    redis-py opens it (TCP, unix socket or TLS, AUTH, SELECT); then commands
    are written to and replies parsed from its socket directly, which costs a
    fraction of a generic client's per-command work.
    """

    __slots__ = (
        "buf",
        "conn",
        "health",
        "kernel_timed",
        "node",
        "owed",
        "raw",
        "sock",
        "timeout",
        "used",
    )

    def __init__(self, node: Node, timeout: float, health: _Health | None = None) -> None:
        self.node = node
        self.timeout = timeout
        self.health = health or _Health()
        self.conn: Conn = None
        self.sock: Any = None
        self.raw = True
        #: the kernel keeps this connection's timeouts (set at connect, see there)
        self.kernel_timed = False
        self.used = False
        self.buf = b""
        #: replies still to read for commands of earlier calls (see Fanout.call),
        #: each with the EVAL to send if it turns out to be NOSCRIPT
        self.owed: list[Callable[[], bytes] | None] = []

    def fail(self, error: Exception) -> Exception:
        """Close after ``error`` and skip the node for a cool-down; returns ``error``."""
        self.close()
        self.health.down_until = time.monotonic() + NODE_COOLDOWN
        self.health.reason = str(error)
        return error

    def connect(self) -> None:
        """Open the connection (TCP/unix/TLS, AUTH, SELECT), unless the node is cooling down."""
        health = self.health
        if health.down_until and time.monotonic() < health.down_until:
            raise redis.ConnectionError(
                f"{self.node.name} skipped for up to {NODE_COOLDOWN}s after: {health.reason}"
            )
        try:
            conn = self.node.connect(self.timeout)
            conn.connect()
        except redis.AuthenticationError:
            raise
        except _IO_ERRORS as exc:  # not a signal handler's exception: the node is fine
            raise self.fail(exc) from None
        health.down_until = 0.0
        self.conn, self.sock, self.buf, self.used = conn, conn._sock, b"", False
        # A socket-like object from a test double (fakeredis) goes through redis-py.
        self.raw = isinstance(self.sock, socket.socket)
        if self.raw:
            # Load the scripts now, so a first EVALSHA does not answer NOSCRIPT
            # (an error reply, e.g. from an ACL without SCRIPT, is let be).
            try:
                self.sock.sendall(_PRELOAD)
                for _ in _PRELOADED:
                    self.read()
            except OSError as exc:
                raise self._send_error(exc) from None
            except BaseException:
                # Interrupted (a signal handler raising, such as a soft time limit):
                # replies may be left unread, which a later read would take for its own.
                self.close()
                raise
            self.used = False
        self.kernel_timed = self.raw and _KERNEL_TIMEOUTS and _plain_socket(self.sock)
        if self.kernel_timed:
            # The kernel keeps the timeout (SO_RCVTIMEO/SO_SNDTIMEO): Python's own
            # timeout would poll() before every send and receive.
            packed = _timeval(self.timeout)
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, packed)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, packed)

    def send(self, data: bytes) -> None:
        if self.sock is None:
            self.connect()
        try:
            if not self.raw:
                self.conn.send_packed_command([data], check_health=False)
                return
            self.sock.sendall(data)
        except OSError as exc:
            if self.used and not isinstance(exc, _TIMEOUTS):
                self.close()  # closed by the server while idle (it restarted): once more
                self.send(data)
                return
            raise self._send_error(exc) from None

    def _send_error(self, exc: OSError) -> Exception:
        if isinstance(exc, _TIMEOUTS):
            return self.fail(redis.TimeoutError(f"timeout writing to {self.node.name}"))
        return self.fail(redis.ConnectionError(f"error writing to {self.node.name}: {exc}"))

    def read(self) -> Reply:
        if not self.raw:
            try:
                return self.conn.read_response()
            except ResponseError as exc:
                return exc
            except Exception as exc:
                raise self.fail(exc) from None
        buf = self.buf
        while True:
            if buf:
                try:
                    value, pos = _parse(buf, 0)
                except _Incomplete:
                    pass
                except (ValueError, IndexError, redis.ConnectionError) as exc:
                    raise self.fail(
                        redis.ConnectionError(f"unreadable reply from {self.node.name}: {exc}")
                    ) from None
                else:
                    if buf[:1] == b">":  # a RESP3 push (no reply to a command): skipped
                        buf = self.buf = buf[pos:]
                        continue
                    self.buf = buf[pos:]
                    return value
            try:
                chunk = self.sock.recv(65536)
            except _TIMEOUTS:
                raise self.fail(
                    redis.TimeoutError(f"no reply from {self.node.name} within {self.timeout}s")
                ) from None
            except OSError as exc:
                if self.used and not buf:
                    self.close()
                    raise _Stale from None
                raise self.fail(
                    redis.ConnectionError(f"error reading from {self.node.name}: {exc}")
                ) from None
            if not chunk:
                if self.used and not buf:
                    self.close()
                    raise _Stale
                raise self.fail(redis.ConnectionError(f"{self.node.name} closed the connection"))
            buf += chunk
            self.used = True

    def ready(self) -> bool:
        """True when a reply can be read without waiting."""
        sock = self.sock
        if sock is None:
            return False
        if not self.raw:
            return bool(self.conn.can_read(timeout=0))
        return bool(self.buf) or self._pull() is not None

    def owed_ready(self, also: int = 0) -> bool:
        """True when every reply owed by earlier calls, and ``also`` more, can be
        read without waiting.

        What has come is kept for :meth:`read`; a closed or failed connection
        counts as ready (``read()`` meets the error and reports it).
        """
        if not self.raw:
            return self.ready()
        while not _holds(self.buf, len(self.owed) + also):
            if self.sock is None:
                return True
            came = self._pull()
            if came is None:
                return False
            if not came:
                return True
        return True

    def _pull(self) -> bytes | None:
        """Read what has come, without waiting, into ``buf``: None when nothing has,
        ``b""`` when the connection ended or failed (``read()`` meets it again)."""
        sock = self.sock
        try:
            if _DONTWAIT and self.kernel_timed:
                # One syscall instead of select + recv. Only with kernel timeouts:
                # under a Python timeout, recv() first waits for data.
                try:
                    chunk: bytes = sock.recv(65536, _DONTWAIT)
                except BlockingIOError:
                    return None
            elif (hasattr(sock, "pending") and sock.pending()) or _readable(sock, 0.0):
                chunk = sock.recv(65536)
            else:
                return None
        except OSError:
            return b""
        if chunk:
            self.buf += chunk
            self.used = True
        return chunk

    def settle(self) -> list[Callable[[], bytes]]:
        """Read the replies owed by earlier calls; the EVALs to re-send for NOSCRIPT ones."""
        owed, self.owed = self.owed, []
        redo = []
        for fallback in owed:
            if type(self.read()) is NoScriptError and fallback is not None:
                redo.append(fallback)
        return redo

    def close(self) -> None:
        conn, self.conn, self.sock, self.buf = self.conn, None, None, b""
        self.owed = []
        self.kernel_timed = False
        if conn is not None:
            conn.disconnect()


def _holds(buf: bytes, count: int) -> bool:
    """True when ``buf`` starts with ``count`` whole replies."""
    pos = 0
    for _ in range(count):
        try:
            _, pos = _parse(buf, pos)
        except _Incomplete:
            return False
    return True


def _wait_ready(wire: _Wire, deadline: float) -> bool:
    """Wait until every reply ``wire`` owes can be read, or ``deadline``; whether they can."""
    while not wire.owed_ready():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        _readable(wire.sock, left)
    return True


def _readable(sock: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` s until ``sock`` can be read (poll: any descriptor number,
    where select() fails from 1024 on)."""
    if hasattr(select, "poll"):  # looked up now: eventlet's patching deletes it
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(max(0, math.ceil(timeout * 1000))))
    return bool(select.select([sock], [], [], timeout)[0])  # pragma: no cover - no poll()


def _send(wire: _Wire, packed: bytes, replies: list[Reply], i: int, settle: bool = True) -> bool:
    """Settle what ``wire`` owes, then send ``packed``; on failure the error is reply ``i``.

    Replies an earlier call left unread are read first, and a script the node
    had forgotten runs again before this command: each node runs the commands
    in the order they were given. ``settle=False``: the owed replies are of
    plain commands (nothing to run again): they are read after this send,
    before its reply.
    """
    try:
        try:
            if wire.owed and settle:
                for again in wire.settle():
                    _resend(wire, again, None)
            wire.send(packed)
        except _Stale:  # closed while idle: the owed replies are gone with the server
            wire.send(packed)
        return True
    except _IO_ERRORS as exc:  # refused, reset, TLS or auth failure, timeout
        replies[i] = exc
        return False


def _connect_together(wires: Sequence[_Wire], which: Sequence[int]) -> dict[int, Exception]:
    """Open the connections ``wires[i]`` for ``i`` in ``which`` at once, so k stalled
    nodes cost one timeout, not k; the error of each that failed, by index.

    Only on (re)connect, when more than one node needs it (a lone one is opened
    by the send that follows, which raises its error itself).
    """
    failed: dict[int, Exception] = {}
    if len(which) < 2:
        return failed

    def open_one(i: int) -> None:
        try:
            wires[i].connect()
        except _IO_ERRORS as exc:  # the node's own error, not "skipped after" it
            failed[i] = exc

    threads = [threading.Thread(target=open_one, args=(i,), daemon=True) for i in which[1:]]
    for thread in threads:
        thread.start()
    try:
        open_one(which[0])
    finally:
        for thread in threads:
            thread.join()
    return failed


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
        self._idle: list[list[_Wire]] = []
        self._health = [_Health() for _ in self.nodes]
        #: counts close() calls: a call in flight across one closes its connections
        #: when it ends, rather than leave them open in the idle list
        self._closes = 0
        _FANOUTS.add(self)

    def cooling_until(self, i: int) -> float:
        """Until when node ``i`` is skipped after a failure (monotonic; 0.0: it is not)."""
        return self._health[i].down_until

    def _forget_connections(self) -> None:
        # In a forked child: the parent's sockets are not ours to use or shut down.
        self._idle = []

    def close(self) -> None:
        """Close every idle connection, after reading the replies they still owe
        (a forgotten script among them runs again first)."""
        self._closes += 1
        idle, self._idle = self._idle, []
        for wires in idle:
            for wire in wires:
                if wire.owed:
                    with contextlib.suppress(Exception):
                        for again in wire.settle():
                            _resend(wire, again, None)
                wire.close()

    def script(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[bytes | str | int],
        targets: Iterable[int] | None = None,
        enough: tuple[Callable[[Reply], bool], int] | None = None,
    ) -> list[Reply]:
        """Run ``script`` by EVALSHA on every node (or ``targets``); see :meth:`call`."""
        return self.call(
            script.evalsha_head(len(keys), len(args)) + pack_args(*keys, *args),
            lambda: pack(b"EVAL", script.source, len(keys), *keys, *args),
            targets,
            enough,
        )

    def call(
        self,
        packed: bytes,
        fallback: Callable[[], bytes] | None = None,
        targets: Iterable[int] | None = None,
        enough: tuple[Callable[[Reply], bool], int] | None = None,
    ) -> list[Reply]:
        """Send ``packed`` to every node (or to ``targets``) and return the replies in order.

        A reply is the node's value, or the exception that stands for it
        (:class:`redis.TimeoutError`, :class:`redis.ConnectionError`, or a
        :class:`redis.ResponseError` the node answered). Nodes not targeted get
        ``None``. A node that answers NOSCRIPT (its script cache was flushed)
        is sent ``fallback()``, the same call as EVAL.

        ``enough=(ok, count)``: return as soon as ``count`` replies satisfy
        ``ok``; the other replies are :data:`UNREAD`. They are read, and a
        NOSCRIPT among them answered with its EVAL, by the next call on those
        connections before it sends anything, so every node still runs the
        commands in the order they were given; a connection owing
        :data:`MAX_OWED` replies is read through. Replies owed by plain commands
        only (no fallback: nothing of theirs may have to run again) do not
        hold the next call back: it sends at once and reads them before its
        own reply. A node may apply a command a moment after this returns.
        Connections to test doubles are always read through.
        """
        closes = self._closes
        try:
            wires = self._idle.pop()
        except IndexError:
            wires = [_Wire(n, self.timeout, h) for n, h in zip(self.nodes, self._health)]
        replies: list[Reply] = [None] * len(wires)
        sent: list[int] = []
        order = range(len(wires)) if targets is None else list(targets)
        ok, wanted = enough if enough is not None else (None, 0)
        good = 0
        # One deadline for the whole call, counted from its start: a connection
        # that took the timeout to open is not followed by a second full wait for a
        # reply an earlier call left on another node.
        deadline = time.monotonic() + self.timeout
        try:
            failed = _connect_together(wires, [i for i in order if wires[i].sock is None])
            held: set[int] = set()
            for i in order:
                wire = wires[i]
                if failed and i in failed:
                    replies[i] = failed[i]
                elif wire.owed and not any(wire.owed):
                    # Only plain commands' replies are owed: nothing of theirs may have
                    # to run again, so this command follows them at once; the reading
                    # below takes theirs first.
                    if _send(wire, packed, replies, i, settle=False):
                        sent.append(i)
                elif not wire.owed or wire.owed_ready():
                    if _send(wire, packed, replies, i):
                        sent.append(i)
                else:
                    held.add(i)  # a script's reply is still on the way: sent below
            late = False
            for i in sorted([*sent, *held]) if held else sent:
                wire = wires[i]
                if i in held:
                    # The earlier reply first (same deadline), then this command.
                    if not _wait_ready(wire, deadline):
                        replies[i] = wire.fail(
                            redis.TimeoutError(f"no reply from {wire.node.name} in {self.timeout}s")
                        )
                        late = True
                        continue
                    if not _send(wire, packed, replies, i):
                        continue
                elif late and not wire.owed_ready(also=1):  # it had the whole timeout too
                    replies[i] = wire.fail(
                        redis.TimeoutError(f"no reply from {wire.node.name} within {self.timeout}s")
                    )
                    continue
                if ok is not None and good >= wanted and wire.raw and len(wire.owed) < MAX_OWED:
                    wire.owed.append(fallback)  # read by the next call on this connection
                    replies[i] = UNREAD
                    continue
                try:
                    try:
                        if wire.owed:  # plain replies sent for before this command
                            wire.settle()
                        reply = wire.read()
                    except _Stale:  # the server closed it while idle; our scripts are idempotent
                        wire.send(packed)
                        reply = wire.read()
                    if type(reply) is NoScriptError:
                        reply = _resend(wire, fallback, reply)
                    replies[i] = reply
                    if ok is not None and ok(reply):
                        good += 1
                except redis.TimeoutError as exc:
                    late = True
                    replies[i] = exc
                except _IO_ERRORS as exc:
                    replies[i] = exc
        except BaseException:
            # Interrupted half-way (KeyboardInterrupt): replies may be left unread.
            for wire in wires:
                wire.close()
            raise
        finally:
            if self._closes == closes:
                self._idle.append(wires)
            else:  # close() ran meanwhile (another thread): these close too
                for wire in wires:
                    with contextlib.suppress(*_IO_ERRORS, _Stale):
                        if wire.owed:
                            for again in wire.settle():
                                _resend(wire, again, None)
                    wire.close()
        return replies

    def admin_call(self, commands: Sequence[bytes], timeout: float) -> list[list[Reply]]:
        """Send ``commands`` to every node on new connections with ``timeout``.

        For rare administrative work (version checks, the CLI). Returns, per
        node, one reply per command.
        """
        wires = [_Wire(node, timeout) for node in self.nodes]
        replies: list[list[Reply]] = [[] for _ in wires]
        try:
            failed = _connect_together(wires, range(len(wires)))
            for i, wire in enumerate(wires):
                if i in failed:
                    replies[i] = [failed[i]] * len(commands)
                    continue
                try:
                    wire.send(b"".join(commands))
                except _IO_ERRORS as exc:
                    replies[i] = [exc] * len(commands)
            for i, wire in enumerate(wires):
                while len(replies[i]) < len(commands):
                    try:
                        replies[i].append(wire.read())
                    except _Stale:
                        replies[i].extend(
                            [redis.ConnectionError(f"{wire.node.name} closed the connection")]
                            * (len(commands) - len(replies[i]))
                        )
                    except _IO_ERRORS as exc:
                        replies[i].extend([exc] * (len(commands) - len(replies[i])))
        finally:
            for wire in wires:
                wire.close()
        return replies


def _resend(wire: _Wire, fallback: Callable[[], bytes] | None, exc: Reply) -> Reply:
    if fallback is None:
        return exc
    try:
        wire.send(fallback())
        return wire.read()
    except _Stale:
        return redis.ConnectionError(f"{wire.node.name} closed the connection")
    except _IO_ERRORS as exc2:
        return exc2


def classify(node: Node, reply: Reply, yes: bool) -> NodeVote:
    """Turn one reply into a :class:`NodeVote` (``yes`` decides between YES and HELD)."""
    if isinstance(reply, (TimeoutError, redis.TimeoutError)):
        said = _scrub(str(reply))
        return NodeVote(node.name, Vote.TIMEOUT, f"no reply within the per-node timeout ({said})")
    if isinstance(reply, BaseException):
        said = _scrub(str(reply))
        return NodeVote(node.name, Vote.ERROR, f"{type(reply).__name__}: {said}")
    return NodeVote(node.name, Vote.YES if yes else Vote.HELD)
