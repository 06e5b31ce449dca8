"""Items 1 and 2 of issue 6: uncontended lock+release cycles per second.

One client thread takes a lock and releases it, over and over, on one
resource nobody else uses. A cycle that does not get the lock, or whose
release does not delete the key, raises: a case must really lock to count.

Baselines, all written the way a careful user of redis-py would:

- ``raw-1``: one ``redis.Redis`` client, ``SET key token NX PX`` then
  ``EVALSHA`` compare-and-delete (the single-node lock everyone starts with);
- ``seq-3``: the same, on 3 clients one after another (a naive Redlock);
- ``hand-N``: the hand-written fan-out over raw redis-py ``Connection``
  objects: pack the command once, ``send_packed_command`` on every node,
  then ``read_response`` on every node; for the SET and for the EVALSHA.
  This is the floor a Redlock client in Python can hope to reach.

Peers: redlock-py (3 nodes), pottery (3 nodes), python-redis-lock (1 node),
redis-py's own ``Lock`` (1 node). Ours: celery_redlock on 1, 3, 5, 7 nodes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

import redis

from .core import (
    Case,
    CaseResult,
    Check,
    Context,
    NodeAddr,
    Runner,
    Suite,
    SuiteResult,
    Table,
    median_ratio,
    ratio_quartiles,
    run_interleaved,
)

__all__ = ["CASES", "SUITE", "TARGETS", "TTL", "TTL_MS", "ServerCPU"]

TTL = 10.0
TTL_MS = int(TTL * 1000)
DRIFT = 0.01 * TTL + 0.002

#: The usual compare-and-delete (the same text as redis-py's Lock and redlock-py).
RELEASE_LUA = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end"
)


class NotLocked(AssertionError):
    """A benchmark cycle did not get (or did not release) its lock."""


def _client(node: NodeAddr) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port)


# --------------------------------------------------------------------------
# Baselines over raw redis-py


class RawSingle(Runner):
    """``SET NX PX`` + ``EVALSHA`` on one ``redis.Redis`` client."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        self.client = _client(nodes[0])
        self.sha = self.client.script_load(RELEASE_LUA)
        self.key = "bench:raw-1"

    def cycle(self) -> None:
        token = secrets.token_hex(16)
        client, key = self.client, self.key
        if not client.set(key, token, nx=True, px=TTL_MS):
            raise NotLocked(key)
        if client.evalsha(self.sha, 1, key, token) != 1:
            raise NotLocked(key)

    def close(self) -> None:
        self.client.close()


class Sequential(Runner):
    """The same on N clients, one after another: what fan-out saves."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        self.clients = [_client(n) for n in nodes]
        self.shas = [c.script_load(RELEASE_LUA) for c in self.clients]
        self.quorum = len(nodes) // 2 + 1
        self.key = f"bench:seq-{len(nodes)}"

    def cycle(self) -> None:
        token = secrets.token_hex(16)
        key = self.key
        start = time.monotonic()
        yes = sum(1 for c in self.clients if c.set(key, token, nx=True, px=TTL_MS))
        if yes < self.quorum or TTL - (time.monotonic() - start) - DRIFT <= 0:
            raise NotLocked(key)
        deleted = sum(c.evalsha(sha, 1, key, token) for c, sha in zip(self.clients, self.shas))
        if deleted < self.quorum:
            raise NotLocked(key)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class HandFanout(Runner):
    """Pack once, send on every raw ``Connection``, then read every reply."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        self.conns: list[Any] = [
            redis.Connection(host=n.host, port=n.port)  # type: ignore[no-untyped-call]
            for n in nodes
        ]
        shas = set()
        for conn in self.conns:
            conn.connect()
            conn.send_command("SCRIPT", "LOAD", RELEASE_LUA)
            shas.add(conn.read_response())
        (self.sha,) = shas
        self.quorum = len(nodes) // 2 + 1
        self.key = f"bench:hand-{len(nodes)}"

    def cycle(self) -> None:
        token = secrets.token_hex(16)
        conns, key = self.conns, self.key
        start = time.monotonic()
        packed = conns[0].pack_command("SET", key, token, "NX", "PX", TTL_MS)
        for conn in conns:
            conn.send_packed_command(packed)
        yes = 0
        for conn in conns:
            if conn.read_response() == b"OK":
                yes += 1
        if yes < self.quorum or TTL - (time.monotonic() - start) - DRIFT <= 0:
            raise NotLocked(key)
        packed = conns[0].pack_command("EVALSHA", self.sha, 1, key, token)
        for conn in conns:
            conn.send_packed_command(packed)
        deleted = 0
        for conn in conns:
            if conn.read_response() == 1:
                deleted += 1
        if deleted < self.quorum:
            raise NotLocked(key)

    def close(self) -> None:
        for conn in self.conns:
            conn.disconnect()


# --------------------------------------------------------------------------
# celery_redlock


