"""Scenarios 1 and 2: a minority of nodes paused, or killed and restarted late.

Both stay inside Redlock's model: 3 of 5 nodes answer, and a node either
keeps its data or stays down longer than the longest TTL (the spec's delayed
restart). So no two holders may ever overlap, every fence exceeds the one
before it, and locks keep being granted throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.harness import FaultInjector, Load, Result, Run, record, run_load
from tests.servers import RedisServer

SHORT, LONG = 3.0, 30.0
Schedule = Callable[[FaultInjector], None]


def assert_safe(run: Run) -> None:
    """No overlap, fences in order, no lock handed out past its validity, no core error."""
    verdict = run.verdict
    assert not run.errors, run.errors[:5]
    assert not verdict.overlaps, verdict.describe()
    assert not verdict.fence_violations, verdict.describe()
    assert not verdict.granted_expired, verdict.describe()


# --------------------------------------------------------------------------
# 1. A minority paused

PAUSE_LOAD = Load(ttl=1.0, node_timeout=0.05)


def minority_pauses(servers: list[RedisServer]) -> Schedule:
    """Pause 2 random nodes for 0.2-1.2 s (4-24 node timeouts), resume, repeat."""

    def schedule(inj: FaultInjector) -> None:
        while inj.running():
            inj.pause(inj.choose(servers, 2), inj.uniform(0.2, 1.2))
            inj.wait(inj.uniform(0.1, 0.4))

    return schedule


def minority_paused(
    nodes: list[RedisServer], urls: list[str], tmp_path: Path, duration: float, report: bool
) -> None:
    run = run_load(urls, [PAUSE_LOAD], duration, tmp_path, minority_pauses(nodes))
    during = run.holds_during(run.faults, by_attempt=True)
    print(run.summary(), f"\n{len(during)} grants while paused")
    record(
        Result.from_run(
            "1. minority (2 of 5) paused by SIGSTOP for 0.2-1.2 s, repeatedly",
            run,
            f"{len(during)} granted while nodes were paused; longest time without a grant "
            f"{run.longest_gap():.2f} s; {run.extends[0]} holds extended half-way "
            f"({run.extends[1]} refused); {run.lost_at_release} releases reached fewer "
            "than 3 nodes (sent again to the others once they answer)",
        ),
        report=report,
    )
    assert_safe(run)
    # Locks keep being granted: while nodes are paused, and never a long stall.
    assert len(during) > 0.1 * len(run.holds), run.summary()
    assert run.longest_gap() < 2.5, run.summary()


def test_minority_paused_short(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """2 of 5 nodes SIGSTOPped again and again: no overlap, locks keep coming (3 s)."""
    minority_paused(redis_nodes, redis_urls, tmp_path, SHORT, report=False)


@pytest.mark.slow
@pytest.mark.timeout(LONG + 90)
def test_minority_paused_long(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """2 of 5 nodes SIGSTOPped again and again: no overlap, locks keep coming (30 s)."""
    minority_paused(redis_nodes, redis_urls, tmp_path, LONG, report=True)


# --------------------------------------------------------------------------
# 2. A minority killed, restarted empty after the longest TTL

KILL_LOAD = Load(ttl=0.5, node_timeout=0.05)


def delayed_restarts(servers: list[RedisServer], ttl: float) -> Schedule:
    """SIGKILL 2 random nodes, keep them down 1.2-2.5 x the TTL, restart them empty."""

    def schedule(inj: FaultInjector) -> None:
        while inj.running():
            inj.kill(inj.choose(servers, 2), inj.uniform(1.2 * ttl, 2.5 * ttl))
            inj.wait(inj.uniform(0.2, 0.6))

    return schedule


def minority_killed(
    nodes: list[RedisServer], urls: list[str], tmp_path: Path, duration: float, report: bool
) -> None:
    run = run_load(urls, [KILL_LOAD], duration, tmp_path, delayed_restarts(nodes, KILL_LOAD.ttl))
    during = run.holds_during(run.faults, by_attempt=True)
    print(run.summary(), f"\n{len(during)} grants while killed")
    record(
        Result.from_run(
            "2. minority (2 of 5) killed, restarted empty after 1.2-2.5 x the TTL",
            run,
            f"TTL {KILL_LOAD.ttl} s; {len(during)} granted while nodes were down; longest "
            f"time without a grant {run.longest_gap():.2f} s; {run.extends[0]} holds extended "
            f"half-way ({run.extends[1]} refused)",
        ),
        report=report,
    )
    assert_safe(run)
    # Every node stayed down longer than the TTL (but the last, cut short by the run's end).
    assert all(f.end - f.start > KILL_LOAD.ttl for f in run.faults if f.end < run.ended)
    assert len(during) > 0.1 * len(run.holds), run.summary()
    assert run.longest_gap() < 2.5, run.summary()


def test_minority_killed_delayed_restart_short(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """2 of 5 nodes killed and restarted empty after the longest TTL: no overlap (3 s)."""
    minority_killed(redis_nodes, redis_urls, tmp_path, SHORT, report=False)


@pytest.mark.slow
@pytest.mark.timeout(LONG + 90)
def test_minority_killed_delayed_restart_long(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """2 of 5 nodes killed and restarted empty after the longest TTL: no overlap (30 s)."""
    minority_killed(redis_nodes, redis_urls, tmp_path, LONG, report=True)
