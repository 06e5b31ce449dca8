"""Redlock: one lock over N independent Redis masters.

:class:`Redlock` is the manager (nodes, settings, connections) and
:class:`Lock` the handle of one held lock. The algorithm is the one of the
Redis documentation ("Distributed locks with Redis"):

1. ``SET key token NX PX ttl`` is sent to every node at once (a Lua script
   that also re-arms a key already holding the same token), each reply read
   with a per-node timeout far below the TTL.
2. The lock holds when at least ``N // 2 + 1`` nodes said yes and the time
   spent, on the monotonic clock, leaves a validity
   ``ttl - elapsed - (drift_factor * ttl + 2 ms)`` above zero.
3. Otherwise the key is released on every node (also those that erred or
   timed out: a lost reply may hide an applied SET), and the attempt is
   retried after a random delay in ``[0, retry_delay]``.

Keys carry no prefix here: a lock on ``"x"`` is the Redis key ``x`` holding
the token, as every other Redlock client writes it.

This module does not import celery.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import secrets
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as NodeTimeout

from . import _process, _resend, _scripts
from ._nodes import UNREAD, Fanout, Node, classify, pack, parse_servers
from ._wakeup import Listener
from .exceptions import (
    LockExtendError,
    LockNotAcquired,
    LockNotOwned,
    NodeVote,
    QuorumUnavailable,
    RedlockConfigError,
    ServerVersionError,
    Vote,
)

__all__ = ["Lock", "LockInfo", "Redlock"]

_log = logging.getLogger(__name__)

#: Redis' expiry precision (1 ms) plus 1 ms, added to the clock drift allowance.
DRIFT_CONSTANT = 0.002
#: The first Redis release with ``SET ... NX PX``.
MIN_REDIS_VERSION = (2, 6, 12)
#: Seconds after releasing a resource during which this manager's own ``wait=``
#: acquire of it steps back (the same random pause the woken waiters take).
HANDOFF_COURTESY = 0.005
#: Appended to a resource to name its fencing counter key.
FENCE_SUFFIX = ":fence"

LoggerSpec = Union[logging.Logger, Callable[[str], object], None]  # noqa: UP007
_DEFAULT: Any = object()
_WARNED: set[str] = set()


def _number(
    name: str,
    value: object,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    maximum: float = math.inf,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RedlockConfigError(f"{name} must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise RedlockConfigError(f"{name} must be a finite number {bound}, not {value!r}")
    if number > maximum:
        raise RedlockConfigError(
            f"{name} must be at most {maximum:.0f} s, not {value!r}: longer overflows the "
            "clocks it waits on"
        )
    return number


#: The longest ``node_timeout`` (1 day): the sockets' poll() stops at about 24 days.
MAX_NODE_TIMEOUT = 86400.0


#: The longest TTL accepted (10 years): longer ones overflow Redis' expiry clock.
MAX_TTL = 10 * 365 * 24 * 3600.0


def _ttl_ms(ttl: object) -> int:
    seconds = _number("ttl", ttl, strict=True)
    ms = int(seconds * 1000)
    if ms < 1:
        raise RedlockConfigError(f"ttl must be at least 0.001 s (1 ms), not {ttl!r}")
    if seconds > MAX_TTL:
        raise RedlockConfigError(
            f"ttl must be at most {MAX_TTL:.0f} s (10 years), not {ttl!r}; a lock that should "
            "outlive its holder that long is not a lock"
        )
    return ms


def _encodable(what: str, text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise RedlockConfigError(
            f"{what} {text!r} cannot be encoded as UTF-8 ({exc.reason}); pass valid text"
        ) from None
    return text


def _resource(resource: object) -> str:
    if not isinstance(resource, str) or not resource:
        raise RedlockConfigError(f"the resource must be a non-empty str, not {resource!r}")
    return _encodable("the resource", resource)


def _value(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise RedlockConfigError(f"a lock value (token) must be a non-empty str, not {value!r}")
    return _encodable("the lock value", value)


class _Logger:
    """The ``logger`` argument: a Logger, a callable taking the message, or None."""

    def __init__(self, target: LoggerSpec) -> None:
        self.target = target

    def log(self, level: int, msg: str, *args: object) -> None:
        target = self.target
        if target is None:
            return
        if isinstance(target, logging.Logger):
            target.log(level, msg, *args)
        elif level >= logging.WARNING:
            target(msg % args if args else msg)


@dataclass(frozen=True)
class LockInfo:
    """What the nodes say about one key: the quorum's holder and the TTL left."""

    resource: str
    #: the token held on a quorum of nodes, or None
    holder: str | None
    #: seconds left on the key on the quorum's nodes (smallest), or None
    ttl_left: float | None
    #: how many nodes hold ``holder``'s token (or, when none has a quorum, the most common one)
    nodes_holding: int
    #: every node's view: (node, token or None, ms left or None for errors)
    per_node: tuple[tuple[str, str | None, int | None], ...] = ()