class Ours(Runner):
    """``Redlock(urls).lock(resource, ttl)`` then ``release(lock)``: the public API."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        from celery_redlock import Redlock

        # logger=None: the 1-node case would warn about its node count.
        self.rl = Redlock([n.url for n in nodes], logger=None)
        self.key = f"bench:ours-{len(nodes)}"

    def cycle(self) -> None:
        lock = self.rl.lock(self.key, TTL)
        if lock is None:
            raise NotLocked(self.key)
        if not self.rl.release(lock):
            raise NotLocked(self.key)

    def close(self) -> None:
        self.rl.close()


# --------------------------------------------------------------------------
# Peers (benchmark-only extras: pip install -e '.[bench]')


class RedlockPy(Runner):
    """redlock-py: ``Redlock([...]).lock(resource, ttl_ms)`` / ``unlock(lock)``."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        import redlock

        self.dlm = redlock.Redlock([{"host": n.host, "port": n.port, "db": 0} for n in nodes])
        self.key = f"bench:redlock-py-{len(nodes)}"

    def cycle(self) -> None:
        lock = self.dlm.lock(self.key, TTL_MS)
        if not lock:
            raise NotLocked(self.key)
        self.dlm.unlock(lock)

    def close(self) -> None:
        for server in self.dlm.servers:
            server.close()


class Pottery(Runner):
    """pottery: one ``Redlock(key, masters)`` reused; ``acquire(blocking=False)``, ``release()``."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        import pottery

        self.clients = [_client(n) for n in nodes]
        self.lock = pottery.Redlock(
            key=f"bench:pottery-{len(nodes)}", masters=set(self.clients), auto_release_time=TTL
        )

    def cycle(self) -> None:
        if not self.lock.acquire(blocking=False):
            raise NotLocked(self.lock.key)
        self.lock.release()

    def close(self) -> None:
        for client in self.clients:
            client.close()


class PythonRedisLock(Runner):
    """python-redis-lock: ``redis_lock.Lock(client, name, expire)`` per cycle."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        import redis_lock

        self.lock_class = redis_lock.Lock
        self.client = _client(nodes[0])
        self.key = "bench:python-redis-lock-1"

    def cycle(self) -> None:
        lock = self.lock_class(self.client, self.key, expire=int(TTL))
        if not lock.acquire(blocking=False):
            raise NotLocked(self.key)
        lock.release()

    def close(self) -> None:
        self.client.close()


class RedisPyLock(Runner):
    """redis-py's ``client.lock(name, timeout)`` per cycle, ``acquire(blocking=False)``."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        self.client = _client(nodes[0])
        self.key = "bench:redis-py-lock-1"

    def cycle(self) -> None:
        lock = self.client.lock(self.key, timeout=TTL)
        if not lock.acquire(blocking=False):
            raise NotLocked(self.key)
        lock.release()

    def close(self) -> None:
        self.client.close()


CASES: tuple[Case, ...] = (
    Case("raw-1", "raw redis-py: SET NX PX + EVALSHA", 1, RawSingle),
    Case("seq-3", "raw redis-py, nodes one after another", 3, Sequential),
    Case("hand-1", "hand fan-out over raw Connections", 1, HandFanout),
    Case("hand-3", "hand fan-out over raw Connections", 3, HandFanout),
    Case("hand-5", "hand fan-out over raw Connections", 5, HandFanout),
    Case("hand-7", "hand fan-out over raw Connections", 7, HandFanout),
    Case("ours-1", "celery_redlock", 1, Ours),
    Case("ours-3", "celery_redlock", 3, Ours),
    Case("ours-5", "celery_redlock", 5, Ours),
    Case("ours-7", "celery_redlock", 7, Ours),
    Case("redlock-py-3", "redlock-py", 3, RedlockPy, requires="redlock"),
    # pottery starts a thread pool per call: ~10x slower, so fewer cycles per round.
    Case("pottery-3", "pottery", 3, Pottery, requires="pottery", scale=0.25),
    Case("python-redis-lock-1", "python-redis-lock", 1, PythonRedisLock, requires="redis_lock"),
    Case("redis-py-lock-1", "redis-py Lock", 1, RedisPyLock),
)

#: (name, numerator case, denominator case, target, at_least, invert).
#: invert: the ratio of cycle *times* (denominator's rate / numerator's rate).
TARGETS: tuple[tuple[str, str, str, float | None, bool, bool], ...] = (
    ("ours 3 nodes / raw redis-py 1 node", "ours-3", "raw-1", 1.0, True, False),
    ("ours 3 nodes / hand fan-out 3 nodes", "ours-3", "hand-3", 0.9, True, False),
    ("ours 3 nodes / redlock-py 3 nodes", "ours-3", "redlock-py-3", 3.0, True, False),
    ("ours 3 nodes / pottery 3 nodes", "ours-3", "pottery-3", 8.0, True, False),
    ("time: ours 5 nodes / ours 1 node", "ours-5", "ours-1", 1.5, False, True),
    ("time: ours 7 nodes / ours 1 node", "ours-7", "ours-1", None, False, True),
    ("time: hand fan-out 5 / 1 node (floor)", "hand-5", "hand-1", None, False, True),
    ("time: hand fan-out 7 / 1 node (floor)", "hand-7", "hand-1", None, False, True),
    ("ours 1 node / raw redis-py 1 node", "ours-1", "raw-1", None, True, False),
)


class ServerCPU:
    """Reads the CPU seconds (user + sys) redis-servers have used so far (INFO cpu)."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        self.clients = {node: _client(node) for node in nodes}

    def __call__(self, nodes: Sequence[NodeAddr]) -> float:
        total = 0.0
        for node in nodes:
            info = self.clients[node].info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return total

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f}"


