"""Scenario 7: nodes that answer with errors (OOM, READONLY, NOSCRIPT, wrong password).

Each must give a clear error: the votes name the node and carry Redis' own
message, or construction fails with a ``RedlockConfigError`` naming the node
(never the password). And no lock key is left behind on any node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from celery_redlock import LockNotAcquired, Redlock, RedlockConfigError, Vote
from tests.faults.harness import (
    FaultInjector,
    Load,
    Result,
    lock_keys,
    node_name,
    record,
    run_load,
)
from tests.servers import RedisServer

FreshNodes = Callable[..., list[RedisServer]]
PASSWORD, WRONG = "right-pw-7f3a", "wrong-pw-91c2"


def manager(urls: list[str], **kwargs: object) -> Redlock:
    kwargs.setdefault("retry_count", 1)
    kwargs.setdefault("logger", None)
    return Redlock(urls, **kwargs)  # type: ignore[arg-type]


def fill_to_oom(server: RedisServer) -> None:
    """About 2 MB of data, then maxmemory 1 MB with noeviction: used memory stays
    above the limit, so every write is refused (not only a large one)."""
    with server.client() as client:
        for n in range(200):
            client.set(f"filler:{n}", "x" * 10_000)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1mb")
        try:
            client.set("filler:probe", "x")
        except redis.exceptions.OutOfMemoryError:
            return
    raise AssertionError("the node never ran out of memory")


def no_lock_keys(nodes: list[RedisServer]) -> bool:
    return not any(k for n in nodes for k in lock_keys(n) if not k.startswith(b"filler:"))


def assert_error_votes(error: LockNotAcquired, nodes: list[RedisServer]) -> None:
    """Each of ``nodes`` voted ERROR (named, with a detail); the failure is unavailability."""
    named = {v.node: v for v in error.votes}
    for node in nodes:
        vote = named[node_name(node)]
        assert vote.vote is Vote.ERROR
        assert vote.detail.startswith("ResponseError")
        assert node_name(node) in str(error)
    assert error.unavailable


def carries(error: LockNotAcquired, nodes: list[RedisServer], text: str) -> bool:
    """True when each of ``nodes``' votes carries Redis' own error ``text``."""
    named = {v.node: v for v in error.votes}
    return all(text in named[node_name(n)].detail for n in nodes)


def oom_majority(fresh_nodes: FreshNodes) -> tuple[list[RedisServer], LockNotAcquired]:
    nodes = fresh_nodes(5)
    for node in nodes[:3]:
        fill_to_oom(node)
    rl = manager([n.url for n in nodes])
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("oom", 10)
    rl.close()
    return nodes, caught.value


def readonly_majority(fresh_nodes: FreshNodes) -> tuple[list[RedisServer], LockNotAcquired]:
    nodes = fresh_nodes(6)
    for node in nodes[:3]:
        with node.client() as client:
            client.replicaof(nodes[5].host, nodes[5].port)
    rl = manager([n.url for n in nodes[:5]])
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("ro", 10)
    rl.close()
    return nodes, caught.value


@pytest.mark.parametrize("case", ["OOM", "READONLY"])
def test_the_vote_detail_carries_the_redis_error(fresh_nodes: FreshNodes, case: str) -> None:
    """An OOM or READONLY reply reaches the vote's detail and the message as Redis said it."""
    make = oom_majority if case == "OOM" else readonly_majority
    nodes, error = make(fresh_nodes)
    assert carries(error, nodes[:3], case), str(error)


# --------------------------------------------------------------------------
# OOM