@dataclass(eq=False)
class Lock:
    """A held lock: what :meth:`Redlock.lock` returns.

    ``validity`` is the number of seconds the lock was known valid for when
    acquired (or last extended), ``expires_at`` the same as a
    :func:`time.monotonic` deadline (None for a handle rebuilt from
    ``(resource, value)``, whose deadline is unknown here) and ``fence`` the
    fencing token when the lock was taken with ``fencing=True``.

    A handle can be rebuilt in another process from ``(resource, value)`` to
    release or extend the lock: ``Lock("foo", "task-id", manager=rl)``.
    """

    resource: str
    value: str
    validity: float = 0.0
    expires_at: float | None = None
    fence: int | None = None
    manager: Redlock | None = field(default=None, repr=False, compare=False)
    #: the latest time (monotonic) the key could live to, from what this handle
    #: armed it with (acquire, extend); 0.0 for a handle built by hand
    _armed: float = field(default=0.0, init=False, repr=False, compare=False)
    #: the nodes that may hold the key (granted, or their reply was not read)
    _maybe: frozenset[int] = field(default=frozenset(), init=False, repr=False, compare=False)

    def _manager(self) -> Redlock:
        if self.manager is None:
            raise RedlockConfigError(
                f"lock {self.resource!r} has no manager; rebuild it with "
                "Lock(resource, value, manager=redlock) or call redlock.release(lock)"
            )
        return self.manager

    @property
    def remaining(self) -> float | None:
        """Seconds until the validity deadline (0 once past), or None when unknown."""
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - time.monotonic())

    def release(self) -> bool:
        """Release the lock; True when this token still held it on a quorum."""
        return self._manager().release(self)

    def extend(self, ttl: float) -> bool:
        """Re-arm the lock for ``ttl`` seconds; True when re-armed on a quorum in time."""
        return self._manager().extend(self, ttl)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Trail:
    """What one attempt did so far: what an undo needs when it is interrupted."""

    __slots__ = ("carried", "scripted")

    def __init__(self) -> None:
        #: what an earlier attempt or release left to send again (see _resend.forget)
        self.carried: tuple[set[int], float] | None = None
        #: the nodes a takeover script is sent to (noted before it goes out)
        self.scripted: list[int] = []


def _shutdown(fanout: Fanout, listener: Listener, held: dict[tuple[str, str], int]) -> None:
    """Close a manager: release ``held`` (auto_release), stop the listener, close connections.

    Runs at ``close()``, when the manager is collected, or at interpreter exit.
    In a forked child it releases only the locks the child took and closes
    only the child's connections: the parent's locks and sockets are the
    parent's (``held`` maps each lock to the pid that took it).
    """
    listener.close()
    _resend.drop(fanout)  # closed: nothing is sent again from here
    me = os.getpid()
    for (resource, value), pid in list(held.items()):
        if pid != me:
            continue
        with contextlib.suppress(Exception):  # best effort, also at interpreter exit
            fanout.script(_scripts.RELEASE, (resource.encode(),), (value,))
        held.pop((resource, value), None)
    fanout.close()


