"""Scenario 4: a majority of nodes down.

No lock can be granted. What matters then: every attempt fails fast with
``LockNotAcquired`` naming the nodes that failed; no call takes longer than
``retry_count x (retry_delay + node_timeout)`` plus a small margin; and when
the nodes come back, the same client locks again (after the nodes' 1 s
cool-down), without being restarted.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from celery_redlock import LockNotAcquired, Redlock, Vote
from celery_redlock._nodes import NODE_COOLDOWN
from tests.faults.harness import (
    FaultInjector,
    Load,
    Result,
    Run,
    lock_keys,
    node_name,
    record,
    run_load,
)
from tests.servers import RedisServer

RETRY_COUNT, RETRY_DELAY, NODE_TIMEOUT = 3, 0.1, 0.1
#: What the issue allows beyond the attempts themselves (scheduling noise on 2 busy cores).
MARGIN = 0.25
BOUND = RETRY_COUNT * (RETRY_DELAY + NODE_TIMEOUT) + MARGIN


def manager(urls: list[str]) -> Redlock:
    return Redlock(
        urls,
        retry_count=RETRY_COUNT,
        retry_delay=RETRY_DELAY,
        node_timeout=NODE_TIMEOUT,
        version_check=False,
        logger=None,
    )


def assert_fails_fast_naming(rl: Redlock, down: list[str], tries: int = 6) -> None:
    for n in range(tries):
        started = time.monotonic()
        with pytest.raises(LockNotAcquired) as caught:
            rl.acquire(f"majority-{n}", 0.5)
        took = time.monotonic() - started
        assert took < BOUND, f"attempt {n} took {took:.3f} s > {BOUND:.3f} s"
        error = caught.value
        assert error.unavailable, str(error)
        failed = {v.node for v in error.votes if v.vote in (Vote.ERROR, Vote.TIMEOUT)}
        assert failed == set(down), str(error)
        for name in down:
            assert name in str(error)


def locks_again_within(rl: Redlock, seconds: float) -> float:
    """Seconds until ``rl`` acquires again (polling); fails after ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        lock = rl.lock("majority-back", 0.5)
        if lock is not None:
            rl.release(lock)
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"no lock within {seconds} s after the nodes came back")


