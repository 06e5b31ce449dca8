"""Scenarios 3 and 6: where Redlock alone does not protect, and what the fence does.

3. A node that restarts at once without its data (no ``appendfsync always``,
   no delayed restart) forgets the locks it granted, so a second client can
   gather a quorum while the first still holds: two holders. The spec says so
   and prescribes the delayed restart (scenario 2). Shown here on purpose,
   deterministically, and under load. The fence still orders the writes: it
   is read on nodes that hold the other token too, and seeded from the nodes'
   clocks, so counters lost with the data are not handed out again.
6. A holder paused past its TTL (GC pause, SIGSTOP, a VM migration) wakes up
   believing it holds. The lock cannot prevent that; it can tell the holder
   as soon as it looks (extend fails), and the fence lets the storage refuse
   the late writer: the paused holder's fence is below the new holder's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_redlock import Lock, Redlock
from tests.faults.harness import (
    REPO_ROOT,
    FaultInjector,
    Hold,
    Load,
    Result,
    check,
    record,
    run_load,
)
from tests.servers import RedisServer

RESOURCE = "limit-res"


def hold_of(lock: Lock, start: float, end: float, client: str) -> Hold:
    assert lock.expires_at is not None
    return Hold(start, end, lock.expires_at, lock.validity, lock.fence, client, lock.resource)


def two_holders_after_an_immediate_restart(
    nodes: list[RedisServer], urls: list[str]
) -> tuple[Lock, Lock, float, float]:
    """A holds on nodes 1-3; nodes 2 and 3 restart empty at once; B takes nodes 2-4.

    Node 4 and 5 are held by a third party while A acquires (so A gets exactly
    1-3); node 4's is gone (expired) before B comes, node 5's stays (so B gets
    exactly 2-4). Returns A, B and when each acquire returned.
    """
    blockers = [nodes[3].client(), nodes[4].client()]
    for blocker in blockers:
        blocker.set(RESOURCE, "third-party", px=60_000)
    rl_a = Redlock(urls, retry_count=1, node_timeout=0.2, logger=None)
    rl_b = Redlock(urls, retry_count=1, node_timeout=0.2, logger=None)
    try:
        a = rl_a.acquire(RESOURCE, 30, fencing=True)
        a_start = time.monotonic()
        held = [n.client().get(RESOURCE) for n in nodes]
        assert held == [a.value.encode()] * 3 + [b"third-party"] * 2
        blockers[0].delete(RESOURCE)
        for node in (nodes[1], nodes[2]):  # crash, and back at once with no data
            node.kill()
            node.restart()
        b = rl_b.acquire(RESOURCE, 30, fencing=True)
        b_start = time.monotonic()
        held = [n.client().get(RESOURCE) for n in nodes]
        assert held == [a.value.encode()] + [b.value.encode()] * 3 + [b"third-party"]
        return a, b, a_start, b_start
    finally:
        rl_a.close()
        rl_b.close()
        for blocker in blockers:
            blocker.close()


def test_immediate_restart_can_give_two_holders(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """Known limit: without a delayed restart, a node restarted empty lets a second
    client take a lock that is still held (A on nodes 1-3, nodes 2-3 restart, B on 2-4).

    Redlock's answer is the delayed restart (scenario 2) or ``appendfsync
    always``; the storage's answer is the fence (next test).
    """
    a, b, a_start, b_start = two_holders_after_an_immediate_restart(redis_nodes, redis_urls)
    now = time.monotonic()
    assert a.remaining, "A's lock is still valid..."
    assert b.remaining, "...while B holds the same resource"
    verdict = check([hold_of(a, a_start, now, "A"), hold_of(b, b_start, now, "B")])
    fence_note = (
        f"B's fence {b.fence} > A's {a.fence}: the fence still orders the writes"
        if (b.fence or 0) > (a.fence or 0)
        else f"B's fence {b.fence} is NOT above A's {a.fence}"
    )
    record(
        Result(
            "3a. immediate restart, constructed: A holds nodes 1-3, nodes 2-3 restart "
            "empty, B takes 2-4",
            verdict.acquisitions,
            faults=1,
            overlaps=len(verdict.overlaps),
            fence_violations=len(verdict.fence_violations),
            notes="KNOWN LIMIT, expected: two holders at once. " + fence_note,
        )
    )
    assert len(verdict.overlaps) == 1


def test_fence_orders_the_holders_after_an_immediate_restart(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """The fence still orders the writes after the restart: B's fence > A's."""
    a, b, _, _ = two_holders_after_an_immediate_restart(redis_nodes, redis_urls)
    assert a.fence is not None
    assert b.fence is not None
    assert b.fence > a.fence


def test_fence_survives_a_rolling_delayed_restart(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """Every node restarted in turn, each down longer than the TTL (the spec's delayed
    restart), with no holder in between: the next fence is still above the last one."""
    ttl = 0.2
    with Redlock(redis_urls, retry_count=1, logger=None) as rl:
        for _ in range(5):
            last = rl.acquire(RESOURCE, ttl, fencing=True)
            assert rl.release(last)
    for node in redis_nodes:  # a rolling upgrade, one node at a time
        node.kill()
        time.sleep(ttl + 0.05)
        node.restart()
    with Redlock(redis_urls, retry_count=1, logger=None) as rl:  # fresh connections
        after = rl.acquire(RESOURCE, ttl, fencing=True)
        rl.release(after)
    assert after.fence is not None
    assert after.fence > last.fence


def immediate_restarts(servers: list[RedisServer]) -> Callable[[FaultInjector], None]:
    """Kill 2 random nodes and start them again at once, empty, every 0.2-0.6 s."""

    def schedule(inj: FaultInjector) -> None:
        while inj.running():
            inj.restart_now(inj.choose(servers, 2))
            inj.wait(inj.uniform(0.2, 0.6))

    return schedule


RESTART_LOAD = Load(ttl=1.0, node_timeout=0.05, hold=0.005)


def restarts_under_load(
    nodes: list[RedisServer], urls: list[str], tmp_path: Path, duration: float, report: bool
) -> None:
    run = run_load(urls, [RESTART_LOAD], duration, tmp_path, immediate_restarts(nodes))
    verdict = run.verdict
    print(run.summary())
    # Every overlap is explained by a restart that came less than a TTL before it.
    unexplained = [
        (first, second)
        for first, second in verdict.overlaps
        if not any(f.start <= second.start <= f.end + RESTART_LOAD.ttl for f in run.faults)
    ]
    record(
        Result.from_run(
            "3b. immediate restarts (2 of 5, empty, no delay) under load",
            run,
            f"KNOWN LIMIT: overlaps may happen (here {len(verdict.overlaps)}), each within a "
            f"TTL of a restart; fence order broken {len(verdict.fence_violations)} times "
            "(fences are seeded from the nodes' clocks, so emptied counters do not repeat)",
        ),
        report=report,
    )
    assert not run.errors, run.errors[:5]
    assert not unexplained, verdict.describe()
    assert not run.fence_violations_without_data_loss(), verdict.describe()
    assert not verdict.granted_expired, verdict.describe()
    assert verdict.acquisitions > 100


def test_immediate_restarts_under_load_short(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Immediate restarts under load: any overlap follows a restart within a TTL (3 s)."""
    restarts_under_load(redis_nodes, redis_urls, tmp_path, 3.0, report=False)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_immediate_restarts_under_load_long(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Immediate restarts under load: any overlap follows a restart within a TTL (20 s)."""
    restarts_under_load(redis_nodes, redis_urls, tmp_path, 20.0, report=True)


# --------------------------------------------------------------------------
# 6. A holder paused past its TTL


def test_paused_holder_loses_its_lock_and_has_the_lower_fence(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """A holder SIGSTOPped past its TTL: another client takes the lock; the paused one,
    resumed, cannot extend or release it, and its fence is below the new holder's."""
    ttl = 0.5
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.harness", "holder"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    rl = Redlock(redis_urls, retry_count=1, logger=None)
    try:
        proc.stdin.write(json.dumps({"servers": redis_urls, "resource": RESOURCE, "ttl": ttl}))
        proc.stdin.write("\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(ttl + 0.2)  # past its validity: the keys expire on every node
        new = rl.acquire(RESOURCE, 5, fencing=True)
        new_start = time.monotonic()
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        seen = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=10) == 0
        still = rl.holder(RESOURCE)
        end = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rl.close()
    paused = Hold(
        first["start"],
        seen["resumed"],
        first["expires_at"],
        first["validity"],
        first["fence"],
        "paused",
        RESOURCE,
    )
    verdict = check([paused, hold_of(new, new_start, end, "new")])
    record(
        Result(
            "6. holder SIGSTOPped past its TTL, another client takes over",
            verdict.acquisitions,
            faults=1,
            overlaps=len(verdict.overlaps),
            fence_violations=len(verdict.fence_violations),
            notes=(
                f"the paused holder woke up {seen['resumed'] - first['expires_at']:.2f} s past "
                f"its validity: extend -> {seen['extend']}, release -> {seen['release']}; "
                f"its fence {first['fence']} < the new holder's {new.fence}, so a fenced "
                f"store refuses its late write ({len(verdict.raw_overlaps)} overlap as lived)"
            ),
        )
    )
    assert seen["remaining"] == 0.0
    assert seen["extend"] is False
    assert seen["extend_rebuilt"] is False  # the token check on the nodes, not just the clock
    assert seen["release"] is False
    assert still == new.value, "the late holder must not have touched the new holder's lock"
    assert new.fence is not None
    assert new.fence > first["fence"]
    assert not verdict.overlaps
    assert not verdict.fence_violations
    assert len(verdict.raw_overlaps) == 1  # as lived, the paused holder overlapped