def run(ctx: Context, cases: Sequence[Case] = CASES) -> SuiteResult:
    started = time.monotonic()
    ctx.log(f"cycles: {len(cases)} cases x {ctx.rounds} rounds x {ctx.cycles} cycles")
    server_cpu = ServerCPU(ctx.nodes)
    try:
        results = run_interleaved(
            cases, ctx.nodes, ctx.cycles, ctx.rounds, ctx.log, server_cpu=server_cpu
        )
    finally:
        server_cpu.close()
    by_key = {r.key: r for r in results}
    checks = [
        _check(name, by_key.get(a), by_key.get(b), target, at_least, invert)
        for name, a, b, target, at_least, invert in TARGETS
    ]
    base = by_key.get("raw-1")
    rows: list[list[str]] = []
    for r in results:
        if r.skipped:
            rows.append([r.label, str(r.nodes), "skipped: " + r.skipped, "", "", "", "", ""])
            continue
        med = r.median
        assert med is not None
        vs = median_ratio(r, base) if base is not None and base.rates else None
        rows.append(
            [
                r.label,
                str(r.nodes),
                f"{med:,.0f}",
                f"{min(r.rates):,.0f}-{max(r.rates):,.0f}",
                _us(1 / med),
                _us(r.cpu_median),
                _us(r.server_cpu_median),
                "-" if vs is None else f"{vs:.2f}x",
            ]
        )
    table = Table(
        title=(
            f"Uncontended lock+release, one client thread, TTL {TTL:g} s "
            f"(median of {ctx.rounds} interleaved rounds)"
        ),
        columns=[
            "case",
            "nodes",
            "cycles/s",
            "range",
            "us/cycle",
            "client CPU us",
            "server CPU us",
            "vs raw 1 node",
        ],
        rows=rows,
        numeric={1, 2, 3, 4, 5, 6, 7},
    )
    notes = [
        "ratios are the median of per-round ratios (both sides measured in the same round); "
        "range is the slowest and fastest round",
        "client CPU us: this process's CPU per cycle; server CPU us: all redis-servers' "
        "CPU per cycle (INFO cpu), summed over the case's nodes",
    ]
    slow = [r for r in results if r.cycles != ctx.cycles and not r.skipped]
    if slow:
        notes.append(
            ", ".join(f"{r.key} ran {r.cycles} cycles per round" for r in slow)
            + f" (the others {ctx.cycles}); its rate is still per second"
        )
    return SuiteResult(
        name="cycles",
        title="Items 1-2: uncontended cycles/s and scaling with nodes",
        tables=[table],
        checks=checks,
        notes=notes,
        data={
            "ttl": TTL,
            "cycles": ctx.cycles,
            "rounds": ctx.rounds,
            "cases": [_case_data(r) for r in results],
        },
        seconds=time.monotonic() - started,
    )


def _check(
    name: str,
    a: CaseResult | None,
    b: CaseResult | None,
    target: float | None,
    at_least: bool,
    invert: bool,
) -> Check:
    value = spread = None
    if a is not None and b is not None:
        value = median_ratio(a, b, invert=invert)
        spread = ratio_quartiles(a, b, invert=invert)
    note = ""
    if value is None:
        missing = [r.key + ": " + r.skipped for r in (a, b) if r is not None and r.skipped]
        note = "; ".join(missing) or "not measured"
    return Check(name, value, target, at_least, note=note, spread=spread)


def _case_data(r: CaseResult) -> dict[str, Any]:
    return {
        "key": r.key,
        "label": r.label,
        "nodes": r.nodes,
        "cycles_per_round": r.cycles,
        "skipped": r.skipped or None,
        "rates": [round(x, 1) for x in r.rates],
        "median": None if r.median is None else round(r.median, 1),
        "client_cpu_us": [round(x * 1e6, 2) for x in r.cpu],
        "server_cpu_us": [round(x * 1e6, 2) for x in r.server_cpu],
    }


SUITE = Suite("cycles", "uncontended cycles/s on 1-7 nodes, peers, scaling", 7, run)