def test_oom_majority_fails_with_error_votes_and_leaves_no_key(
    fresh_nodes: FreshNodes,
) -> None:
    """3 of 5 nodes out of memory (noeviction): LockNotAcquired with an error vote from
    each; the 2 nodes that said yes are released at once, fenced or not."""
    nodes = fresh_nodes(5)
    for node in nodes[:3]:
        fill_to_oom(node)
    rl = manager([n.url for n in nodes])
    said = []
    for fencing in (False, True):
        with pytest.raises(LockNotAcquired) as caught:
            rl.acquire("oom", 10, fencing=fencing)
        said.append(carries(caught.value, nodes[:3], "OOM"))
        assert_error_votes(caught.value, nodes[:3])
        assert no_lock_keys(nodes)
    rl.close()
    record(
        Result(
            "7a. OOM: 3 then 2 of 5 nodes at maxmemory 1 MB, noeviction",
            acquisitions=0,
            faults=1,
            overlaps=0,
            fence_violations=0,
            notes="majority: LockNotAcquired with an error vote per OOM node ("
            + ("Redis' OOM text kept" if all(said) else "Redis' OOM text LOST")
            + "); no key left on the nodes that said yes",
        )
    )


def test_oom_minority_still_locks_and_leaves_no_key(fresh_nodes: FreshNodes) -> None:
    """2 of 5 nodes out of memory: locks work on the other 3; release leaves nothing."""
    nodes = fresh_nodes(5)
    for node in nodes[:2]:
        fill_to_oom(node)
    rl = manager([n.url for n in nodes])
    acquired = 0
    for n in range(20):
        lock = rl.acquire(f"oom-{n}", 10, fencing=n % 2 == 0)
        assert lock.extend(10)
        assert lock.release()
        acquired += 1
    rl.close()
    assert no_lock_keys(nodes)
    record(
        Result(
            "7a. OOM: 3 then 2 of 5 nodes at maxmemory 1 MB, noeviction",
            acquisitions=acquired,
            faults=1,
            overlaps=0,
            fence_violations=0,
            notes="minority: locks, extends and releases work on the other 3",
        )
    )


# --------------------------------------------------------------------------
# READONLY


