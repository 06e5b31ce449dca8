"""Redlock against five real redis-server masters (the session nodes), plus a few
throwaway nodes for replicas, passwords and unix sockets."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import celery_redlock._wakeup as wakeup_mod
import celery_redlock.redlock as redlock_mod
from celery_redlock import (
    LockNotAcquired,
    QuorumUnavailable,
    Redlock,
    RedlockConfigError,
    Vote,
    _scripts,
)
from tests.servers import RedisServer

N = 5
REPO_ROOT = Path(__file__).resolve().parents[2]
FreshNodes = Callable[..., list[RedisServer]]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redlock_mod, "_WARNED", set())


@pytest.fixture
def clients(redis_urls: list[str]) -> Iterator[list[redis.Redis]]:
    """Plain redis-py clients on the five (flushed) session nodes, to look behind Redlock."""
    made = [redis.Redis.from_url(url, socket_timeout=2) for url in redis_urls]
    yield made
    for client in made:
        client.close()


@pytest.fixture
def managers(redis_urls: list[str]) -> Iterator[Callable[..., Redlock]]:
    made: list[Redlock] = []

    def make(servers: list[Any] | None = None, **kwargs: Any) -> Redlock:
        rl = Redlock(redis_urls if servers is None else servers, **kwargs)
        made.append(rl)
        return rl

    yield make
    for rl in made:
        rl.close()


def values(clients: list[redis.Redis], key: str) -> list[str | None]:
    raw: list[Any] = [c.get(key) for c in clients]
    return [None if v is None else v.decode() for v in raw]


def settled(
    clients: list[redis.Redis], key: str, expected: list[str | None], within: float = 1.0
) -> list[str | None]:
    """The key's values once they equal ``expected``, or as they are after ``within``
    seconds: a call returns once a quorum answered, and the other nodes apply the
    command a moment later."""
    deadline = time.monotonic() + within
    while True:
        seen = values(clients, key)
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.005)


# --------------------------------------------------------------------------
# The quorum, exhaustively

SUBSETS = [frozenset(i for i in range(N) if mask >> i & 1) for mask in range(2**N)]


@pytest.mark.parametrize(
    "held", SUBSETS, ids=lambda s: "held-" + ("".join(map(str, sorted(s))) or "none")
)
def test_acquired_exactly_when_the_free_nodes_form_a_quorum(
    clients: list[redis.Redis], managers: Callable[..., Redlock], held: frozenset[int]
) -> None:
    """Pre-hold the key on ``held``: the lock is had iff >= 3 nodes are free, and a
    failed attempt leaves our token on no node."""
    for i in held:
        clients[i].set("q", "theirs", px=30_000)
    rl = managers(retry_count=0)
    free = N - len(held)
    if free < 3:
        with pytest.raises(LockNotAcquired) as caught:
            rl.acquire("q", 10, value="ours")
        expected = [Vote.HELD if i in held else Vote.YES for i in range(N)]
        assert [v.vote for v in caught.value.votes] == expected
        assert caught.value.unavailable is False
        after = ["theirs" if i in held else None for i in range(N)]
        assert settled(clients, "q", after) == after
        return
    lock = rl.acquire("q", 10, value="ours")
    assert lock.validity > 9
    locked = ["theirs" if i in held else "ours" for i in range(N)]
    assert settled(clients, "q", locked) == locked
    assert rl.release(lock) is True
    released = ["theirs" if i in held else None for i in range(N)]
    assert settled(clients, "q", released) == released


# --------------------------------------------------------------------------
# Expiry, extend, release, re-entry


def test_a_lock_is_free_again_once_it_expires(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    first, second = managers(retry_count=0), managers(retry_count=0)
    lock = first.lock("exp", 0.3)
    assert lock is not None
    assert second.lock("exp", 0.3) is None
    time.sleep(0.35)
    assert values(clients, "exp") == [None] * N
    assert lock.remaining == 0.0
    assert second.lock("exp", 0.3) is not None


def test_extend_keeps_the_lock_held_past_its_original_ttl(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    owner, other = managers(retry_count=0), managers(retry_count=0)
    lock = owner.lock("ext", 1.0)
    assert lock is not None
    time.sleep(0.3)
    assert lock.extend(2.0) is True
    time.sleep(1.0)  # 1.3 s after taking a 1 s lock
    assert other.lock("ext", 1.0) is None
    assert values(clients, "ext") == [lock.value] * N
    assert lock.remaining is not None
    assert lock.remaining > 0
    assert lock.release() is True


def test_extend_of_an_expired_lock_returns_false(managers: Callable[..., Redlock]) -> None:
    rl = managers()
    lock = rl.lock("gone", 0.1)
    assert lock is not None
    time.sleep(0.15)
    assert rl.extend(lock, 10) is False
    assert rl.extend("gone", 10, lock.value) is False  # by name: the keys expired
    assert rl.holder("gone") is None


def test_release_deletes_on_every_node_and_only_our_token(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    rl = managers()
    lock = rl.lock("rel", 10)
    assert lock is not None
    assert values(clients, "rel") == [lock.value] * N
    clients[4].set("rel", "someone-else")
    assert rl.release(lock) is True
    assert values(clients, "rel") == [None] * 4 + ["someone-else"]


def test_release_of_a_lock_not_owned_returns_false(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    for c in clients:
        c.set("own", "owner", px=10_000)
    rl = managers()
    assert rl.release("own", "intruder") is False
    assert values(clients, "own") == ["owner"] * N


def test_reentry_with_the_same_value_is_granted_and_rearms(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    rl = managers(retry_count=0)
    assert rl.lock("re", 0.5, value="task-1") is not None
    again = managers(retry_count=0).lock("re", 20, value="task-1")  # e.g. the retried task
    assert again is not None
    assert all(c.pttl("re") > 15_000 for c in clients)
    assert rl.lock("re", 20, value="task-2") is None


def test_locked_waits_for_the_holder_and_is_woken_by_its_release(
    managers: Callable[..., Redlock],
) -> None:
    holder, waiter = managers(), managers(retry_delay=3.0)
    lock = holder.lock("wake", 10)
    assert lock is not None
    timer = threading.Timer(0.3, lock.release)
    timer.start()
    started = time.monotonic()
    with waiter.locked("wake", 10, wait=5.0) as mine:
        waited = time.monotonic() - started
        assert waiter.holder("wake") == mine.value
    timer.join()
    assert 0.25 < waited < 1.5  # woken by the release, not by the 3 s poll
    assert waiter.holder("wake") is None


def _release_channels(clients: list[redis.Redis]) -> list[list[bytes]]:
    """The release channels someone listens to, per node."""
    return [sorted(c.pubsub_channels("celery_redlock:released*")) for c in clients]


def _until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_waiting_process_listens_to_the_keys_it_waits_for_only(
    managers: Callable[..., Redlock], clients: list[redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release is announced on its key's own channel, and a process subscribes to the
    channels of the keys it waits for, dropping each LINGER seconds after its last
    waiter left: no process is told of every lock released anywhere."""
    monkeypatch.setattr(wakeup_mod, "LINGER", 1.0)
    holder, waiter = managers(), managers(retry_delay=3.0)
    lock = holder.lock("heard", 10)
    unheard = holder.lock("unheard", 10)
    assert lock is not None
    assert unheard is not None
    timer = threading.Timer(0.3, lock.release)
    timer.start()
    started = time.monotonic()
    with waiter.locked("heard", 10, wait=5.0):
        assert time.monotonic() - started < 1.5  # woken by the release, not the 3 s poll
        # Still subscribed (its waiter left less than LINGER ago), to this key alone.
        assert _release_channels(clients) == [[b"celery_redlock:released:heard"]] * N
    timer.join()
    holder.release(unheard)  # nobody waits for it: announced to no one
    numsub = [dict(c.pubsub_numsub("celery_redlock:released:unheard")) for c in clients]
    assert numsub == [{b"celery_redlock:released:unheard": 0}] * N
    assert _until(lambda: _release_channels(clients) == [[]] * N, 5.0)


