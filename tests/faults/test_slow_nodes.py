"""Scenario 5: slow nodes (latency and stalls put in front of nodes by a TCP proxy).

The property: a lock whose acquisition took longer than its TTL is never
reported as acquired, and a lock acquired through latency below the TTL has
its validity reduced by the time spent. (No ``tc netem`` on this kernel: see
the harness docstring; :class:`~tests.faults.harness.DelayProxy` adds the
latency instead.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from celery_redlock import LockNotAcquired, Redlock, Vote
from celery_redlock.redlock import DRIFT_CONSTANT
from tests.faults.harness import (
    DelayProxy,
    FaultInjector,
    Hold,
    Load,
    Result,
    lock_keys,
    record,
    run_load,
)
from tests.servers import RedisServer

DRIFT_FACTOR = 0.01


def drift(ttl: float) -> float:
    return DRIFT_FACTOR * ttl + DRIFT_CONSTANT


@contextmanager
def proxied(nodes: list[RedisServer], count: int) -> Iterator[tuple[list[DelayProxy], list[str]]]:
    """Proxies in front of the first ``count`` nodes; the 5 URLs to use (proxied first)."""
    with ExitStack() as stack:
        proxies = [stack.enter_context(DelayProxy(n, seed=i)) for i, n in enumerate(nodes[:count])]
        urls = [p.url for p in proxies] + [n.url for n in nodes[count:]]
        yield proxies, urls


def test_acquisition_slower_than_the_ttl_is_never_granted(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """3 of 5 nodes 300 ms away, ttl 0.2 s, node timeout 1 s: every node says yes, too
    late, so LockNotAcquired; the fast nodes are released at once, no key outlives the TTL."""
    ttl, delay, attempts = 0.2, 0.3, 3
    with proxied(redis_nodes, 3) as (proxies, urls):
        rl = Redlock(urls, retry_count=1, node_timeout=1.0, version_check=False, logger=None)
        rl.release(rl.acquire("warm-up", ttl))  # connect first: a connect costs round trips
        for proxy in proxies:
            proxy.set_latency(delay)
        granted = 0
        for n in range(attempts):
            started = time.monotonic()
            error: LockNotAcquired | None = None
            try:
                rl.acquire(f"slow-{n}", ttl, fencing=n % 2 == 1)
                granted += 1
            except LockNotAcquired as exc:
                error = exc
            assert error is not None
            assert time.monotonic() - started >= delay
            # yes, but too late (nodes after the quorum's third "yes" are not read)
            assert sum(v.vote is Vote.YES for v in error.votes) >= 3
            assert all(v.vote is Vote.YES or "not read" in v.detail for v in error.votes)
            # The fast nodes' keys were released when the attempt failed, not left to expire.
            assert lock_keys(redis_nodes[3]) == lock_keys(redis_nodes[4]) == []
        rl.close()
        time.sleep(delay + ttl + 0.1)  # the late SET's key on the slow nodes expires too
        left = [lock_keys(n) for n in redis_nodes]
    record(
        Result(
            "5a. 3 of 5 nodes 300 ms away, ttl 0.2 s, node timeout 1 s",
            acquisitions=granted,
            faults=1,
            overlaps=0,
            fence_violations=0,
            notes=f"{attempts} attempts, every node voted yes after 0.3 s > TTL: none granted, "
            "no key left after the TTL",
        )
    )
    assert granted == 0
    assert left == [[]] * 5


def test_too_slow_acquisition_says_it_was_too_slow(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """LockNotAcquired for an acquisition that outlasted its TTL says so."""
    with proxied(redis_nodes, 3) as (proxies, urls):
        rl = Redlock(urls, retry_count=1, node_timeout=1.0, version_check=False, logger=None)
        rl.release(rl.acquire("warm-up", 1.0))
        for proxy in proxies:
            proxy.set_latency(0.3)
        with pytest.raises(LockNotAcquired) as caught:
            rl.acquire("slow", 0.2)
        rl.close()
    assert re.search(r"ttl|elapsed|took|too (slow|long)|validity", str(caught.value), re.I)


def test_latency_below_the_ttl_reduces_the_validity(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """3 of 5 nodes 50 ms then 150 ms away (ttl 1 s, node timeout 0.3 s): acquired, with
    validity <= ttl - latency - drift, and less validity for more latency."""
    ttl = 1.0
    seen: dict[float, float] = {}
    with proxied(redis_nodes, 3) as (proxies, urls):
        rl = Redlock(urls, retry_count=1, node_timeout=0.3, version_check=False, logger=None)
        rl.release(rl.acquire("warm-up", ttl))  # connect first: a connect costs round trips
        for delay in (0.05, 0.15):
            for proxy in proxies:
                proxy.set_latency(delay)
            started = time.monotonic()
            lock = rl.acquire(f"latency-{delay}", ttl)
            assert lock.expires_at is not None
            assert lock.validity <= ttl - delay - drift(ttl)
            assert lock.validity > ttl - delay - drift(ttl) - 0.2  # scheduling noise
            assert started + ttl - drift(ttl) <= lock.expires_at  # counted from the attempt
            assert lock.expires_at <= time.monotonic() + lock.validity
            seen[delay] = lock.validity
            assert rl.release(lock)
        rl.close()
    assert seen[0.05] - seen[0.15] >= 0.08, seen


def test_slow_minority_is_outvoted_after_one_node_timeout(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """2 of 5 nodes 500 ms away, node timeout 0.1 s: granted by the fast 3 after about
    one node timeout, not after the latency."""
    ttl, node_timeout = 1.0, 0.1
    with proxied(redis_nodes, 2) as (proxies, urls):
        for proxy in proxies:
            proxy.set_latency(0.5)
        rl = Redlock(
            urls, retry_count=1, node_timeout=node_timeout, version_check=False, logger=None
        )
        started = time.monotonic()
        lock = rl.acquire("outvoted", ttl)
        took = time.monotonic() - started
        validity = lock.validity
        assert rl.release(lock)
        rl.close()
    assert took < node_timeout + 0.2
    assert ttl - node_timeout - drift(ttl) - 0.2 < validity <= ttl - drift(ttl)


# --------------------------------------------------------------------------
# Under load: latency comes and goes on a minority or a majority

#: Configured as advised: node timeout well below the TTL.
FAST = Load(processes=2, threads=3, ttl=0.5, node_timeout=0.1, name="a")
#: Misconfigured on purpose: node timeout above the TTL, so slow replies are waited for.
PATIENT = Load(
    processes=1, threads=3, ttl=0.2, node_timeout=1.0, wait=None, retry_count=3, name="b"
)

#: (slowed proxies, delay s, stall probability, stall s) of each phase, in turn.
PHASES = [
    (2, 0.3, 0.0, 0.0),  # a minority far away: outvoted by the fast nodes
    (3, 0.05, 0.0, 0.0),  # a majority a little away: granted, less validity
    (3, 0.15, 0.0, 0.0),  # a majority past FAST's node timeout, near PATIENT's TTL
    (3, 0.25, 0.0, 0.0),  # a majority past PATIENT's TTL: PATIENT must never be granted
    (3, 0.03, 0.1, 0.25),  # a majority with lost segments waiting for retransmission
    (0, 0.0, 0.0, 0.0),  # all fast
]


def latency_phases(
    proxies: list[DelayProxy], low: float, high: float
) -> Callable[[FaultInjector], None]:
    """The PHASES in turn, each for ``low``-``high`` seconds, round and round."""

    def schedule(inj: FaultInjector) -> None:
        while inj.running():
            for count, delay, stall_probability, stall in PHASES:
                seconds = inj.uniform(low, high)
                if count:
                    inj.slow(proxies[:count], seconds, delay, stall_probability, stall)
                elif not inj.wait(seconds):
                    return

    return schedule


def slow_nodes_under_load(
    nodes: list[RedisServer], tmp_path: Path, duration: float, phase: float, report: bool
) -> None:
    with proxied(nodes, 3) as (proxies, urls):
        schedule = latency_phases(proxies, 0.7 * phase, 1.3 * phase)
        run = run_load(urls, [FAST, PATIENT], duration, tmp_path, schedule)
    print(run.summary())
    verdict = run.verdict

    def load_of(hold: Hold) -> Load:
        return PATIENT if hold.client.startswith(PATIENT.name) else FAST

    # No lock is ever granted with more validity than the latency left it. Only
    # attempts granted before the fault ended count: an attempt begun just before
    # its end (a client process descheduled between noting the attempt's start and
    # sending) may send once the delay is gone, and be answered at once.
    too_much = []
    for fault in run.faults:
        delay = fault.params["delay"]
        for hold in run.holds_during([fault], by_attempt=True):
            load = load_of(hold)
            if not fault.covers(hold.start):
                continue
            if len(fault.nodes) >= 3 and hold.validity > load.ttl - delay - drift(load.ttl):
                too_much.append((fault.detail, hold))
    patient_past_ttl = [
        h
        for f in run.faults
        if f.params["delay"] >= PATIENT.ttl  # it waits for every node, even a minority
        for h in run.holds_during([f], by_attempt=True)
        if load_of(h) is PATIENT
    ]
    patient = sum(1 for h in run.holds if load_of(h) is PATIENT)
    record(
        Result.from_run(
            "5b. latency/stalls on 2 or 3 of 5 nodes (0.03-0.3 s), two client configs",
            run,
            f"{len(verdict.granted_expired)} granted past the TTL; {len(too_much)} granted "
            "with more validity than the latency left; the client with node timeout 1 s > "
            f"TTL 0.2 s got {patient} locks, {len(patient_past_ttl)} while nodes were "
            "farther than its TTL",
        ),
        report=report,
    )
    assert not run.errors, run.errors[:5]
    assert not verdict.overlaps, verdict.describe()
    assert not verdict.fence_violations, verdict.describe()
    assert not verdict.granted_expired, verdict.describe()
    assert not too_much, too_much[:3]
    assert not patient_past_ttl, patient_past_ttl[:3]
    assert all(h.validity <= load_of(h).ttl - drift(load_of(h).ttl) for h in run.holds)
    assert verdict.acquisitions > 100


def test_slow_nodes_under_load_short(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Latency on a minority/majority under load: never granted past the TTL (5 s)."""
    slow_nodes_under_load(redis_nodes, tmp_path, 5.0, phase=0.8, report=False)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_slow_nodes_under_load_long(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Latency on a minority/majority under load: never granted past the TTL (30 s)."""
    slow_nodes_under_load(redis_nodes, tmp_path, 30.0, phase=1.5, report=True)


def test_a_release_does_not_wait_for_a_slow_node_s_unread_acquire_reply(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """3 nodes, the last one 300 ms away. The acquire returns at quorum, leaving the
    slow node's SET reply unread; the release is sent to it at once, behind the SET
    (a plain command: nothing of it may have to run again), and returns at quorum
    too. The slow node still runs both in order, so no key is left; the calls after
    read every reply in order."""
    delay = 0.3
    with proxied(redis_nodes[2:3], 1) as (proxies, urls):
        urls = [*redis_urls[:2], *urls]
        rl = Redlock(urls, retry_count=1, node_timeout=2.0, version_check=False, logger=None)
        rl.release(rl.acquire("warm-up", 10))  # connect first: a connect costs round trips
        proxies[0].set_latency(delay)
        lock = rl.acquire("slow-last", 10)
        began = time.monotonic()
        assert rl.release(lock)
        assert time.monotonic() - began < delay / 2  # not behind the slow node's reply
        for _ in range(3):  # each call first reads what the slow node owes, in order
            rl.release(rl.acquire("slow-last", 10))
        time.sleep(delay * 2)
        assert [lock_keys(node) for node in redis_nodes[:3]] == [[], [], []]
        assert rl.holder("slow-last") is None
        rl.close()