def test_majority_killed_fails_fast_names_the_nodes_and_recovers(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """3 of 5 nodes killed: every call fails within the bound naming those nodes;
    restarted, the same manager locks again after the cool-down."""
    rl = manager(redis_urls)
    down = redis_nodes[:3]
    try:
        assert rl.lock("warm-up", 0.5) is not None  # connections open before the crash
        for node in down:
            node.kill()
        assert_fails_fast_naming(rl, [node_name(n) for n in down])
        for node in down:
            node.restart()
        back = locks_again_within(rl, NODE_COOLDOWN + 2.0)
    finally:
        rl.close()
    assert all(not lock_keys(n) for n in redis_nodes[3:]), "a failed attempt left a key"
    print(f"locked again {back:.2f} s after the restart")


def test_majority_paused_fails_fast_names_the_nodes_and_recovers(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """3 of 5 nodes SIGSTOPped (they accept connections, never answer): every call
    fails within the bound naming them; resumed, the same manager locks again."""
    rl = manager(redis_urls)
    down = redis_nodes[2:]
    try:
        assert rl.lock("warm-up", 0.5) is not None
        for node in down:
            node.pause()
        assert_fails_fast_naming(rl, [node_name(n) for n in down])
        for node in down:
            node.resume()
        # The cool-down, plus the TTL of keys our own queued SETs left on the paused nodes.
        back = locks_again_within(rl, NODE_COOLDOWN + 0.5 + 2.0)
    finally:
        for node in down:
            if node.paused:
                node.resume()
        rl.close()
    print(f"locked again {back:.2f} s after the resume")


def test_first_lock_after_a_majority_restarted_while_idle_succeeds(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """3 of 5 nodes restart while the manager is idle: its next acquire() succeeds."""
    with Redlock(redis_urls, logger=None) as rl:  # the defaults: 3 attempts, 0.2 s apart
        rl.release(rl.acquire("idle", 1))
        for node in redis_nodes[:3]:
            node.kill()
            node.restart()
        time.sleep(NODE_COOLDOWN + 0.2)  # nothing is cooling down: no call was made
        lock = rl.acquire("idle", 1)
        assert rl.release(lock)


@contextmanager
def blackholes(count: int) -> Iterator[list[str]]:
    """``count`` local addresses where a TCP connect hangs (SYNs dropped), like a host
    behind a firewall that drops packets: a listener whose accept queue is full."""
    with ExitStack() as stack:
        addresses = []
        for _ in range(count):
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            for _ in range(3):  # fill the accept queue; later SYNs are dropped
                filler = stack.enter_context(socket.socket())
                filler.setblocking(False)
                filler.connect_ex(listener.getsockname())
            host, port = listener.getsockname()
            addresses.append(f"{host}:{port}")
        time.sleep(0.05)
        yield addresses


def test_one_call_waits_one_node_timeout_however_many_nodes_hang_at_connect(
    redis_urls: list[str],
) -> None:
    """3 of 5 nodes drop SYNs: one attempt fails within one node timeout (plus margin),
    not one timeout per hanging node (connects happen together since f37afaa)."""
    node_timeout = 0.2
    with blackholes(3) as holes:
        rl = Redlock(
            holes + redis_urls[3:],
            retry_count=1,
            retry_delay=0.05,
            node_timeout=node_timeout,
            version_check=False,
            logger=None,
        )
        started = time.monotonic()
        with pytest.raises(LockNotAcquired) as caught:
            rl.acquire("hang", 1)
        took = time.monotonic() - started
        rl.close()
    assert all(hole in str(caught.value) for hole in holes)
    assert took < 1 * (0.05 + node_timeout) + 0.1, f"one attempt took {took:.2f} s"


# --------------------------------------------------------------------------
# Under load: the majority goes down and comes back, again and again

DOWN_LOAD = Load(
    ttl=0.5,
    retry_count=RETRY_COUNT,
    retry_delay=RETRY_DELAY,
    node_timeout=NODE_TIMEOUT,
    wait=None,  # wait= keeps trying for as long as it is told: not this scenario
)


def majority_outages(servers: list[RedisServer]) -> Callable[[FaultInjector], None]:
    """Kill or pause 3 random nodes for 1-2 s, then all up for 1.5-2.5 s; repeat."""

    def schedule(inj: FaultInjector) -> None:
        kill = True
        while inj.running():
            down = inj.choose(servers, 3)
            if kill:
                inj.kill(down, inj.uniform(1.0, 2.0))
            else:
                inj.pause(down, inj.uniform(1.0, 2.0))
            kill = not kill
            inj.wait(inj.uniform(1.5, 2.5))

    return schedule


def majority_down_under_load(
    nodes: list[RedisServer], urls: list[str], tmp_path: Path, duration: float, report: bool
) -> Run:
    run = run_load(urls, [DOWN_LOAD], duration, tmp_path, majority_outages(nodes))
    print(run.summary())
    # An attempt made wholly while the majority was down (it began and ended inside
    # one window) can never win. One that began inside a window may win once the
    # nodes are back within its own deadline (a paused node answers on SIGCONT).
    granted_while_down = [
        h for h in run.holds if any(f.covers(h.began) and f.covers(h.start) for f in run.faults)
    ]
    # Calls made entirely while the majority was down (settled in).
    inside = [
        (f, x)
        for f in run.failures
        for x in run.faults
        if x.covers(f.at) and x.covers(f.at + f.seconds)
    ]
    failures = [f for f, _ in inside]
    slow = [f for f in run.failures if f.seconds >= BOUND]  # anywhere in the run
    unnamed = [f for f, x in inside if not set(x.nodes) <= set(f.failed_nodes)]
    recovery = []
    for fault in run.faults:
        after = [h.start for h in run.holds if h.start > fault.end]
        recovery.append(min(after, default=run.ended) - fault.end)
    complete = recovery[:-1]  # the last window may end with the run
    record(
        Result.from_run(
            "4. majority (3 of 5) killed or paused for 1-2 s, repeatedly",
            run,
            f"{len(failures)} calls failed while down; slowest call of the run "
            f"{run.slowest_call:.2f} s (bound {BOUND:.2f} s); "
            f"{len(granted_while_down)} granted while down; locking resumed "
            f"{max(complete, default=0):.2f} s after the nodes at worst (1 s cool-down; "
            "keys queued on paused nodes are deleted by the undo sent again, or expire)"
            + (
                f"; fence order broken {len(run.verdict.fence_violations)} times, each "
                "across a restart of 3 nodes, which empties a majority of the fence "
                "counters (see 3b)"
                if run.verdict.fence_violations
                else ""
            ),
        ),
        report=report,
    )
    assert not run.errors, run.errors[:5]
    assert not run.verdict.overlaps, run.verdict.describe()
    assert not run.fence_violations_without_data_loss(), run.verdict.describe()
    assert not granted_while_down, granted_while_down[:3]
    assert failures, "no call was made while the majority was down"
    assert not slow, [(f.seconds, f.message) for f in slow[:3]]
    assert run.slowest_call < BOUND, run.slowest_call  # granted calls too
    assert not unnamed, [(f.failed_nodes, f.message) for f in unnamed[:3]]
    assert max(complete, default=0) < NODE_COOLDOWN + DOWN_LOAD.ttl + 1.0, recovery
    return run


def test_majority_down_under_load_short(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Majority outages under load: fast named failures, no grant, recovery (5 s)."""
    majority_down_under_load(redis_nodes, redis_urls, tmp_path, 5.0, report=False)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_majority_down_under_load_long(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Majority outages under load: fast named failures, no grant, recovery (30 s)."""
    majority_down_under_load(redis_nodes, redis_urls, tmp_path, 30.0, report=True)