def test_readonly_replicas_give_readonly_votes_and_no_key(
    fresh_nodes: FreshNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """3 of 5 nodes made replicas (REPLICAOF): construction warns about each, a lock
    fails with READONLY votes and no key; with 2 replicas, locks work."""
    nodes = fresh_nodes(6)
    lock_nodes, master = nodes[:5], nodes[5]
    for node in lock_nodes[:3]:
        with node.client() as client:
            client.replicaof(master.host, master.port)
    with caplog.at_level("WARNING"):
        rl = Redlock([n.url for n in lock_nodes], retry_count=1)
    for node in lock_nodes[:3]:
        assert any(node_name(node) in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("ro", 10)
    said = carries(caught.value, lock_nodes[:3], "READONLY")
    assert_error_votes(caught.value, lock_nodes[:3])
    assert no_lock_keys(nodes)
    with lock_nodes[2].client() as client:
        client.replicaof("NO", "ONE")
    acquired = 0
    for n in range(10):
        lock = rl.acquire(f"ro-{n}", 10, fencing=True)
        assert lock.release()
        acquired += 1
    rl.close()
    assert no_lock_keys(nodes)
    record(
        Result(
            "7b. READONLY: 3 then 2 of 5 nodes made replicas (REPLICAOF)",
            acquisitions=acquired,
            faults=2,
            overlaps=0,
            fence_violations=0,
            notes="warned at construction per replica; majority: LockNotAcquired with an "
            "error vote per replica ("
            + ("Redis' READONLY text kept" if said else "READONLY text LOST")
            + "); minority: locks work; no key left",
        )
    )


# --------------------------------------------------------------------------
# NOSCRIPT


def test_script_flush_between_calls_is_invisible(
    redis_nodes: list[RedisServer], redis_urls: list[str]
) -> None:
    """SCRIPT FLUSH on every node before each call: acquire, extend, release all work
    (NOSCRIPT answered by a full EVAL) and leave no key."""
    rl = manager(redis_urls)

    def flush() -> None:
        for node in redis_nodes:
            with node.client() as client:
                client.script_flush()

    for fencing in (False, True):
        flush()
        lock = rl.acquire("noscript", 10, fencing=fencing)
        flush()
        assert lock.extend(10)
        flush()
        assert rl.holder("noscript") == lock.value
        flush()
        assert lock.release()
    rl.close()
    assert no_lock_keys(redis_nodes)


def script_flushes(servers: list[RedisServer]) -> Callable[[FaultInjector], None]:
    """SCRIPT FLUSH on a random node every 5-50 ms."""

    def schedule(inj: FaultInjector) -> None:
        while inj.running():
            inj.flush_scripts(inj.choose(servers, 1)[0])
            inj.wait(inj.uniform(0.005, 0.05))

    return schedule


def script_flush_under_load(
    nodes: list[RedisServer], urls: list[str], tmp_path: Path, duration: float, report: bool
) -> None:
    # node_timeout 0.2: a reply slowed by a busy machine is not what this scenario is about.
    run = run_load(
        urls, [Load(ttl=1.0, node_timeout=0.2)], duration, tmp_path, script_flushes(nodes)
    )
    print(run.summary())
    time.sleep(0.1)  # the last releases are answered
    left = [k for n in nodes for k in lock_keys(n)]
    script_errors = [f for f in run.failures if "ResponseError" in f.message]
    record(
        Result.from_run(
            "7c. NOSCRIPT: SCRIPT FLUSH on a random node every 5-50 ms, under load",
            run,
            f"{len(script_errors)} calls saw a script error, {len(run.errors)} errors; "
            f"{len(left)} keys left after the run",
        ),
        report=report,
    )
    assert not run.errors, run.errors[:5]
    assert not script_errors, [f.message for f in script_errors[:3]]
    assert not run.verdict.overlaps, run.verdict.describe()
    assert not run.verdict.fence_violations, run.verdict.describe()
    assert not left
    assert run.lost_at_release == 0


def test_script_flush_under_load_short(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Scripts flushed every few ms under load: no error, no overlap, no key left (2 s)."""
    script_flush_under_load(redis_nodes, redis_urls, tmp_path, 2.0, report=False)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_script_flush_under_load_long(
    redis_nodes: list[RedisServer], redis_urls: list[str], tmp_path: Path
) -> None:
    """Scripts flushed every few ms under load: no error, no overlap, no key left (15 s)."""
    script_flush_under_load(redis_nodes, redis_urls, tmp_path, 15.0, report=True)


# --------------------------------------------------------------------------
# Wrong password


def wrong_urls(nodes: list[RedisServer], password: str | None) -> list[str]:
    auth = f":{password}@" if password else ""
    return [f"redis://{auth}{n.host}:{n.port}/0" for n in nodes]


@pytest.mark.parametrize("given", [WRONG, None], ids=["wrong-password", "no-password"])
def test_wrong_password_is_a_config_error_at_construction(
    fresh_nodes: FreshNodes, given: str | None
) -> None:
    """A wrong or missing password: RedlockConfigError at construction naming the node
    and the credentials, never the password."""
    nodes = fresh_nodes(3, password=PASSWORD)
    urls = [nodes[0].url, *wrong_urls(nodes[1:2], given), nodes[2].url]
    with pytest.raises(RedlockConfigError) as caught:
        Redlock(urls)
    message = str(caught.value)
    assert node_name(nodes[1]) in message
    assert "password" in message
    assert WRONG not in message
    assert PASSWORD not in message
    assert no_lock_keys(nodes)
    record(
        Result(
            "7d. wrong or missing password",
            acquisitions=0,
            faults=1,
            overlaps=0,
            fence_violations=0,
            notes="RedlockConfigError at construction naming the node; the password "
            "appears in no message",
        )
    )


def test_wrong_password_without_the_check_gives_auth_votes(fresh_nodes: FreshNodes) -> None:
    """version_check=False: the lock fails with each node's authentication error, no
    password in the message, no key."""
    nodes = fresh_nodes(3, password=PASSWORD)
    rl = manager(wrong_urls(nodes, WRONG), version_check=False)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("auth", 10)
    rl.close()
    message = str(caught.value)
    assert all(v.vote is Vote.ERROR for v in caught.value.votes)
    assert all(node_name(n) in message for n in nodes)
    assert "password" in message.lower() or "auth" in message.lower()
    assert WRONG not in message
    assert PASSWORD not in message
    assert no_lock_keys(nodes)