def test_a_wait_on_a_new_key_is_subscribed_at_once_by_running_listeners(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    """The listener threads already run (subscribed to another key, idle in their
    wait): a waiter on a new key nudges them, so its release is heard, not polled."""
    holder, waiter = managers(), managers(retry_delay=3.0)
    first = holder.lock("first", 10)
    assert first is not None
    threading.Timer(0.2, first.release).start()
    waiter.release(waiter.acquire("first", 10, wait=5.0))
    assert _until(lambda: _release_channels(clients) == [[b"celery_redlock:released:first"]] * N, 2)
    second = holder.lock("second", 10)
    assert second is not None
    threading.Timer(0.3, second.release).start()
    started = time.monotonic()
    waiter.release(waiter.acquire("second", 10, wait=5.0))
    assert time.monotonic() - started < 1.0  # not after the listeners' 1 s idle wait


def test_a_forked_child_listens_for_its_own_waits_with_nothing_of_the_parent_s(
    managers: Callable[..., Redlock],
) -> None:
    """The parent's listener threads, waiters and pipes are not the child's: the child
    starts its own on its first wait, and is woken by the release like the parent."""
    import os

    holder, waiter = managers(), managers(retry_delay=3.0)
    lock = holder.lock("forked", 10)
    assert lock is not None
    threading.Timer(0.2, lock.release).start()
    waiter.release(waiter.acquire("forked", 10, wait=5.0))
    listener = waiter._listener
    assert listener._pipes  # the parent's threads run
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            state = [not listener._pipes, not listener._waiters, not listener._left]
            mine = holder.lock("forked-child", 10)
            assert mine is not None
            threading.Timer(0.3, mine.release).start()
            started = time.monotonic()
            waiter.release(waiter.acquire("forked-child", 10, wait=5.0))
            state.append(time.monotonic() - started < 1.5)  # woken, not the 3 s poll
            os.write(write, repr(state).encode())
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 200).decode()
    os.waitpid(child, 0)
    os.close(read)
    assert said == repr([True, True, True, True])
    assert listener._pipes  # the parent's are untouched