class Redlock:
    """A lock manager over N independent Redis masters.

    :param servers: the masters: ``redis://``, ``rediss://`` (TLS) or
        ``unix://`` URLs (user and password allowed), ``"host:port"``
        strings, or ready ``redis.Redis`` clients; one spec or a list.
    :param retry_count: attempts per :meth:`lock` call (default 3; 0 means one).
    :param retry_delay: the most seconds to wait between attempts; each wait
        is random in ``[0, retry_delay]`` (default 0.2).
    :param drift_factor: clock drift allowance as a share of the TTL, in
        ``[0, 0.5)`` (default 0.01).
    :param version_check: at construction, check every node runs Redis >=
        2.6.12 and that a quorum is reachable, and warn once about replicas,
        eviction policies that can drop locks, and a node count under 3 or even.
    :param logger: a :class:`logging.Logger`, a callable taking a message
        (warnings and errors only), or None to silence. Default:
        ``logging.getLogger("celery_redlock.redlock")``.
    :param auto_release: release every lock this manager still holds when it
        is closed, collected, or the interpreter exits (default False).
    :param node_timeout: seconds to wait for one node's reply or connection
        (default 0.1). Keep it far below the TTLs you use.
    """

    def __init__(
        self,
        servers: object,
        *,
        retry_count: int = 3,
        retry_delay: float = 0.2,
        drift_factor: float = 0.01,
        version_check: bool = True,
        logger: LoggerSpec = _DEFAULT,
        auto_release: bool = False,
        node_timeout: float = 0.1,
    ) -> None:
        if isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0:
            raise RedlockConfigError(
                f"retry_count must be an int >= 0 (0 means a single attempt), not {retry_count!r}"
            )
        self.retry_count = retry_count
        self.retry_delay = _number("retry_delay", retry_delay, maximum=MAX_TTL)
        self.drift_factor = _number("drift_factor", drift_factor)
        if self.drift_factor >= 0.5:
            raise RedlockConfigError(
                f"drift_factor must be in [0, 0.5), not {drift_factor!r}; 0.01 is usual"
            )
        self.node_timeout = _number(
            "node_timeout", node_timeout, strict=True, maximum=MAX_NODE_TIMEOUT
        )
        self.auto_release = bool(auto_release)
        self._log = _Logger(_log if logger is _DEFAULT else logger)
        self.nodes: tuple[Node, ...] = tuple(parse_servers(servers))
        self.quorum = len(self.nodes) // 2 + 1
        self._fanout = Fanout(self.nodes, self.node_timeout)
        # A call returns once a quorum said yes; the other replies are read later.
        self._enough_ok = (_is_ok, self.quorum)
        self._enough_one = (_is_one, self.quorum)
        self._enough_held = (_holds_it, self.quorum)
        #: (resource, token) -> pid of the process that took it (auto_release)
        self._held: dict[tuple[str, str], int] = {}
        self._listener = Listener(self.nodes)
        #: the last resource this manager released, and when (for hand-off courtesy)
        self._just_released: tuple[bytes, float] = (b"", 0.0)
        self._finalizer = weakref.finalize(
            self,
            _shutdown,
            self._fanout,
            self._listener,
            self._held if self.auto_release else {},
        )
        if version_check:
            self.check_servers()

    # -- construction checks -------------------------------------------------

    def server_facts(self, timeout: float = 2.0) -> list[dict[str, str]]:
        """Each node's facts, never raising: ``node``, ``reachable`` ("yes"/"no"),
        ``error``, ``auth_error`` ("yes" when the credentials were refused), and
        from INFO/CONFIG ``redis_version``, ``role``, ``maxmemory-policy``,
        ``appendonly``, ``appendfsync`` (empty when the node does not tell)."""
        commands = [
            pack("INFO", "server"),
            pack("INFO", "replication"),
            pack("CONFIG", "GET", "maxmemory-policy"),
            pack("CONFIG", "GET", "appendonly"),
            pack("CONFIG", "GET", "appendfsync"),
        ]
        replies = self._fanout.admin_call(commands, max(self.node_timeout, timeout))
        facts: list[dict[str, str]] = []
        for node, (server, replication, policy, aof, fsync) in zip(self.nodes, replies):
            if isinstance(server, BaseException) and not isinstance(server, ResponseError):
                text = f"{type(server).__name__} {server}".upper()
                facts.append(
                    {
                        "node": node.name,
                        "reachable": "no",
                        "error": classify(node, server, False).detail,
                        "auth_error": "yes" if "AUTH" in text or "WRONGPASS" in text else "",
                    }
                )
                continue
            # A node that refuses INFO (renamed command, a test double) still answers.
            info = {} if isinstance(server, BaseException) else _parse_info(server)
            if not isinstance(replication, BaseException):
                info.update(_parse_info(replication))
            info["maxmemory-policy"] = _config_value(policy)
            info["appendonly"] = _config_value(aof)
            info["appendfsync"] = _config_value(fsync)
            info["node"] = node.name
            info["reachable"] = "yes"
            facts.append(info)
        return facts

    def check_servers(self) -> list[dict[str, str]]:
        """Check the nodes' versions and settings; return each node's facts.

        Raises :class:`ServerVersionError` for a node older than 2.6.12,
        :class:`RedlockConfigError` for a node that rejects the credentials,
        and :class:`QuorumUnavailable` when fewer than a quorum answer.
        Warns once per node about replicas and eviction policies, and once
        about a node count under 3 or even.
        """
        facts = self.server_facts()
        votes: list[NodeVote] = []
        run_ids: dict[str, str] = {}
        for info in facts:
            run_id = info.get("run_id")
            if run_id and run_id in run_ids:
                raise RedlockConfigError(
                    f"servers {run_ids[run_id]} and {info['node']} are the same Redis server "
                    "under two names; each Redlock node must be a different, independent master"
                )
            if run_id:
                run_ids[run_id] = info["node"]
        for info in facts:
            name = info["node"]
            if info.get("auth_error"):
                raise RedlockConfigError(
                    f"Redis node {name} rejected the connection: {info['error']}; "
                    "check the user name and password in its URL"
                )
            if info["reachable"] != "yes":
                votes.append(NodeVote(name, Vote.ERROR, info["error"]))
                continue
            votes.append(NodeVote(name, Vote.YES))
            version = _version_tuple(info.get("redis_version", "99"))
            if version < MIN_REDIS_VERSION:
                raise ServerVersionError(
                    f"Redis node {name} runs {info.get('redis_version', 'unknown')}; "
                    "Redlock needs 2.6.12 or newer (SET with NX and PX)"
                )
            role = info.get("role", "master")
            if role != "master":
                self._warn_once(
                    f"role:{name}",
                    "Redis node %s is a %s, not a master; a lock written to a replica may "
                    "be lost on failover. Point Redlock at independent masters.",
                    name,
                    role,
                )
            policy_name = info["maxmemory-policy"]
            if policy_name not in ("", "noeviction"):
                self._warn_once(
                    f"policy:{name}",
                    "Redis node %s has maxmemory-policy %s, which can evict lock keys "
                    "before they expire; use noeviction on lock nodes.",
                    name,
                    policy_name,
                )
        reachable = sum(1 for v in votes if v.vote is Vote.YES)
        if reachable < self.quorum:
            raise QuorumUnavailable(
                f"only {reachable} of {len(self.nodes)} Redis nodes answered, fewer than the "
                f"quorum of {self.quorum}: " + ", ".join(str(v) for v in votes),
                votes,
            )
        n = len(self.nodes)
        if n < 3 or n % 2 == 0:
            self._warn_once(
                f"count:{','.join(node.name for node in self.nodes)}",
                "Redlock over %d node(s) tolerates %d failure(s); an odd count of 3 or more "
                "(3 or 5) is the usual choice.",
                n,
                (n - 1) // 2,
            )
        return facts

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in _WARNED:
            _WARNED.add(key)
            self._log.log(logging.WARNING, msg, *args)

    # -- acquiring -------------------------------------------------------------

    def _attempt(
        self,
        resource: str,
        key: bytes,
        token: str,
        ttl: float,
        ttl_ms: int,
        fencing: bool,
        fresh: bool,
        takeover: str | None,
        trail: _Trail,
    ) -> tuple[Lock | None, list[NodeVote], str | None]:
        """One attempt on every node. ``trail`` notes, as it goes, what the undo of an
        interrupted attempt needs (see :meth:`acquire`)."""
        fanout = self._fanout
        # No late delete of this token from here; kept again below if this attempt fails.
        carried = trail.carried = _resend.forget(fanout, key, token)
        start = time.monotonic()
        args: tuple[str | int, ...] = (token, ttl_ms)
        if takeover is not None:
            args = (token, ttl_ms, takeover)
        # codes: each node's ACQUIRE answer (1 set, 2 taken over, 3 re-armed, 0 held)
        if fencing:
            fence_key = key + FENCE_SUFFIX.encode()
            # (Interrupted, a fenced takeover is released everywhere: the script also
            # sets free keys, which a give-back would turn into reservations.)
            replies = fanout.script(_scripts.ACQUIRE_FENCED, (key, fence_key), args)
            read = [r for r in replies if isinstance(r, list) and len(r) == 3]
            codes: list[Any] = [r[0] if isinstance(r, list) and r else None for r in replies]
        elif fresh or takeover is not None:
            # A fresh token (made here, or a run's own when taking over) is held by no
            # one yet: the plain command does (less work on each node than a script).
            replies = fanout.call(
                pack(b"SET", key, token, b"NX", b"PX", ttl_ms), enough=self._enough_ok
            )
            codes = [1 if r == b"OK" else None for r in replies]
            held = [] if takeover is None else [i for i, r in enumerate(replies) if r is None]
            if held and codes.count(1) + len(held) >= self.quorum:
                # Nodes holding a token: the script takes it over where it is
                # ``takeover`` (also past a quorum, so the reservation does not linger
                # there; a node left unread at quorum may keep it until it expires).
                trail.scripted = held  # (before sending: an interruption may come in the send)
                again = fanout.script(_scripts.ACQUIRE, (key,), args, targets=held)
                for i in held:
                    replies[i] = codes[i] = again[i]
        else:
            replies = fanout.script(_scripts.ACQUIRE, (key,), args, enough=self._enough_held)
            codes = list(replies)
        granted = [i for i, c in enumerate(codes) if _holds_it(c)]
        taken = [i for i, c in enumerate(codes) if c == 2 and type(c) is int]  # given back
        kept = [i for i, c in enumerate(codes) if c == 3 and type(c) is int]  # not undone
        drift = self.drift_factor * ttl + DRIFT_CONSTANT
        elapsed = time.monotonic() - start
        fence: int | None = None
        if len(granted) >= self.quorum and ttl - elapsed - drift > 0 and fencing:
            # Above every counter a node answered with (held ones too), and above
            # the nodes' clocks in µs, so a counter lost with a node's data is
            # not handed out again while clocks go forward.
            fence = max(max(int(r[1]) for r in read) + 1, max(int(r[2]) for r in read))
            written = fanout.script(
                _scripts.FENCE_WRITE, (key, fence_key), (token, fence), targets=granted
            )
            granted = [i for i in granted if written[i] == 1]
            elapsed = time.monotonic() - start
        validity = ttl - elapsed - drift
        if len(granted) >= self.quorum and validity > 0:
            lock = Lock(resource, token, validity, start + ttl - drift, fence, self)
            lock._armed = start + ttl + self.node_timeout
            lock._maybe = frozenset(
                i
                for i, r in enumerate(replies)
                if i in granted or r is UNREAD or isinstance(r, NodeTimeout)
            )
            if self.auto_release:
                self._held[(resource, token)] = _process.pid()
            return lock, [], None
        votes = self._votes(replies, granted)
        # Undo on every node: a SET may have been applied where the reply was lost. Where
        # a reservation was taken over, give it back rather than delete it; where the
        # token was already held (an owner re-entering), leave the owner's hold.
        if taken:
            assert takeover is not None
            fanout.script(_scripts.REASSIGN, (key,), (token, takeover, ttl_ms), targets=taken)
        if taken or kept:
            rest = [i for i in range(len(self.nodes)) if i not in taken and i not in kept]
            undone = fanout.script(_scripts.UNDO, (key,), (token,), targets=rest)
        else:
            rest = list(range(len(self.nodes)))
            undone = fanout.script(_scripts.UNDO, (key,), (token,))
        # A new token's undo (one made here, or a run's own taking over) is sent again,
        # when they answer, to the nodes it missed where the SET may be applied (it
        # timed out there, or was applied); not where it was never sent (a node
        # skipped, a connection refused). A token the caller gave may be the caller's
        # own hold, re-entered: a late delete is not ours to send.
        missed = set()
        if fresh or takeover is not None:
            missed = {
                i
                for i in rest
                if isinstance(undone[i], Exception)
                and (not isinstance(replies[i], Exception) or isinstance(replies[i], NodeTimeout))
            }
        until = start + ttl
        if carried is not None:  # what an earlier attempt or release left to send
            missed |= carried[0]
            until = max(until, carried[1])
        if missed:
            _resend.resend(fanout, key, token, missed, until)
        too_slow = None
        if len(granted) >= self.quorum:
            too_slow = (
                f"lock {resource!r} was granted by {len(granted)} of {len(self.nodes)} nodes "
                f"but only after {elapsed:.3f} s, leaving no validity of its {ttl} s TTL "
                f"(drift allowance {drift:.3f} s); raise the ttl or lower node latency"
            )
        return None, votes, too_slow

    def _votes(self, replies: list[Any], granted: list[int]) -> list[NodeVote]:
        grant = set(granted)
        return [
            NodeVote(node.name, Vote.TIMEOUT, "not read: a quorum had answered first")
            if reply is UNREAD
            else classify(node, reply, i in grant)
            for i, (node, reply) in enumerate(zip(self.nodes, replies))
        ]

    def acquire(
        self,
        resource: str,
        ttl: float,
        value: str | None = None,
        *,
        fencing: bool = False,
        wait: float | None = None,
        retry_count: int | None = None,
        retry_delay: float | None = None,
        takeover: str | None = None,
    ) -> Lock:
        """Acquire ``resource`` for ``ttl`` seconds, or raise :class:`LockNotAcquired`.

        ``value`` is the token (default: 16 random bytes as 32 hex digits). A
        node already holding the same token counts as granted and has its TTL
        re-armed, so an owner may re-enter its own lock.

        ``takeover``: a token the lock may be taken from. A node holding
        exactly this token counts as granted and gets ``value`` instead: a
        reservation (see :meth:`reassign`) handed to its next holder. The
        attempt first sets ``value`` with a plain ``SET NX`` and asks only
        the nodes that hold a token to hand it over, so ``value`` should be
        new (a node already holding it still counts as granted). A task
        kept between a run and its retry under its task id is taken over by
        the retried run's own token, ``"<task id>|<run>"``, which a second
        delivery of the same message cannot re-enter.

        ``wait``: keep trying for up to this many seconds instead of
        ``retry_count`` attempts.

        ``fencing=True`` sets :attr:`Lock.fence`: an integer that strictly
        increases for each successive holder of ``resource``. Each node keeps a
        counter (key ``resource + ":fence"``, no TTL); the new fence is above
        every counter the nodes answered with (those holding another token
        too) and above the nodes' clocks in microseconds, and it is written
        back to a quorum, under the lock, before the lock is returned. Two
        quorums share a node, so the next holder reads at least this value.
        The order holds while a quorum keeps its data; when nodes lose theirs
        (a restart without ``appendfsync always``), it still holds as long as
        the nodes' clocks are not stepped back. Pass the fence to the storage
        you write to and have it refuse a write with a lower fence than one it
        has seen: that, not the lock alone, makes the write safe against a
        holder that paused past its TTL. It costs one more round trip.
        """
        resource = _resource(resource)
        ttl_ms = _ttl_ms(ttl)
        ttl = ttl_ms / 1000.0
        if ttl * (1 - self.drift_factor) <= DRIFT_CONSTANT:
            raise RedlockConfigError(
                f"ttl {ttl!r} s is too short to ever be valid: the clock drift allowance "
                f"(drift_factor * ttl + {DRIFT_CONSTANT} s) eats it all; use at least 0.01 s"
            )
        if ttl <= 2 * self.node_timeout:
            self._warn_once(
                f"ttl:{ttl}:{self.node_timeout}",
                "ttl %s s is not far above node_timeout %s s: one slow node can use up the "
                "whole validity; use a TTL many times the node timeout",
                ttl,
                self.node_timeout,
            )
        token = secrets.token_hex(16) if value is None else _value(value)
        if takeover is not None:
            takeover = _value(takeover)
            if value is None:
                raise RedlockConfigError(
                    f"taking {resource!r} over from {takeover!r} needs the new holder's "
                    "value: redlock.acquire(resource, ttl, value, takeover=old_value)"
                )
        attempts = max(1, self.retry_count if retry_count is None else retry_count)
        delay = (
            self.retry_delay
            if retry_delay is None
            else _number("retry_delay", retry_delay, maximum=MAX_TTL)
        )
        deadline = None if wait is None else time.monotonic() + _number("wait", wait)
        key = resource.encode()
        tried = 0
        # A waiter is woken by the holder's release; the retry delay is the fallback poll.
        wakeup = self._listener.register(key) if deadline is not None else None
        released, when = self._just_released
        if wakeup is not None and released == key and time.monotonic() - when < HANDOFF_COURTESY:
            # This manager has just released it: let the woken waiters go first.
            time.sleep(random.uniform(0, 0.001 * self.quorum))
        try:
            while True:
                tried += 1
                if wakeup is not None:
                    wakeup.clear()
                trail = _Trail()
                try:
                    lock, votes, too_slow = self._attempt(
                        resource, key, token, ttl, ttl_ms, fencing, value is None, takeover, trail
                    )
                except BaseException:
                    self._undo_interrupted(key, token, ttl_ms, value is None, takeover, trail)
                    raise
                if lock is not None:
                    return lock
                self._log_attempt(resource, tried, votes)
                if deadline is None:
                    if tried >= attempts:
                        break
                    time.sleep(random.uniform(0, delay))
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if wakeup is not None and wakeup.wait(min(delay, left)):
                    # Released: contenders woken together spread out a little.
                    time.sleep(random.uniform(0, min(0.001 * self.quorum, left)))
        finally:
            if wakeup is not None:
                self._listener.unregister(key, wakeup)
        error = LockNotAcquired(resource, votes, tried, too_slow)
        if error.unavailable:
            self._log.log(logging.WARNING, "%s", error)
        raise error

    def _undo_interrupted(
        self,
        key: bytes,
        token: str,
        ttl_ms: int,
        fresh: bool,
        takeover: str | None,
        trail: _Trail,
    ) -> None:
        """Undo an attempt interrupted mid-call (a signal handler's exception, such as
        a soft time limit or a SIGTERM), before that exception propagates.

        As a failed attempt's undo: the key is given back to ``takeover`` on the
        nodes the takeover was sent to (where it took a hand-over's or a task id's
        reservation, what that token carried is not lost) and released on the
        others. A token the caller gave without a takeover is left: it may be the
        caller's own hold, re-entered, not ours to delete. What an earlier attempt
        left to send again is kept.
        """
        fanout = self._fanout
        missed: set[int] = set()
        until = time.monotonic() + ttl_ms / 1000.0  # a SET sent before now is gone by then
        with contextlib.suppress(Exception):
            if takeover is not None and trail.scripted:
                fanout.script(
                    _scripts.REASSIGN, (key,), (token, takeover, ttl_ms), targets=trail.scripted
                )
                rest = [i for i in range(len(self.nodes)) if i not in trail.scripted]
            elif fresh or takeover is not None:
                rest = list(range(len(self.nodes)))
            else:
                rest = []
            if rest:
                undone = fanout.script(_scripts.UNDO, (key,), (token,), targets=rest)
                missed = {i for i in rest if isinstance(undone[i], Exception)}
        if trail.carried is not None:
            missed |= trail.carried[0]
            until = max(until, trail.carried[1])
        if missed:  # sent again when they answer, as a failed attempt's undo
            with contextlib.suppress(Exception):
                _resend.resend(fanout, key, token, missed, until)

    def _log_attempt(self, resource: str, tried: int, votes: list[NodeVote]) -> None:
        failed = [v for v in votes if v.vote in (Vote.ERROR, Vote.TIMEOUT)]
        if failed:
            self._log.log(
                logging.DEBUG,
                "lock %r attempt %d: nodes failed: %s",
                resource,
                tried,
                ", ".join(map(str, failed)),
            )

    def lock(
        self,
        resource: str,
        ttl: float,
        value: str | None = None,
        *,
        fencing: bool = False,
        wait: float | None = None,
    ) -> Lock | None:
        """Acquire ``resource`` for ``ttl`` seconds; the :class:`Lock`, or None if not acquired.

        Arguments as :meth:`acquire`.
        """
        try:
            return self.acquire(resource, ttl, value, fencing=fencing, wait=wait)
        except LockNotAcquired:
            return None

    @contextmanager
    def locked(
        self,
        resource: str,
        ttl: float,
        value: str | None = None,
        *,
        wait: float | None = None,
        fencing: bool = False,
    ) -> Iterator[Lock]:
        """``with rl.locked("foo", 10, wait=5) as lock:`` holds the lock for the block.

        Raises :class:`LockNotAcquired` when the lock is not had within
        ``wait`` seconds (or ``retry_count`` attempts when ``wait`` is None).
        Releases the lock when the block ends.
        """
        lock = self.acquire(resource, ttl, value, fencing=fencing, wait=wait)
        try:
            yield lock
        finally:
            self.release(lock)

    # -- release, extend, inspect ---------------------------------------------

    def _handle(self, lock: Lock | str, value: str | None) -> tuple[str, str]:
        if isinstance(lock, Lock):
            return lock.resource, lock.value
        if value is None:
            raise RedlockConfigError(
                f"releasing or extending {lock!r} by name needs its value (the token): "
                "redlock.release('foo', 'token')"
            )
        return _resource(lock), _value(value)

    def release(
        self,
        lock: Lock | str,
        value: str | None = None,
        *,
        strict: bool = False,
        owner: bool = False,
        prefix: bool = False,
    ) -> bool:
        """Release a lock on every node; True when its token still held it on a quorum.

        Takes a :class:`Lock`, or a resource name and its token. Only keys
        holding the token are deleted. ``strict=True`` raises
        :class:`LockNotOwned` instead of returning False.

        ``owner=True``: ``value`` names an owner, and a key holding ``value``
        itself or any token ``"<value>|..."`` (one of the owner's runs) is
        deleted. ``prefix=True``: a key holding any token that starts with
        ``value`` is deleted: how a Celery worker frees the lock of a task
        run it killed, knowing the task id and the child that ran it
        (``"<task id>|<mark>"``) but not the run's whole token.
        """
        if owner and prefix:
            raise RedlockConfigError(
                "release() takes owner=True or prefix=True, not both: owner frees "
                "'<value>' and '<value>|...', prefix any token starting with value"
            )
        resource, token = self._handle(lock, value)
        key = resource.encode()
        if owner or prefix:  # rare (a worker freeing a killed task's lock): read every reply
            then = "|" if owner else ""
            replies = self._fanout.script(_scripts.RELEASE_OWNED, (key,), (token, then))
        else:
            replies = self._fanout.script(
                _scripts.RELEASE, (key,), (token,), enough=self._enough_one
            )
        self._held.pop((resource, token), None)
        now = time.monotonic()
        self._just_released = (key, now)
        deleted = sum(1 for r in replies if _is_one(r))
        missed = [i for i, r in enumerate(replies) if isinstance(r, Exception)]
        if missed:
            # A Lock this manager armed, not yet expired: its release is sent again to
            # the nodes that may hold it (not one that never had it), until they
            # answer. Not a release by name (its TTL unknown, its token maybe taken
            # again elsewhere).
            again = False
            if isinstance(lock, Lock) and lock._armed > now and not (owner or prefix):
                targets = [i for i in missed if i in lock._maybe]
                if targets:
                    again = True
                    _resend.resend(self._fanout, key, token, targets, lock._armed)
            level = logging.WARNING if len(missed) >= self.quorum else logging.DEBUG
            self._log.log(
                level,
                "release of %r did not reach %d node(s): %s; %s",
                resource,
                len(missed),
                ", ".join(str(classify(self.nodes[i], replies[i], False)) for i in missed),
                "it is sent again to those that may hold the key, until they answer"
                if again
                else "their keys expire by TTL",
            )
        if isinstance(lock, Lock):
            lock.expires_at = time.monotonic() if lock.expires_at is not None else None
            lock.validity = 0.0
        if deleted < self.quorum and strict:
            raise LockNotOwned(resource)
        return deleted >= self.quorum

    def extend(
        self, lock: Lock | str, ttl: float, value: str | None = None, *, strict: bool = False
    ) -> bool:
        """Re-arm a held lock for ``ttl`` seconds from now.

        True when a quorum of nodes still held the token and re-armed it while
        the lock was valid; the :class:`Lock`'s ``validity`` and
        ``expires_at`` are then updated. False otherwise (also for a lock that
        already expired: never an exception unless ``strict=True``, which
        raises :class:`LockExtendError`).
        """
        resource, token = self._handle(lock, value)
        ttl_ms = _ttl_ms(ttl)
        ttl = ttl_ms / 1000.0
        start = time.monotonic()
        known = lock.expires_at if isinstance(lock, Lock) else None
        if known is not None and start >= known:
            if strict:
                raise LockExtendError(resource, message=f"lock {resource!r} expired before extend")
            return False
        if isinstance(lock, Lock) and lock._armed > 0.0:
            lock._armed = max(lock._armed, start + ttl + self.node_timeout)  # even if it times out
        replies = self._fanout.script(_scripts.EXTEND, (resource.encode(),), (token, ttl_ms))
        now = time.monotonic()
        yes = [i for i, r in enumerate(replies) if r == 1 and type(r) is int]
        drift = self.drift_factor * ttl + DRIFT_CONSTANT
        validity = ttl - (now - start) - drift
        in_time = known is None or now < known
        if len(yes) >= self.quorum and validity > 0 and in_time:
            if isinstance(lock, Lock):
                lock.validity = validity
                lock.expires_at = start + ttl - drift
            return True
        if strict:
            raise LockExtendError(resource, self._votes(replies, yes))
        return False

    def reassign(self, lock: Lock, value: str, ttl: float) -> bool:
        """Give a held lock a new token ``value`` and ``ttl`` seconds from now.

        Done on each node where the key still holds the lock's token; True
        when that was a quorum while the lock was valid, and ``lock`` then
        carries the new token (and validity). The new holder may be a
        reservation that a later :meth:`acquire` with ``takeover=value``
        takes over: a Celery task keeps its lock under its task id between a
        run and its retry this way.
        """
        new_value = _value(value)
        ttl_ms = _ttl_ms(ttl)
        ttl = ttl_ms / 1000.0
        start = time.monotonic()
        known = lock.expires_at
        if known is not None and start >= known:
            return False
        _resend.forget(self._fanout, lock.resource.encode(), new_value)
        replies = self._fanout.script(
            _scripts.REASSIGN, (lock.resource.encode(),), (lock.value, new_value, ttl_ms)
        )
        now = time.monotonic()
        yes = sum(1 for r in replies if _is_one(r))
        validity = ttl - (now - start) - (self.drift_factor * ttl + DRIFT_CONSTANT)
        if yes < self.quorum or validity <= 0 or (known is not None and now >= known):
            return False
        taker = self._held.pop((lock.resource, lock.value), None)
        if taker is not None:
            self._held[(lock.resource, new_value)] = taker
        lock.value = new_value
        lock._armed = 0.0  # a reservation others take over: its release is not sent again
        lock.validity = validity
        lock.expires_at = start + ttl - (self.drift_factor * ttl + DRIFT_CONSTANT)
        return True

    def inspect(self, resource: str) -> LockInfo:
        """Read who holds ``resource`` on each node, and for how long."""
        resource = _resource(resource)
        replies = self._fanout.script(_scripts.INSPECT, (resource.encode(),), ())
        per_node: list[tuple[str, str | None, int | None]] = []
        tokens: Counter[str] = Counter()
        ttls: dict[str, list[int]] = {}
        for node, reply in zip(self.nodes, replies):
            if isinstance(reply, BaseException) or not isinstance(reply, list):
                per_node.append((node.name, None, None))
                continue
            raw, pttl = [*reply, None, None][:2]
            token = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None
            per_node.append((node.name, token, int(pttl) if pttl is not None else None))
            if token is not None:
                tokens[token] += 1
                ttls.setdefault(token, []).append(int(pttl) if pttl is not None else -1)
        if not tokens:
            return LockInfo(resource, None, None, 0, tuple(per_node))
        token, count = tokens.most_common(1)[0]
        left = [t for t in ttls[token] if t >= 0]
        ttl_left = min(left) / 1000.0 if left else None
        holder = token if count >= self.quorum else None
        return LockInfo(resource, holder, ttl_left, count, tuple(per_node))

    def holder(self, resource: str) -> str | None:
        """The token that holds ``resource`` on a quorum of nodes, or None."""
        return self.inspect(resource).holder

    def raise_times(
        self,
        resource: str,
        times: Mapping[str, float],
        keep: float,
        forget: Iterable[str] = (),
    ) -> int:
        """Note ``times`` in the hash ``resource`` on every node: each field is raised
        to its time, never lowered; the fields in ``forget`` are dropped first; the
        hash is kept ``keep`` seconds from now. How many nodes took it.

        A record that outlives a lock, read back by :meth:`read_times`: a beat
        leader notes each send in it, for the next leader to go on from.
        """
        resource = _resource(resource)
        dropped = [str(name) for name in forget]
        if not times and not dropped:
            return 0
        args: list[str | int] = [_ttl_ms(keep), len(dropped), *dropped]
        for name, when in times.items():
            if not math.isfinite(when):
                raise ValueError(f"the time of {name!r} must be a finite number, not {when!r}")
            args += [name, repr(float(when))]
        replies = self._fanout.script(_scripts.RAISE_TIMES, (resource.encode(),), args)
        return sum(1 for r in replies if _is_one(r))

    def read_times(self, resource: str) -> tuple[dict[str, float], int]:
        """The times :meth:`raise_times` noted in ``resource``: each field's highest on
        the nodes that answered; and how many nodes answered."""
        resource = _resource(resource)
        replies = self._fanout.call(pack("HGETALL", resource))
        times: dict[str, float] = {}
        answered = 0
        for reply in replies:
            if isinstance(reply, list):  # RESP2: field, value, field, value, ...
                pairs = list(zip(reply[::2], reply[1::2]))
            elif isinstance(reply, dict):  # RESP3
                pairs = list(reply.items())
            else:
                continue
            answered += 1
            for raw_name, raw_when in pairs:
                try:
                    name = bytes(raw_name).decode("utf-8")
                    when = float(bytes(raw_when))
                except (TypeError, ValueError):
                    continue
                if math.isfinite(when) and when > times.get(name, -math.inf):
                    times[name] = when
        return times, answered

    def force_release(self, resource: str) -> int:
        """Delete ``resource``'s key on every node whoever holds it; how many nodes had it.

        An administrator's tool (``celery redlock release``): the holder is not
        told. The fencing counter is kept, so fences stay ordered.
        """
        resource = _resource(resource)
        replies = self._fanout.call(pack("DEL", resource))
        return sum(1 for r in replies if r == 1 and type(r) is int)

    # -- life cycle -------------------------------------------------------------

    def close(self) -> None:
        """Release held locks when ``auto_release`` is set, then close every connection."""
        self._finalizer()

    def __enter__(self) -> Redlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(node.name for node in self.nodes)
        return f"<Redlock [{names}] quorum={self.quorum}>"


def _is_ok(reply: object) -> bool:
    return reply == b"OK"


def _holds_it(reply: object) -> bool:
    """An ACQUIRE reply saying the caller holds the key (set, taken over, or re-armed)."""
    return reply in (1, 2, 3) and type(reply) is int


def _is_one(reply: object) -> bool:
    return reply == 1 and type(reply) is int


def _parse_info(reply: object) -> dict[str, str]:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            name, _, val = line.partition(":")
            info[name.strip()] = val.strip()
    return info


def _config_value(reply: object) -> str:
    if isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], bytes):
        return reply[1].decode()
    if isinstance(reply, dict):  # RESP3
        for val in reply.values():
            return val.decode() if isinstance(val, bytes) else str(val)
    return ""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
