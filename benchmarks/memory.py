"""Item 5 of issue 6: a long run leaves no keys and holds flat memory.

celery_redlock on 3 nodes runs a mixed loop, each cycle on a new resource
name (so nothing may be cached per resource):

- every cycle: lock + release (every 5th also extends first);
- every 10th: an attempt on a resource another token holds on 2 of the 3
  nodes: it must fail and undo the one node it got (the failure path, with
  its LockNotAcquired and per-node votes);
- every 10th (offset 5): a resource held by another token on 1 node: it is
  acquired on the other 2 and released.

After a warm-up, the process's resident memory (``/proc/self/statm``), its
live object count (``gc.get_objects()``) and its open file descriptors are
read before the run, after each tenth of it, and at the end. Then every node
must hold only the two blocker keys the benchmark set itself.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from typing import Any

import redis

from .core import Check, Context, Suite, SuiteResult, Table

__all__ = ["SUITE"]

NODES = 3
TTL = 10.0
#: resident memory may grow this much over the measured run (allocator noise)
RSS_LIMIT_KIB = 1024
#: live objects may grow this much (lazily created caches, interned strings)
OBJECTS_LIMIT = 200
HELD_ON_2 = "soak:held-on-2"
HELD_ON_1 = "soak:held-on-1"
BLOCKER_TOKEN = "another-owner"


class SoakError(AssertionError):
    """A soak cycle did not behave as a lock must."""


def _rss() -> int:
    """Current resident set size in bytes (Linux), else the peak from getrusage."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _snapshot() -> dict[str, Any]:
    gc.collect()
    return {"rss": _rss(), "objects": len(gc.get_objects()), "fds": _fds()}


def run(ctx: Context) -> SuiteResult:
    from celery_redlock import Redlock

    started = time.monotonic()
    nodes = ctx.nodes[:NODES]
    clients = [redis.Redis(host=n.host, port=n.port) for n in nodes]
    for client in clients:
        client.flushall()  # throwaway nodes this run started
    for client in clients[:2]:
        client.set(HELD_ON_2, BLOCKER_TOKEN, px=int(TTL * 1000) * 100)
    clients[2].set(HELD_ON_1, BLOCKER_TOKEN, px=int(TTL * 1000) * 100)
    rl = Redlock([n.url for n in nodes], retry_count=0, logger=None)
    counts = {"acquired": 0, "extended": 0, "refused": 0, "minority_held": 0}

    def one(i: int) -> None:
        name = f"soak:{i}"
        lock = rl.lock(name, TTL)
        if lock is None:
            raise SoakError(f"{name} not acquired")
        counts["acquired"] += 1
        if i % 5 == 0:
            if not lock.extend(TTL):
                raise SoakError(f"{name} not extended")
            counts["extended"] += 1
        if not rl.release(lock):
            raise SoakError(f"{name} not released")
        if i % 10 == 0:
            if rl.lock(HELD_ON_2, TTL) is not None:
                raise SoakError(f"{HELD_ON_2} acquired while another holds 2 of 3 nodes")
            counts["refused"] += 1
        elif i % 10 == 5:
            held = rl.lock(HELD_ON_1, TTL)
            if held is None or not rl.release(held):
                raise SoakError(f"{HELD_ON_1} not acquired/released on 2 of 3 nodes")
            counts["minority_held"] += 1

    total = ctx.soak_cycles
    warmup = max(100, total // 10)
    ctx.log(f"memory: {warmup} warm-up + {total} cycles on {NODES} nodes")
    try:
        for i in range(warmup):
            one(-1 - i)
        before = _snapshot()
        samples = [before]
        chunk = max(1, total // 10)
        done = 0
        t0 = time.perf_counter()
        timed = 0.0
        while done < total:
            step = min(chunk, total - done)
            t1 = time.perf_counter()
            for i in range(done, done + step):
                one(i)
            timed += time.perf_counter() - t1
            done += step
            samples.append(_snapshot())
        wall = time.perf_counter() - t0
        after = samples[-1]
        per_node = [int(c.dbsize()) for c in clients]
        leftover: list[list[str]] = []
        for client in clients:
            names = sorted(k.decode() for k in client.scan_iter(count=1000))
            leftover.append([k for k in names if k not in (HELD_ON_1, HELD_ON_2)])
        for client in clients:
            client.delete(HELD_ON_1, HELD_ON_2)
        empty = [int(c.dbsize()) for c in clients]
    finally:
        rl.close()
        for client in clients:
            client.close()

    rss_growth = (after["rss"] - before["rss"]) / 1024
    half = samples[len(samples) // 2]
    rss_second_half = (after["rss"] - half["rss"]) / 1024
    objects_growth = after["objects"] - before["objects"]
    fds_growth = None if after["fds"] is None else after["fds"] - before["fds"]
    keys_left = sum(len(k) for k in leftover)
    checks = [
        Check("keys left behind on the nodes", keys_left, 0, at_least=False, unit=""),
        Check("RSS growth over the run (KiB)", rss_growth, RSS_LIMIT_KIB, at_least=False, unit=""),
        Check("RSS growth, second half (KiB)", rss_second_half, None, at_least=False, unit=""),
        Check("live objects growth", objects_growth, OBJECTS_LIMIT, at_least=False, unit=""),
    ]
    if fds_growth is not None:
        checks.append(Check("open file descriptors growth", fds_growth, 0, at_least=False, unit=""))
    mib = 1024 * 1024
    table = Table(
        title=f"Memory and keys: celery_redlock, {NODES} nodes, {total:,} mixed cycles",
        columns=["measure", "before", "after", "growth"],
        rows=[
            [
                "RSS (MiB)",
                f"{before['rss'] / mib:.2f}",
                f"{after['rss'] / mib:.2f}",
                f"{rss_growth:+.0f} KiB",
            ],
            [
                "live objects",
                f"{before['objects']:,}",
                f"{after['objects']:,}",
                f"{objects_growth:+,}",
            ],
            [
                "open fds",
                str(before["fds"]),
                str(after["fds"]),
                "-" if fds_growth is None else f"{fds_growth:+}",
            ],
            [
                "keys per node (DBSIZE; 1 = the blocker)",
                "1 / 1 / 1",
                " / ".join(map(str, per_node)),
                "",
            ],
            ["keys per node, blockers deleted", "", " / ".join(map(str, empty)), ""],
        ],
        numeric={1, 2, 3},
    )
    ops = sum(counts.values())
    notes = [
        f"{counts['acquired']:,} lock+release ({counts['extended']:,} with extend), "
        f"{counts['refused']:,} refused on a 2-of-3 held resource, "
        f"{counts['minority_held']:,} acquired past a 1-of-3 holder; "
        f"{total / timed:,.0f} mixed cycles/s",
        "RSS after each tenth (KiB from start): "
        + " ".join(f"{(s['rss'] - before['rss']) // 1024:+d}" for s in samples[1:]),
    ]
    if any(leftover):
        notes.append(f"keys left: {leftover}")
    return SuiteResult(
        name="memory",
        title="Item 5: a long run leaves no keys and holds flat memory",
        tables=[table],
        checks=checks,
        notes=notes,
        data={
            "nodes": NODES,
            "cycles": total,
            "warmup": warmup,
            "counts": counts,
            "operations": ops,
            "seconds": round(wall, 3),
            "samples": samples,
            "dbsize_with_blockers": per_node,
            "dbsize_after": empty,
            "keys_left": leftover,
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        },
        seconds=time.monotonic() - started,
    )


SUITE = Suite("memory", "long run: no keys left, flat memory", NODES, run)