def _listening(client: redis.Redis) -> list[dict[str, Any]]:
    """The connections on a node whose last command was a (un)subscribe: listeners."""
    return [c for c in client.client_list() if c.get("cmd") in ("subscribe", "unsubscribe")]


def test_a_listener_with_nothing_left_to_hear_drops_its_connection(
    managers: Callable[..., Redlock], clients: list[redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once no key is waited for (nor lingering), each listener thread closes its
    connection instead of keeping an idle one the server could drop unseen; the
    threads stay, and connect again for the next wait."""
    monkeypatch.setattr(wakeup_mod, "LINGER", 1.0)
    holder, waiter = managers(), managers(retry_delay=5.0)
    lock = holder.lock("idle", 10)
    assert lock is not None
    threading.Timer(0.2, lock.release).start()
    waiter.release(waiter.acquire("idle", 10, wait=5.0))
    assert all(_listening(c) for c in clients)  # subscribed while the key lingers
    assert _until(lambda: not any(_listening(c) for c in clients), 5.0)
    assert waiter._listener._pipes  # the threads still run
    again = holder.lock("idle-again", 10)
    assert again is not None
    threading.Timer(0.3, again.release).start()
    started = time.monotonic()
    waiter.release(waiter.acquire("idle-again", 10, wait=8.0))
    assert time.monotonic() - started < 2.0  # heard on a new connection, not the 5 s poll


def test_a_listener_whose_connection_is_killed_connects_again_and_hears_the_release(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    """The server closes the listeners' connections (CLIENT KILL TYPE pubsub): each
    thread connects again after RECONNECT_DELAY, subscribes the keys waited for, and
    the release after that wakes the waiter."""
    holder, waiter = managers(), managers(retry_delay=5.0)
    first = holder.lock("killed", 10)
    assert first is not None
    threading.Timer(0.2, first.release).start()
    waiter.release(waiter.acquire("killed", 10, wait=5.0))
    assert sum(c.client_kill_filter(_type="pubsub") for c in clients) >= N
    second = holder.lock("killed-2", 10)
    assert second is not None
    threading.Timer(wakeup_mod.RECONNECT_DELAY + 1.0, second.release).start()
    started = time.monotonic()
    waiter.release(waiter.acquire("killed-2", 10, wait=8.0))
    waited = time.monotonic() - started
    assert waited < wakeup_mod.RECONNECT_DELAY + 2.0  # woken, not the 5 s poll
    assert all(b"celery_redlock:released:killed-2" in c for c in _release_channels(clients))


# --------------------------------------------------------------------------
# Fencing


def test_fences_strictly_increase_across_successive_holders_on_different_quorums(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    """Every 3-node quorum in turn (the other two held by a blocker): each new
    holder's fence is above the previous one."""
    holders = [managers(retry_count=0), managers(retry_count=0)]
    fences: list[int] = []
    for n, quorum in enumerate(itertools.combinations(range(N), 3)):
        for i in range(N):
            if i in quorum:
                clients[i].delete("fx")
            else:
                clients[i].set("fx", "blocker", px=10_000)
        lock = holders[n % 2].lock("fx", 10, fencing=True)
        assert lock is not None, quorum
        assert lock.fence is not None
        fences.append(lock.fence)
        assert lock.release() is True
    assert len(fences) == 10
    assert all(a < b for a, b in itertools.pairwise(fences)), fences


def test_fence_exceeds_a_higher_counter_found_on_some_nodes(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    clients[3].set("fh:fence", 41)
    # above any node clock in µs, and below 2**53 (Lua's numbers are doubles)
    clients[1].set("fh:fence", 8 * 10**15)
    rl = managers()
    first = rl.lock("fh", 10, fencing=True)
    assert first is not None
    assert first.fence == 8 * 10**15 + 1
    first.release()
    second = rl.lock("fh", 10, fencing=True)
    assert second is not None
    assert second.fence == 8 * 10**15 + 2
    assert [int(c.get("fh:fence") or 0) for c in clients] == [8 * 10**15 + 2] * N
    assert all(c.ttl("fh:fence") == -1 for c in clients)


def test_a_fence_starts_at_the_node_clock_so_lost_counters_do_not_repeat(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    """Fences are seeded from the nodes' clocks (µs): after every node lost its
    counter, the next fence is still above the last one."""
    rl = managers()
    first = rl.lock("fc", 10, fencing=True)
    assert first is not None
    clock_us = int(clients[0].time()[0]) * 1_000_000
    assert first.fence is not None
    assert abs(first.fence - clock_us) < 60 * 1_000_000
    first.release()
    for c in clients:
        c.delete("fc:fence")  # every node lost its data
    second = rl.lock("fc", 10, fencing=True)
    assert second is not None
    assert second.fence is not None
    assert second.fence > first.fence


def test_a_fence_write_short_of_a_quorum_fails_the_acquisition(
    clients: list[redis.Redis], managers: Callable[..., Redlock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock is taken over on 3 nodes between the read and the write of the fence:
    the write reaches 2 nodes only, so the lock is not granted and is undone."""
    rl = managers(retry_count=0)
    real = rl._fanout.script

    def script(
        script: _scripts.Script, keys: Any, args: Any, targets: Any = None, enough: Any = None
    ) -> list[Any]:
        if script is _scripts.FENCE_WRITE:
            for c in clients[:3]:
                c.set("fw", "thief", px=10_000)
        return real(script, keys, args, targets, enough)

    monkeypatch.setattr(rl._fanout, "script", script)
    assert rl.lock("fw", 10, value="ours", fencing=True) is None
    assert values(clients, "fw") == ["thief"] * 3 + [None] * 2
    assert [c.get("fw:fence") for c in clients[:3]] == [None] * 3  # refused there


def test_force_release_keeps_the_fence_counter(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    rl = managers()
    first = rl.lock("ff", 10, fencing=True)
    assert first is not None
    assert first.fence is not None
    assert rl.force_release("ff") == N
    second = rl.lock("ff", 10, fencing=True)
    assert second is not None
    assert second.fence is not None
    assert second.fence > first.fence


# --------------------------------------------------------------------------
# Scripts flushed, inspect, holder, force_release


def test_noscript_after_script_flush_on_a_majority_is_handled(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    rl = managers()
    warm = rl.lock("ns", 10, fencing=True)
    assert warm is not None
    assert rl.release(warm)

    def flush() -> None:
        for c in clients[:3]:
            c.script_flush()
        sha = _scripts.RELEASE.sha.decode()
        assert [c.script_exists(sha) for c in clients] == [[False]] * 3 + [[True]] * 2

    flush()
    lock = rl.lock("ns", 10, fencing=True)
    assert lock is not None
    assert values(clients, "ns") == [lock.value] * N
    flush()
    assert rl.extend(lock, 20) is True
    assert all(c.pttl("ns") > 15_000 for c in clients)
    flush()
    assert rl.holder("ns") == lock.value
    flush()
    assert rl.release(lock) is True
    assert values(clients, "ns") == [None] * N


def test_holder_inspect_and_force_release(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    rl = managers()
    assert rl.holder("adm") is None
    lock = rl.lock("adm", 10)
    assert lock is not None
    assert rl.holder("adm") == lock.value
    info = rl.inspect("adm")
    assert info.holder == lock.value
    assert info.nodes_holding == N
    assert info.ttl_left is not None
    assert 9 < info.ttl_left <= 10
    assert [node for node, _, _ in info.per_node] == [n.name for n in rl.nodes]
    assert all(
        token == lock.value and ms is not None and ms > 9000 for _, token, ms in info.per_node
    )
    clients[0].set("adm", "other")
    clients[1].delete("adm")
    info = rl.inspect("adm")
    assert (info.holder, info.nodes_holding) == (lock.value, 3)
    assert info.per_node[0][1:] == ("other", -1)
    assert info.per_node[1][1:] == (None, -2)
    assert rl.force_release("adm") == 4
    assert values(clients, "adm") == [None] * N
    assert rl.holder("adm") is None
    assert rl.release(lock) is False


def test_holder_is_none_when_no_token_has_a_quorum(
    clients: list[redis.Redis], managers: Callable[..., Redlock]
) -> None:
    for i, token in enumerate(["a", "a", "b", "b", None]):
        if token:
            clients[i].set("split", token)
    assert managers().holder("split") is None


# --------------------------------------------------------------------------
# Construction checks on real servers


def records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_version_check_warns_about_a_replica(
    redis_urls: list[str], fresh_nodes: FreshNodes, caplog: pytest.LogCaptureFixture
) -> None:
    (master,) = fresh_nodes(1)
    (replica,) = fresh_nodes(1, extra_args=["--replicaof", master.host, str(master.port)])
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    rl = Redlock([*redis_urls[:4], replica.url])
    try:
        warnings = records(caplog)
        assert len(warnings) == 1
        assert f"127.0.0.1:{replica.port}" in warnings[0]
        assert "not a master" in warnings[0]
    finally:
        rl.close()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_version_check_warns_about_an_eviction_policy(
    redis_urls: list[str],
    fresh_nodes: FreshNodes,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    (evicting,) = fresh_nodes(1, extra_args=["--maxmemory-policy", policy])
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    rl = Redlock([evicting.url, *redis_urls[:4]])
    try:
        warnings = records(caplog)
        assert len(warnings) == 1
        assert policy in warnings[0]
        assert f"127.0.0.1:{evicting.port}" in warnings[0]
    finally:
        rl.close()


def test_version_check_warns_about_an_even_count_once(
    redis_urls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    Redlock(redis_urls[:4]).close()
    Redlock(redis_urls[:4]).close()
    warnings = records(caplog)
    assert len(warnings) == 1
    assert "4 node" in warnings[0]


def test_healthy_masters_raise_no_warning(
    redis_urls: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    rl = Redlock(redis_urls)
    facts = rl.check_servers()
    rl.close()
    assert records(caplog) == []
    assert [f["reachable"] for f in facts] == ["yes"] * N
    assert all(f.get("role") == "master" for f in facts)
    assert all(f["redis_version"] for f in facts)


def test_fewer_than_a_quorum_reachable_at_construction_names_the_nodes(
    fresh_nodes: FreshNodes,
) -> None:
    nodes = fresh_nodes(N)
    urls = [node.url for node in nodes]
    for node in nodes[:3]:
        node.kill()
    started = time.monotonic()
    with pytest.raises(QuorumUnavailable) as caught:
        Redlock(urls)
    assert time.monotonic() - started < 2.0
    for node in nodes[:3]:
        assert f"127.0.0.1:{node.port}" in str(caught.value)
    assert [v.vote for v in caught.value.votes] == [Vote.ERROR] * 3 + [Vote.YES] * 2


PASSWORD = "s3cret-Pass"
WRONG = "wr0ng-Guess"


@pytest.mark.parametrize(
    "auth", [f":{WRONG}@", f"default:{WRONG}@", ""], ids=["wrong", "wrong-user", "none"]
)
def test_a_rejected_password_is_a_config_error_that_does_not_show_it(
    fresh_nodes: FreshNodes, auth: str
) -> None:
    nodes = fresh_nodes(3, password=PASSWORD)
    urls = [f"redis://{auth}127.0.0.1:{node.port}/0" for node in nodes]
    with pytest.raises(RedlockConfigError) as caught:
        Redlock(urls)
    text = f"{caught.value} {caught.value!r}"
    assert f"127.0.0.1:{nodes[0].port}" in text
    assert WRONG not in text
    assert PASSWORD not in text


def test_the_right_password_works_and_never_shows(fresh_nodes: FreshNodes) -> None:
    nodes = fresh_nodes(3, password=PASSWORD)
    urls = [f"redis://default:{PASSWORD}@127.0.0.1:{node.port}/0" for node in nodes]
    with Redlock(urls) as rl:
        assert PASSWORD not in repr(rl)
        lock = rl.lock("pw", 10)
        assert lock is not None
        assert PASSWORD not in repr(lock)
        assert nodes[0].client().get("pw") == lock.value.encode()
        assert rl.release(lock) is True


def test_a_user_the_acl_denies_the_release_channels_still_releases_and_waits(
    fresh_nodes: FreshNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis 7 gives a new ACL user no pub/sub channels: the release still deletes
    the key and says so (its announcement is skipped), a waiter is told once that
    it polls, and gets the lock by polling."""
    nodes = fresh_nodes(3)
    for node in nodes:
        try:
            node.client().acl_setuser(
                "locker", enabled=True, passwords=["+locker-pw"], keys=["*"],
                commands=["+@all"], reset_channels=True,
            )  # fmt: skip
        except redis.ResponseError as exc:  # pragma: no cover - before Redis 6.2
            pytest.skip(f"this redis-server has no channel ACLs: {exc}")
    urls = [f"redis://locker:locker-pw@127.0.0.1:{node.port}/0" for node in nodes]
    caplog.set_level(logging.WARNING, logger="celery_redlock._wakeup")
    with Redlock(urls, retry_delay=0.2) as holder, Redlock(urls, retry_delay=0.2) as waiter:
        lock = holder.lock("acl", 10)
        assert lock is not None
        assert holder.release(lock) is True
        assert [node.client().get("acl") for node in nodes] == [None] * 3
        again = holder.lock("acl", 10)
        assert again is not None
        threading.Timer(0.3, again.release).start()
        taken = waiter.acquire("acl", 10, wait=5.0)
        assert taken.release() is True
        assert _until(lambda: "grant them with '&celery_redlock:released:*'" in caplog.text, 5)


def test_unix_socket_and_tcp_nodes_mix(
    redis_urls: list[str], fresh_nodes: FreshNodes, clients: list[redis.Redis]
) -> None:
    (unix,) = fresh_nodes(1, unix_socket=True)
    with Redlock([unix.url, *redis_urls[:2]]) as rl:
        assert rl.nodes[0].name == f"unix:{unix.unix_socket}"
        lock = rl.lock("ux", 10)
        assert lock is not None
        assert unix.client().get("ux") == lock.value.encode()
        assert values(clients[:2], "ux") == [lock.value] * 2
        assert rl.release(lock) is True
        assert unix.client().get("ux") is None


def test_redis_clients_and_urls_mix(
    redis_urls: list[str], redis_nodes: list[RedisServer], clients: list[redis.Redis]
) -> None:
    servers: list[Any] = [
        redis_urls[0],
        f"{redis_nodes[1].host}:{redis_nodes[1].port}",
        redis.Redis(host=redis_nodes[2].host, port=redis_nodes[2].port),
    ]
    with Redlock(servers) as rl:
        lock = rl.lock("mix", 10)
        assert lock is not None
        assert values(clients[:3], "mix") == [lock.value] * 3


# --------------------------------------------------------------------------
# auto_release across the process's life


def run_program(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``program`` in a new interpreter (``python -c``) with ``args``; it must exit 0."""
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


EXIT_PROGRAM = """
import sys
from celery_redlock import Redlock
rl = Redlock(sys.argv[1].split(","), auto_release=sys.argv[2] == "1")
held = rl.lock("at-exit", 30)
print(held.value, flush=True)
# no close(): the interpreter exits with the lock held
"""


@pytest.mark.parametrize("auto_release", [True, False])
def test_auto_release_releases_at_interpreter_exit(
    redis_urls: list[str], clients: list[redis.Redis], auto_release: bool
) -> None:
    result = run_program(EXIT_PROGRAM, ",".join(redis_urls), "1" if auto_release else "0")
    token = result.stdout.strip()
    assert len(token) == 32
    assert values(clients, "at-exit") == ([None] * N if auto_release else [token] * N)


FORK_PROGRAM = """
import os, sys
from celery_redlock import Redlock
rl = Redlock(sys.argv[1].split(","), auto_release=True)
held = rl.lock("forked", 30)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # the child leaves normally, as a forked worker may
os.waitpid(pid, 0)
print("held" if rl.holder("forked") == held.value else "lost", flush=True)
"""


def test_a_forked_child_exiting_does_not_release_the_parents_locks(
    redis_urls: list[str],
) -> None:
    result = run_program(FORK_PROGRAM, ",".join(redis_urls))
    assert result.stdout.strip() == "held"


CHILD_CLOSE_PROGRAM = """
import os, sys
from celery_redlock import Redlock
rl = Redlock(sys.argv[1].split(","), auto_release=True)
parents = rl.lock("parent-held", 30)
pid = os.fork()
if pid == 0:
    mine = rl.lock("child-held", 30)
    rl.close()  # the child's own lock and connections, not the parent's
    os._exit(0 if mine is not None and not rl._fanout._idle else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), rl.holder("parent-held") == parents.value,
      rl.holder("child-held"), flush=True)
rl.close()
print(rl.holder("parent-held"), flush=True)
"""


def test_a_forked_child_closing_releases_its_own_locks_and_not_the_parents(
    redis_urls: list[str],
) -> None:
    """auto_release in a forked child: its close() releases the locks the child
    took and closes the child's connections; the parent's lock stays the parent's
    until the parent closes."""
    result = run_program(CHILD_CLOSE_PROGRAM, ",".join(redis_urls))
    assert result.stdout.split("\n")[:2] == ["0 True None", "None"], result.stderr


def test_resp3_clients_work_as_nodes(
    redis_nodes: list[RedisServer], redis_urls: list[str], clients: list[redis.Redis]
) -> None:
    servers = [redis.Redis(host=n.host, port=n.port, protocol=3) for n in redis_nodes[:3]]
    with Redlock(servers) as rl:
        lock = rl.lock("r3", 10, fencing=True)
        assert lock is not None
        assert lock.fence is not None
        assert lock.fence > 1
        assert values(clients[:3], "r3") == [lock.value] * 3
        assert rl.inspect("r3").holder == lock.value
        assert rl.extend(lock, 20) is True
        assert rl.release(lock) is True
        assert values(clients[:3], "r3") == [None] * 3


def test_the_database_number_in_a_url_is_used(
    redis_urls: list[str], redis_nodes: list[RedisServer]
) -> None:
    urls = [url.rsplit("/", 1)[0] + "/3" for url in redis_urls]
    with Redlock(urls) as rl:
        lock = rl.lock("in-db-3", 10)
        assert lock is not None
        for node in redis_nodes:
            assert node.client(db=3).get("in-db-3") == lock.value.encode()
            assert node.client(db=0).get("in-db-3") is None
        assert rl.release(lock) is True


# -- takeover, reassign, release by owner (how a task keeps its lock across a retry) --


def test_takeover_replaces_only_the_named_token_and_a_reservation_keeps_others_out(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    run = rl.acquire("job", 10, "task-1|aaaaaaaaaaaa")
    assert rl.reassign(run, "task-1", 20)
    assert run.value == "task-1"
    assert run.validity > 19
    assert [c.get("job") for c in clients] == [b"task-1"] * N
    assert all(19_000 < c.pttl("job") <= 20_000 for c in clients)
    # Another delivery's run (same task id, its own mark) cannot re-enter a running
    # token, nor can another task take the reservation...
    with pytest.raises(LockNotAcquired):
        rl.acquire("job", 10, "task-2|bbbbbbbbbbbb", retry_count=0, takeover="task-2")
    # ...but the retried run of task-1 takes it over, under its own token.
    retried = rl.acquire("job", 10, "task-1|cccccccccccc", retry_count=0, takeover="task-1")
    assert [c.get("job") for c in clients] == [b"task-1|cccccccccccc"] * N
    assert all(c.pttl("job") <= 10_000 for c in clients)
    with pytest.raises(LockNotAcquired):  # a second delivery of task-1 meanwhile
        rl.acquire("job", 10, "task-1|dddddddddddd", retry_count=0, takeover="task-1")
    assert rl.release(retried)
    assert [c.get("job") for c in clients] == [None] * N


def test_takeover_with_fencing_gives_a_higher_fence(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    first = rl.acquire("fenced", 10, "t|aaaaaaaaaaaa", fencing=True)
    assert rl.reassign(first, "t", 10)
    second = rl.acquire("fenced", 10, "t|bbbbbbbbbbbb", fencing=True, takeover="t")
    assert first.fence is not None
    assert second.fence is not None
    assert second.fence > first.fence
    assert [c.get("fenced") for c in clients] == [b"t|bbbbbbbbbbbb"] * N


def test_reassign_fails_for_a_lock_no_longer_held(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    lock = rl.acquire("gone", 10, "mine")
    for c in clients[:3]:
        c.set("gone", "someone-else")
    assert not rl.reassign(lock, "mine-later", 10)
    assert lock.value == "mine"
    assert [c.get("gone") for c in clients] == [b"someone-else"] * 3 + [b"mine-later"] * 2


def test_release_by_owner_frees_any_run_of_the_owner_and_nothing_else(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    rl.acquire("a", 10, "task-1|aaaaaaaaaaaa")
    rl.acquire("b", 10, "task-1")
    rl.acquire("c", 10, "task-10|aaaaaaaaaaaa")  # another task whose id starts alike
    rl.acquire("d", 10, "task-1x")
    assert not rl.release("a", "task-1")  # the exact token only, by default
    assert rl.release("a", "task-1", owner=True)
    assert rl.release("b", "task-1", owner=True)
    assert not rl.release("c", "task-1", owner=True)
    assert not rl.release("d", "task-1", owner=True)
    assert [c.get("a") for c in clients] == [None] * N
    assert [c.get("b") for c in clients] == [None] * N
    assert [c.get("c") for c in clients] == [b"task-10|aaaaaaaaaaaa"] * N
    assert [c.get("d") for c in clients] == [b"task-1x"] * N


def test_release_by_prefix_frees_the_runs_starting_with_it_and_nothing_else(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    rl.acquire("a", 10, "task-1|abc123def456")  # the run of the child marked abc123
    rl.acquire("b", 10, "task-1|fed321def456")  # another child's run of the same task
    rl.acquire("c", 10, "task-1")  # the task id's own hold (a retry's)
    assert rl.release("a", "task-1|abc123", prefix=True)
    assert not rl.release("b", "task-1|abc123", prefix=True)
    assert not rl.release("c", "task-1|abc123", prefix=True)
    assert [c.get("a") for c in clients] == [None] * N
    assert [c.get("b") for c in clients] == [b"task-1|fed321def456"] * N
    assert [c.get("c") for c in clients] == [b"task-1"] * N
    with pytest.raises(RedlockConfigError, match="owner=True or prefix=True, not both"):
        rl.release("b", "task-1", owner=True, prefix=True)
    assert [c.get("b") for c in clients] == [b"task-1|fed321def456"] * N


def test_takeover_needs_a_value(managers: Callable[..., Redlock]) -> None:
    rl = managers()
    with pytest.raises(RedlockConfigError, match="needs the new holder's value"):
        rl.acquire("x", 10, takeover="task-1")


def test_takeover_where_only_some_nodes_hold_the_reservation_leaves_none_behind(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    for c in clients[:2]:  # a reservation on a minority (the others lost it, or never had it)
        c.set("part", "task-1", px=20_000)
    lock = rl.acquire("part", 10, "task-1|aaaaaaaaaaaa", retry_count=0, takeover="task-1")
    assert [c.get("part") for c in clients] == [b"task-1|aaaaaaaaaaaa"] * N
    assert rl.release(lock)
    assert [c.get("part") for c in clients] == [None] * N
    for c in clients[:2]:  # a minority held by someone else: granted by the rest
        c.set("part", "task-2|bbbbbbbbbbbb", px=20_000)
    lock = rl.acquire("part", 10, "task-1|cccccccccccc", retry_count=0, takeover="task-1")
    assert [c.get("part") for c in clients][2:] == [b"task-1|cccccccccccc"] * 3
    rl.release(lock)


def test_a_failed_takeover_gives_the_reservation_back(
    managers: Callable[..., Redlock], clients: list[redis.Redis]
) -> None:
    rl = managers()
    for c in clients[:2]:
        c.set("back", "task-1", px=20_000)  # the reservation, on a minority
    for c in clients[2:]:
        c.set("back", "task-2|bbbbbbbbbbbb", px=20_000)  # another run holds the rest
    with pytest.raises(LockNotAcquired):
        rl.acquire("back", 10, "task-1|aaaaaaaaaaaa", retry_count=0, takeover="task-1")
    assert [c.get("back") for c in clients] == [b"task-1"] * 2 + [b"task-2|bbbbbbbbbbbb"] * 3


def test_replies_left_unread_at_quorum_do_not_pile_up(
    redis_urls: list[str], clients: list[redis.Redis]
) -> None:
    """Locks taken and never released (left to expire, as a rate limiter does): each
    call leaves the last node's reply unread, and a connection owing MAX_OWED of
    them reads them through, so they never pile up."""
    from celery_redlock import _nodes

    with Redlock(redis_urls) as rl:
        for i in range(5 * _nodes.MAX_OWED):
            assert rl.lock(f"pile-{i}", 10) is not None
        owed = [len(w.owed) for wires in rl._fanout._idle for w in wires]
        assert 0 < max(owed) <= _nodes.MAX_OWED
    assert all(c.get(f"pile-{5 * _nodes.MAX_OWED - 1}") for c in clients)


def test_a_waiter_is_not_woken_by_failed_attempts_while_a_holder_misses_a_node(
    managers: Callable[..., Redlock],
    clients: list[redis.Redis],
    redis_urls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A holder on two nodes of three (the third stalled when it acquired): a waiter's
    attempts each win the third node and fail. Their undo announces no release, so
    the waiter tries again after its retry delay, not at once on being woken by its
    own (or another waiter's) undo, round after round."""
    rl = managers(redis_urls[:3], retry_delay=0.2)
    clients[0].set("busy", "holder", px=30_000)
    clients[1].set("busy", "holder", px=30_000)
    attempts: list[float] = []
    real = Redlock._attempt

    def counted(self: Redlock, *args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Redlock, "_attempt", counted)
    with pytest.raises(LockNotAcquired):
        rl.acquire("busy", 10, wait=1.5)
    # A random delay in [0, 0.2] s between attempts: about 15 in 1.5 s.
    assert len(attempts) < 40, len(attempts)
