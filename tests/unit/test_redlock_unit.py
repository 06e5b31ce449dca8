"""Redlock and Lock over five fakeredis nodes, with a fake monotonic clock where
timing matters."""

from __future__ import annotations

import gc
import logging
import math
import re
import secrets
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest

import celery_redlock.redlock as redlock_mod
from celery_redlock import (
    Lock,
    LockExtendError,
    LockNotAcquired,
    LockNotOwned,
    QuorumUnavailable,
    Redlock,
    RedlockConfigError,
    ServerVersionError,
    Vote,
    _scripts,
)
from celery_redlock._nodes import pack, parse_servers

N = 5
SECRET = "s3cretPW"
START = 1000.0

Make = Callable[..., Redlock]


# --------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the once-only warnings afresh."""
    monkeypatch.setattr(redlock_mod, "_WARNED", set())


@pytest.fixture
def servers() -> list[fakeredis.FakeServer]:
    return [fakeredis.FakeServer() for _ in range(N)]


@pytest.fixture
def clients(servers: list[fakeredis.FakeServer]) -> list[fakeredis.FakeRedis]:
    return [fakeredis.FakeRedis(server=server) for server in servers]


@pytest.fixture
def make(clients: list[fakeredis.FakeRedis]) -> Iterator[Make]:
    """Factory of managers over the five fake nodes; closed at teardown."""
    made: list[Redlock] = []

    def factory(servers: list[Any] | None = None, **kwargs: Any) -> Redlock:
        rl = Redlock(clients if servers is None else servers, **kwargs)
        made.append(rl)
        return rl

    yield factory
    for rl in made:
        rl.close()


def values(clients: list[fakeredis.FakeRedis], key: str) -> list[str | None]:
    raw: list[Any] = [c.get(key) for c in clients]
    return [None if v is None else v.decode() for v in raw]


def hold(
    clients: list[fakeredis.FakeRedis], key: str, token: str, nodes: range | list[int]
) -> None:
    for i in nodes:
        clients[i].set(key, token, px=60_000)


class FakeClock:
    """A monotonic clock that moves only when told (or slept on)."""

    def __init__(self) -> None:
        self.now = START
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replaces the clock and sleep of celery_redlock.redlock only."""
    fake = FakeClock()
    monkeypatch.setattr(
        redlock_mod, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep)
    )
    return fake


def slow_network(
    monkeypatch: pytest.MonkeyPatch,
    rl: Redlock,
    clock: FakeClock,
    seconds: float,
    only: _scripts.Script | None = None,
) -> list[_scripts.Script]:
    """Every script call of ``rl`` (or only ``only``) takes ``seconds`` on the fake
    clock; returns the list of scripts sent, in order. The plain ``SET NX PX``
    acquire (a token made by the manager) is listed as ``_scripts.ACQUIRE``."""
    real = rl._fanout.script
    real_call = rl._fanout.call
    sent: list[_scripts.Script] = []

    def script(
        script: _scripts.Script, keys: Any, args: Any, targets: Any = None, enough: Any = None
    ) -> list[Any]:
        sent.append(script)
        if only is None or script is only:
            clock.now += seconds
        return real(script, keys, args, targets, enough)

    def call(
        packed: bytes, fallback: Any = None, targets: Any = None, enough: Any = None
    ) -> list[Any]:
        if packed.startswith(b"*6\r\n$3\r\nSET\r\n"):
            sent.append(_scripts.ACQUIRE)
            if only is None or only is _scripts.ACQUIRE:
                clock.now += seconds
        return real_call(packed, fallback, targets, enough)

    monkeypatch.setattr(rl._fanout, "script", script)
    monkeypatch.setattr(rl._fanout, "call", call)
    return sent


def disconnect(clients: list[fakeredis.FakeRedis], nodes: list[int]) -> None:
    for i in nodes:
        clients[i].connection_pool.connection_kwargs["server"].connected = False


# --------------------------------------------------------------------------
# Arguments


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Redlock([])


@pytest.mark.parametrize("servers", [[], (), None, "", [""]])
def test_empty_servers_are_refused(servers: object) -> None:
    with pytest.raises(RedlockConfigError):
        Redlock(servers)


def test_duplicate_servers_are_refused_naming_the_node() -> None:
    with pytest.raises(RedlockConfigError, match=r"127\.0\.0\.1:7001.*twice"):
        Redlock(["127.0.0.1:7001", "redis://127.0.0.1:7002/0", "redis://127.0.0.1:7001/0"])


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (f"redis://admin:{SECRET}@db1:notaport/0", "db1:notaport"),
        (f"ftp://admin:{SECRET}@db1:1", "ftp"),
        ("db1:port", "db1:port"),
        ("db1:99999", "99999"),
    ],
)
def test_an_unparsable_spec_is_named_without_its_password(spec: str, named: str) -> None:
    with pytest.raises(RedlockConfigError) as caught:
        Redlock(["127.0.0.1:7001", spec, "127.0.0.1:7003"], version_check=False)
    assert named in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_password_never_shows_in_repr_nodes_or_lock_errors() -> None:
    """Nothing listens on these ports: the error names each node, never the password."""
    urls = [f"redis://admin:{SECRET}@127.0.0.1:{port}/0" for port in (1, 2, 3)]
    rl = Redlock(urls, version_check=False, retry_count=0)
    try:
        assert SECRET not in repr(rl)
        assert SECRET not in str(rl)
        assert SECRET not in repr(rl.nodes)
        assert "127.0.0.1:1" in repr(rl)
        with pytest.raises(LockNotAcquired) as caught:
            rl.acquire("r", 10)
        assert SECRET not in str(caught.value)
        assert SECRET not in repr(caught.value.votes)
        assert "127.0.0.1:2" in str(caught.value)
    finally:
        rl.close()


@pytest.mark.parametrize(
    "ttl",
    [0, 0.0, -1, -0.5, 0.0004, math.nan, math.inf, -math.inf, True, False, "10", None, [10]],
    ids=repr,
)
def test_a_bad_ttl_is_a_config_error_naming_ttl(make: Make, ttl: object) -> None:
    rl = make()
    with pytest.raises(RedlockConfigError, match="ttl"):
        rl.lock("r", ttl)  # type: ignore[arg-type]
    lock = rl.lock("r", 10)
    assert lock is not None
    with pytest.raises(RedlockConfigError, match="ttl"):
        rl.extend(lock, ttl)  # type: ignore[arg-type]


def test_a_float_ttl_is_fine_and_one_the_drift_eats_is_a_config_error(
    make: Make, clients: list[Any]
) -> None:
    rl = make(retry_count=0)
    with pytest.raises(RedlockConfigError, match="too short"):  # 1 ms < the 2 ms drift allowance
        rl.acquire("ms", 0.001)
    assert values(clients, "ms") == [None] * N
    lock = rl.lock("f", 2.5)
    assert lock is not None
    assert all(2000 < c.pttl("f") <= 2500 for c in clients)


@pytest.mark.parametrize("retry_count", [-1, 1.5, "3", None, True])
def test_a_bad_retry_count_is_a_config_error(clients: list[Any], retry_count: object) -> None:
    with pytest.raises(RedlockConfigError, match="retry_count"):
        Redlock(clients, retry_count=retry_count)  # type: ignore[arg-type]


@pytest.mark.parametrize("drift_factor", [-0.01, 0.5, 0.7, 1, math.nan, math.inf, "0.01", True])
def test_drift_factor_outside_zero_to_half_is_a_config_error(
    clients: list[Any], drift_factor: object
) -> None:
    with pytest.raises(RedlockConfigError, match="drift_factor"):
        Redlock(clients, drift_factor=drift_factor)  # type: ignore[arg-type]


@pytest.mark.parametrize("drift_factor", [0, 0.0, 0.01, 0.499])
def test_drift_factor_inside_zero_to_half_is_accepted(make: Make, drift_factor: float) -> None:
    assert make(drift_factor=drift_factor).drift_factor == drift_factor


@pytest.mark.parametrize(
    ("name", "value"),
    [("retry_delay", -0.1), ("retry_delay", math.nan), ("node_timeout", 0), ("node_timeout", -1)],
)
def test_bad_delays_and_timeouts_are_config_errors(
    clients: list[Any], name: str, value: float
) -> None:
    with pytest.raises(RedlockConfigError, match=name):
        Redlock(clients, **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("resource", ["", b"r", None, 5, ["r"]], ids=repr)
def test_a_resource_must_be_a_non_empty_str(make: Make, resource: object) -> None:
    rl = make()
    for call in (
        lambda: rl.lock(resource, 10),  # type: ignore[arg-type]
        lambda: rl.release(resource, "token"),  # type: ignore[arg-type]
        lambda: rl.extend(resource, 10, "token"),  # type: ignore[arg-type]
        lambda: rl.inspect(resource),  # type: ignore[arg-type]
        lambda: rl.force_release(resource),  # type: ignore[arg-type]
    ):
        with pytest.raises(RedlockConfigError, match="resource"):
            call()


@pytest.mark.parametrize("value", ["", b"tok", 5], ids=repr)
def test_a_caller_token_must_be_a_non_empty_str(make: Make, value: object) -> None:
    with pytest.raises(RedlockConfigError, match="value"):
        make().lock("r", 10, value=value)  # type: ignore[arg-type]


def test_release_by_name_without_its_token_is_a_config_error(make: Make) -> None:
    with pytest.raises(RedlockConfigError, match="token"):
        make().release("r")


# --------------------------------------------------------------------------
# Attempts and retries


def test_retry_count_zero_means_exactly_one_attempt(
    make: Make, clients: list[Any], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(clients, "r", "other", range(N))
    rl = make(retry_count=0)
    sent = slow_network(monkeypatch, rl, clock, 0.0)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10)
    assert caught.value.attempts == 1
    assert sent.count(_scripts.ACQUIRE) == 1
    assert clock.slept == []


def test_retry_count_attempts_with_random_pauses_up_to_retry_delay(
    make: Make, clients: list[Any], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(clients, "r", "other", range(N))
    rl = make(retry_count=4, retry_delay=0.3)
    sent = slow_network(monkeypatch, rl, clock, 0.0)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10)
    assert caught.value.attempts == 4
    assert sent.count(_scripts.ACQUIRE) == 4
    assert len(clock.slept) == 3  # between attempts, not after the last
    assert all(0 <= pause <= 0.3 for pause in clock.slept)


def test_per_call_retry_settings_override_the_managers(
    make: Make, clients: list[Any], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold(clients, "r", "other", range(N))
    rl = make(retry_count=5, retry_delay=0.3)
    slow_network(monkeypatch, rl, clock, 0.0)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10, retry_count=2, retry_delay=0.01)
    assert caught.value.attempts == 2
    assert all(pause <= 0.01 for pause in clock.slept)


def test_wait_keeps_trying_until_the_deadline(make: Make, clients: list[Any]) -> None:
    hold(clients, "r", "other", range(N))
    rl = make(retry_count=1, retry_delay=0.02)
    started = time.monotonic()
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10, wait=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.5
    assert caught.value.attempts > 2


def test_wait_returns_as_soon_as_the_holder_releases(make: Make) -> None:
    """A waiter gets the lock soon after the release, well before its retry delay."""
    holder, waiter = make(), make(retry_delay=3.0)
    lock = holder.lock("r", 10)
    assert lock is not None
    threading.Timer(0.3, lock.release).start()
    started = time.monotonic()
    got = waiter.acquire("r", 10, wait=5.0)
    assert time.monotonic() - started < 2.0
    assert waiter.holder("r") == got.value


def test_quorum_with_a_failed_node_is_still_granted(make: Make, clients: list[Any]) -> None:
    """One node erring does not turn a held quorum into an error (redlock-py's bug)."""
    disconnect(clients, [0])
    rl = make(version_check=False)
    lock = rl.lock("r", 10)
    assert lock is not None
    assert values(clients[1:], "r") == [lock.value] * 4


def test_a_failed_attempt_is_undone_on_every_node_including_failed_ones(
    make: Make, clients: list[Any], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    disconnect(clients, [0])
    hold(clients, "r", "other", [1, 2])
    rl = make(version_check=False, retry_count=0)
    calls: list[tuple[_scripts.Script, Any]] = []
    real = rl._fanout.script

    def spy(
        script: _scripts.Script, keys: Any, args: Any, targets: Any = None, enough: Any = None
    ) -> list[Any]:
        calls.append((script, targets))
        return real(script, keys, args, targets, enough)

    monkeypatch.setattr(rl._fanout, "script", spy)
    assert rl.lock("r", 10, value="mine") is None
    assert calls == [(_scripts.ACQUIRE, None), (_scripts.UNDO, None)]  # None: every node
    assert values(clients[1:], "r") == ["other", "other", None, None]


def test_lock_not_acquired_carries_each_nodes_vote(make: Make, clients: list[Any]) -> None:
    hold(clients, "r", "other", [0, 1])
    disconnect(clients, [2])
    rl = make(version_check=False, retry_count=0)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10)
    error = caught.value
    assert error.resource == "r"
    assert [v.node for v in error.votes] == [n.name for n in rl.nodes]
    assert [v.vote for v in error.votes] == [Vote.HELD, Vote.HELD, Vote.ERROR, Vote.YES, Vote.YES]
    assert "ConnectionError" in error.votes[2].detail
    assert error.unavailable is False  # a holder, not an outage
    assert values([clients[i] for i in (0, 1, 3, 4)], "r") == ["other", "other", None, None]


def test_lock_not_acquired_is_unavailable_when_a_majority_errs(
    make: Make, clients: list[Any]
) -> None:
    disconnect(clients, [0, 1, 2])
    rl = make(version_check=False, retry_count=0)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10)
    assert caught.value.unavailable is True
    assert [v.vote for v in caught.value.votes][:3] == [Vote.ERROR] * 3
    for node in rl.nodes[:3]:
        assert node.name in str(caught.value)


def test_lock_returns_none_where_acquire_raises(make: Make, clients: list[Any]) -> None:
    hold(clients, "r", "other", range(3))
    assert make(retry_count=0).lock("r", 10) is None


# --------------------------------------------------------------------------
# Validity and the clock


@pytest.mark.parametrize(
    ("ttl", "elapsed", "drift_factor"),
    [(10.0, 0.25, 0.01), (10.0, 0.0, 0.01), (1.0, 0.05, 0.1), (30.0, 2.0, 0.0), (0.5, 0.1, 0.3)],
)
def test_validity_is_ttl_minus_elapsed_minus_drift(
    make: Make,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    ttl: float,
    elapsed: float,
    drift_factor: float,
) -> None:
    """validity = ttl - elapsed - (drift_factor * ttl + 2 ms), elapsed on the monotonic clock."""
    rl = make(drift_factor=drift_factor)
    slow_network(monkeypatch, rl, clock, elapsed)
    lock = rl.lock("r", ttl)
    assert lock is not None
    drift = drift_factor * ttl + 0.002
    assert lock.validity == pytest.approx(ttl - elapsed - drift)
    assert lock.expires_at == pytest.approx(START + ttl - drift)
    assert lock.remaining == pytest.approx(lock.validity)
    clock.now = START + ttl
    assert lock.remaining == 0.0


@pytest.mark.parametrize(
    "elapsed",
    [10.5, 10.0, 9.9, 10 - 0.102 + 1e-6],
    ids=["past-ttl", "ttl", "within-drift", "just-past-drift"],
)
def test_an_acquisition_slower_than_ttl_minus_drift_is_not_granted_and_leaves_no_key(
    make: Make,
    clients: list[Any],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    elapsed: float,
) -> None:
    rl = make(retry_count=0)
    slow_network(monkeypatch, rl, clock, elapsed, only=_scripts.ACQUIRE)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("r", 10)
    assert [v.vote for v in caught.value.votes] == [Vote.YES] * N  # every node said yes
    assert values(clients, "r") == [None] * N


def test_an_acquisition_just_inside_the_validity_is_granted(
    make: Make, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rl = make(retry_count=0)
    slow_network(monkeypatch, rl, clock, 10 - 0.102 - 0.001, only=_scripts.ACQUIRE)
    lock = rl.lock("r", 10)
    assert lock is not None
    assert lock.validity == pytest.approx(0.001)


# --------------------------------------------------------------------------
# Tokens and re-entry


def test_token_is_32_hex_chars_from_secrets_and_new_each_call(
    make: Make, clients: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    issued: list[tuple[int, str]] = []

    def token_hex(nbytes: int) -> str:
        token = secrets.token_hex(nbytes)
        issued.append((nbytes, token))
        return token

    monkeypatch.setattr(redlock_mod, "secrets", types.SimpleNamespace(token_hex=token_hex))
    rl = make()
    first, second = rl.lock("a", 10), rl.lock("b", 10)
    assert first is not None
    assert second is not None
    assert [token for _, token in issued] == [first.value, second.value]
    assert all(nbytes >= 16 for nbytes, _ in issued)
    assert first.value != second.value
    for lock in (first, second):
        assert re.fullmatch(r"[0-9a-f]{32}", lock.value)
        assert values(clients, lock.resource) == [lock.value] * N


def test_a_caller_chosen_value_is_the_token(make: Make, clients: list[Any]) -> None:
    lock = make().lock("r", 10, value="task-id-123")
    assert lock is not None
    assert lock.value == "task-id-123"
    assert values(clients, "r") == ["task-id-123"] * N


def test_reentry_with_the_same_value_is_granted_and_rearms_the_ttl(
    make: Make, clients: list[Any]
) -> None:
    rl = make(retry_count=0)
    assert rl.lock("r", 1, value="task-1") is not None
    for c in clients:
        c.pexpire("r", 100)
    again = rl.lock("r", 30, value="task-1")
    assert again is not None
    assert all(c.pttl("r") > 20_000 for c in clients)
    assert rl.lock("r", 30, value="task-2") is None


def test_reentry_counts_only_nodes_that_hold_the_same_value(make: Make, clients: list[Any]) -> None:
    rl = make(retry_count=0)
    hold(clients, "r", "task-1", [0, 1, 2])
    hold(clients, "r", "other", [3, 4])
    assert rl.lock("r", 10, value="task-1") is not None
    hold(clients, "r", "other", [0, 1, 2])
    hold(clients, "r", "task-1", [3, 4])
    assert rl.lock("r", 10, value="task-1") is None
    # Theirs untouched; and the keys that held task-1 before the attempt are left:
    # a failed re-entry must not delete the hold its owner already had.
    assert values(clients, "r") == ["other"] * 3 + ["task-1"] * 2


def test_a_failed_reentry_leaves_the_owner_s_quorum_and_undoes_only_what_it_set(
    make: Make, clients: list[Any]
) -> None:
    """The owner's token is on one node, another token on three, one node is free:
    the re-entry fails (2 of 5), the free node it set is undone, and the node it
    only re-armed keeps the owner's hold."""
    rl = make(retry_count=0)
    hold(clients, "r", "task-1", [0])
    hold(clients, "r", "other", [1, 2, 3])
    assert rl.lock("r", 10, value="task-1") is None
    assert values(clients, "r") == ["task-1", "other", "other", "other", None]


# --------------------------------------------------------------------------
# Release


def test_release_deletes_the_key_on_every_node(make: Make, clients: list[Any]) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    assert rl.release(lock) is True
    assert values(clients, "r") == [None] * N
    assert lock.validity == 0.0
    assert lock.remaining == 0.0


def test_release_of_a_lock_not_owned_returns_false_and_leaves_the_owners_key(
    make: Make, clients: list[Any]
) -> None:
    hold(clients, "r", "owner", range(N))
    rl = make()
    assert rl.release(Lock("r", "intruder", manager=rl)) is False
    assert rl.release("r", "intruder") is False
    assert values(clients, "r") == ["owner"] * N


def test_strict_release_of_a_lock_not_owned_raises_lock_not_owned(
    make: Make, clients: list[Any]
) -> None:
    hold(clients, "r", "owner", range(N))
    with pytest.raises(LockNotOwned) as caught:
        make().release("r", "intruder", strict=True)
    assert caught.value.resource == "r"
    assert values(clients, "r") == ["owner"] * N


def test_release_on_a_minority_is_not_a_release(make: Make, clients: list[Any]) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    hold(clients, "r", "thief", [0, 1, 2])
    assert rl.release(lock) is False
    with pytest.raises(LockNotOwned):
        rl.release(lock, strict=True)
    assert values(clients, "r") == ["thief"] * 3 + [None] * 2


# --------------------------------------------------------------------------
# Extend


def test_extend_rearms_every_node_and_moves_the_deadline(
    make: Make, clients: list[Any], clock: FakeClock
) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    clock.now = START + 5
    assert rl.extend(lock, 20) is True
    drift = 0.01 * 20 + 0.002
    assert lock.expires_at == pytest.approx(START + 5 + 20 - drift)
    assert lock.validity == pytest.approx(20 - drift)
    assert all(c.pttl("r") > 15_000 for c in clients)
    assert lock.extend(30) is True


def test_extend_of_an_expired_lock_returns_false_and_sends_nothing(
    make: Make, clients: list[Any], clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    sent = slow_network(monkeypatch, rl, clock, 0.0)
    clock.now = lock.expires_at or 0.0
    assert rl.extend(lock, 10) is False
    assert sent == []
    assert all(c.pttl("r") <= 10_000 for c in clients)


def test_strict_extend_of_an_expired_lock_raises_lock_extend_error(
    make: Make, clock: FakeClock
) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    clock.now = START + 11
    with pytest.raises(LockExtendError) as caught:
        rl.extend(lock, 10, strict=True)
    assert caught.value.resource == "r"


def test_extend_that_completes_after_the_deadline_is_false(
    make: Make, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    clock.now = START + 9.8
    slow_network(monkeypatch, rl, clock, 0.2, only=_scripts.EXTEND)
    assert rl.extend(lock, 10) is False


def test_extend_of_a_key_gone_or_taken_returns_false_and_strict_raises(
    make: Make, clients: list[Any]
) -> None:
    rl = make()
    rebuilt = Lock("r", "mine", manager=rl)
    assert rl.extend(rebuilt, 10) is False
    hold(clients, "r", "mine", [0, 1])
    hold(clients, "r", "other", [2, 3, 4])
    assert rl.extend(rebuilt, 10) is False
    with pytest.raises(LockExtendError) as caught:
        rl.extend(rebuilt, 10, strict=True)
    assert [v.vote for v in caught.value.votes] == [Vote.YES, Vote.YES] + [Vote.HELD] * 3


def test_a_released_lock_cannot_be_extended(make: Make) -> None:
    rl = make()
    lock = rl.lock("r", 10)
    assert lock is not None
    lock.release()
    assert lock.extend(10) is False


# --------------------------------------------------------------------------
# Handles rebuilt elsewhere, context managers


def test_a_lock_rebuilt_from_resource_and_value_can_extend_and_release(
    make: Make, clients: list[Any]
) -> None:
    original = make().lock("r", 5)
    assert original is not None
    other_process = make()
    rebuilt = Lock("r", original.value, manager=other_process)
    assert rebuilt.expires_at is None
    assert rebuilt.extend(60) is True
    assert all(c.pttl("r") > 50_000 for c in clients)
    remaining = rebuilt.remaining  # the deadline is known once extended here
    assert remaining is not None
    assert remaining > 50
    assert rebuilt.release() is True
    assert values(clients, "r") == [None] * N


def test_release_and_extend_by_name_and_token(make: Make, clients: list[Any]) -> None:
    lock = make().lock("r", 5, value="task-7")
    assert lock is not None
    rl = make()
    assert rl.extend("r", 60, "task-7") is True
    assert all(c.pttl("r") > 50_000 for c in clients)
    assert rl.release("r", "task-7") is True
    assert values(clients, "r") == [None] * N


def test_a_lock_without_manager_says_how_to_release_it() -> None:
    with pytest.raises(RedlockConfigError, match="manager"):
        Lock("r", "v").release()
    with pytest.raises(RedlockConfigError, match="manager"):
        Lock("r", "v").extend(10)


def test_a_lock_used_as_context_manager_releases_at_exit(make: Make, clients: list[Any]) -> None:
    lock = make().lock("r", 10)
    assert lock is not None
    with lock as held:
        assert values(clients, "r") == [held.value] * N
    assert values(clients, "r") == [None] * N


def test_locked_holds_for_the_block_and_releases_even_on_error(
    make: Make, clients: list[Any]
) -> None:
    rl = make()
    seen: list[list[str | None]] = []

    def body() -> None:
        with rl.locked("r", 10):
            seen.append(values(clients, "r"))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        body()
    assert seen[0] == [seen[0][0]] * N
    assert seen[0][0] is not None
    assert values(clients, "r") == [None] * N


def test_locked_raises_lock_not_acquired_after_wait(make: Make, clients: list[Any]) -> None:
    hold(clients, "r", "other", range(N))
    rl = make(retry_delay=0.02)
    started = time.monotonic()
    with pytest.raises(LockNotAcquired), rl.locked("r", 10, wait=0.2):
        pytest.fail("the block must not run")
    assert 0.2 <= time.monotonic() - started < 1.5
    assert values(clients, "r") == ["other"] * N


# --------------------------------------------------------------------------
# inspect, holder, force_release, fencing


def test_holder_and_inspect_report_the_quorums_token_and_ttl(
    make: Make, clients: list[Any]
) -> None:
    rl = make()
    assert rl.holder("r") is None
    lock = rl.lock("r", 10)
    assert lock is not None
    assert rl.holder("r") == lock.value
    info = rl.inspect("r")
    assert (info.resource, info.holder, info.nodes_holding) == ("r", lock.value, N)
    assert info.ttl_left is not None
    assert 9 < info.ttl_left <= 10
    assert [name for name, _, _ in info.per_node] == [n.name for n in rl.nodes]


def test_holder_is_none_when_no_token_has_a_quorum(make: Make, clients: list[Any]) -> None:
    hold(clients, "r", "a", [0, 1])
    hold(clients, "r", "b", [2, 3])
    info = make().inspect("r")
    assert info.holder is None
    assert info.nodes_holding == 2


def test_force_release_deletes_whoever_holds_and_counts_the_nodes(
    make: Make, clients: list[Any]
) -> None:
    hold(clients, "r", "a", [0, 1, 2])
    hold(clients, "r", "b", [3])
    assert make().force_release("r") == 4
    assert values(clients, "r") == [None] * N


def test_fences_strictly_increase_for_successive_holders(make: Make, clients: list[Any]) -> None:
    rl = make()
    fences = []
    for _ in range(5):
        lock = rl.lock("r", 10, fencing=True)
        assert lock is not None
        assert lock.fence is not None
        fences.append(lock.fence)
        rl.release(lock)
    assert fences == sorted(set(fences))
    assert rl.lock("r", 10).fence is None  # type: ignore[union-attr]
    assert all(c.ttl("r:fence") == -1 for c in clients)  # the counter never expires


def test_force_release_keeps_the_fence_counter(make: Make, clients: list[Any]) -> None:
    rl = make()
    first = rl.lock("r", 10, fencing=True)
    assert first is not None
    assert first.fence is not None
    rl.force_release("r")
    second = rl.lock("r", 10, fencing=True)
    assert second is not None
    assert second.fence is not None
    assert second.fence > first.fence


# --------------------------------------------------------------------------
# Logging


def majority_down(make: Make, clients: list[Any], **kwargs: Any) -> Redlock:
    rl = make(version_check=False, retry_count=0, **kwargs)
    disconnect(clients, [0, 1, 2])
    return rl


def test_default_logger_is_celery_redlocks_and_warns_on_an_outage(
    make: Make, clients: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    rl = majority_down(make, clients)
    caplog.set_level(logging.DEBUG, logger="celery_redlock")
    assert rl.lock("outage", 10) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name.startswith("celery_redlock")
    assert "'outage'" in warnings[0].getMessage()


def test_a_minority_failure_logs_debug_never_warning(
    make: Make, clients: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    rl = make(version_check=False)
    lock = rl.lock("r", 10)
    assert lock is not None
    disconnect(clients, [0, 1])
    caplog.set_level(logging.DEBUG, logger="celery_redlock")
    assert rl.release(lock) is True
    assert rl.lock("r", 10) is not None
    assert caplog.records
    assert all(r.levelno < logging.WARNING for r in caplog.records)


def test_a_logger_argument_receives_the_messages(
    make: Make, clients: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    mine = logging.getLogger("tests.redlock.mine")
    rl = majority_down(make, clients, logger=mine)
    caplog.set_level(logging.DEBUG)
    assert rl.lock("r", 10) is None
    names = {r.name for r in caplog.records}
    assert "tests.redlock.mine" in names
    assert not any(name.startswith("celery_redlock") for name in names)
    levels = {r.levelno for r in caplog.records if r.name == "tests.redlock.mine"}
    assert {logging.DEBUG, logging.WARNING} <= levels


def test_a_callable_logger_gets_formatted_warnings_only(
    make: Make, clients: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []
    rl = majority_down(make, clients, logger=got.append)
    caplog.set_level(logging.DEBUG)
    assert rl.lock("r", 10) is None
    assert len(got) == 1  # the warning; the DEBUG line about failed nodes is not passed on
    assert "could not acquire lock 'r'" in got[0]
    assert "%" not in got[0]
    assert not [r for r in caplog.records if r.name.startswith("celery_redlock")]


def test_logger_none_silences_everything(
    make: Make, clients: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    rl = majority_down(make, clients, logger=None)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LockNotAcquired):
        rl.acquire("r", 10)
    assert not [r for r in caplog.records if r.name.startswith("celery_redlock")]


# --------------------------------------------------------------------------
# Construction checks


def canned_admin(rl: Redlock, monkeypatch: pytest.MonkeyPatch, replies: list[list[Any]]) -> None:
    monkeypatch.setattr(rl._fanout, "admin_call", lambda commands, timeout: replies)


def node_facts(
    version: str = "7.0.15", role: str = "master", policy: str = "noeviction"
) -> list[Any]:
    return [
        f"# Server\r\nredis_version:{version}\r\n".encode(),
        f"# Replication\r\nrole:{role}\r\n".encode(),
        [b"maxmemory-policy", policy.encode()],
        [b"appendonly", b"yes"],
        [b"appendfsync", b"everysec"],
    ]


def test_a_node_older_than_2_6_12_is_a_server_version_error_naming_it(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    rl = make(version_check=False)
    canned_admin(rl, monkeypatch, [node_facts()] * 2 + [node_facts("2.6.11")] + [node_facts()] * 2)
    with pytest.raises(ServerVersionError) as caught:
        rl.check_servers()
    assert rl.nodes[2].name in str(caught.value)
    assert "2.6.11" in str(caught.value)
    assert isinstance(caught.value, RedlockConfigError)
    canned_admin(rl, monkeypatch, [node_facts("2.6.12")] * N)
    assert [facts["redis_version"] for facts in rl.check_servers()] == ["2.6.12"] * N


@pytest.mark.parametrize(
    ("facts", "warned"),
    [
        (node_facts(role="slave"), "slave"),
        (node_facts(policy="allkeys-lru"), "allkeys-lru"),
        (node_facts(policy="volatile-ttl"), "volatile-ttl"),
    ],
)
def test_a_replica_or_an_evicting_node_is_warned_about_once(
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    facts: list[Any],
    warned: str,
) -> None:
    rl = make(version_check=False)
    canned_admin(rl, monkeypatch, [facts] + [node_facts()] * (N - 1))
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    rl.check_servers()
    rl.check_servers()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert warned in messages[0]
    assert rl.nodes[0].name in messages[0]


def test_healthy_masters_raise_no_warning(
    make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rl = make(version_check=False)
    canned_admin(rl, monkeypatch, [node_facts()] * N)
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    rl.check_servers()
    assert caplog.records == []


@pytest.mark.parametrize("count", [1, 2, 4])
def test_fewer_than_three_or_an_even_count_of_nodes_is_warned_about(
    clients: list[Any], make: Make, caplog: pytest.LogCaptureFixture, count: int
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_redlock")
    make(clients[:count])
    assert len(caplog.records) == 1
    assert f"over {count} node" in caplog.records[0].getMessage()


def test_fewer_than_a_quorum_reachable_is_quorum_unavailable_naming_the_nodes(
    clients: list[Any],
) -> None:
    disconnect(clients, [1, 3, 4])
    with pytest.raises(QuorumUnavailable) as caught:
        Redlock(clients)
    names = [node.name for node in parse_servers(clients)]
    for i in (1, 3, 4):
        assert names[i] in str(caught.value)
    assert [v.vote for v in caught.value.votes] == [
        Vote.YES,
        Vote.ERROR,
        Vote.YES,
        Vote.ERROR,
        Vote.ERROR,
    ]


def test_a_quorum_reachable_is_enough_to_construct(clients: list[Any], make: Make) -> None:
    disconnect(clients, [3, 4])
    assert make().quorum == 3


# --------------------------------------------------------------------------
# auto_release


def test_close_releases_held_locks_when_auto_release(make: Make, clients: list[Any]) -> None:
    rl = make(auto_release=True)
    assert rl.lock("a", 30) is not None
    assert rl.lock("b", 30) is not None
    released = rl.lock("c", 30)
    assert released is not None
    released.release()
    hold(clients, "c", "next-owner", range(N))
    rl.close()
    assert values(clients, "a") == values(clients, "b") == [None] * N
    assert values(clients, "c") == ["next-owner"] * N  # the next owner's lock is untouched


def test_close_keeps_locks_without_auto_release(make: Make, clients: list[Any]) -> None:
    rl = make()
    lock = rl.lock("a", 30)
    assert lock is not None
    rl.close()
    assert values(clients, "a") == [lock.value] * N


def test_with_redlock_releases_at_exit(clients: list[Any]) -> None:
    with Redlock(clients, auto_release=True) as rl:
        lock = rl.lock("a", 30)
        assert lock is not None
        assert values(clients, "a") == [lock.value] * N
    assert values(clients, "a") == [None] * N


def test_garbage_collection_releases_when_auto_release(clients: list[Any]) -> None:
    rl = Redlock(clients, auto_release=True)
    lock = rl.lock("a", 30)
    assert lock is not None
    token, ref = lock.value, weakref.ref(rl)
    assert values(clients, "a") == [token] * N
    del rl, lock
    gc.collect()
    assert ref() is None
    assert values(clients, "a") == [None] * N


def test_garbage_collection_keeps_locks_without_auto_release(clients: list[Any]) -> None:
    rl = Redlock(clients)
    lock = rl.lock("a", 30)
    assert lock is not None
    token = lock.value
    del rl, lock
    gc.collect()
    assert values(clients, "a") == [token] * N


def join_all(threads: set[threading.Thread], within: float) -> None:
    deadline = time.monotonic() + within
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))


def _wakeup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("celery_redlock-wakeup")]


def test_close_stops_the_release_listener_threads(clients: list[Any]) -> None:
    before = set(_wakeup_threads())
    rl = Redlock(clients)
    rl.lock("a", 10, wait=0.1)
    started = set(_wakeup_threads()) - before
    assert len(started) == N
    rl.close()
    join_all(started, within=3.0)
    assert not any(t.is_alive() for t in started)


def test_garbage_collection_stops_the_release_listener_threads(clients: list[Any]) -> None:
    before = set(_wakeup_threads())
    rl = Redlock(clients)
    rl.lock("a", 10, wait=0.1)
    started = set(_wakeup_threads()) - before
    assert len(started) == N
    listener, ref = rl._listener, weakref.ref(rl)
    del rl
    gc.collect()
    assert ref() is None
    join_all(started, within=2.5)  # they poll their stop flag every second
    alive = [t for t in started if t.is_alive()]
    listener.close()  # do not leave them behind for the rest of the session
    assert not alive


def test_pack_is_what_force_release_sends(
    make: Make, clients: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """force_release sends one plain DEL of the resource's key (no prefix) to every node."""
    rl = make()
    sent: list[bytes] = []
    real = rl._fanout.call

    def spy(
        packed: bytes, fallback: Any = None, targets: Any = None, enough: Any = None
    ) -> list[Any]:
        sent.append(packed)
        return real(packed, fallback, targets, enough)

    monkeypatch.setattr(rl._fanout, "call", spy)
    rl.force_release("jobs:1")
    assert sent == [pack("DEL", "jobs:1")]


def test_a_failed_fenced_takeover_gives_the_reservation_back(
    make: Make, clients: list[Any]
) -> None:
    """With fencing too: nodes where the reservation was taken over get it back when
    the attempt fails, rather than losing it."""
    rl = make(retry_count=0)
    hold(clients, "r", "tid", [0, 1])
    hold(clients, "r", "other", [2, 3, 4])
    with pytest.raises(LockNotAcquired):
        rl.acquire("r", 10, "tid|run", fencing=True, takeover="tid")
    assert values(clients, "r") == ["tid", "tid", "other", "other", "other"]


def test_noted_times_are_only_raised_and_read_back_as_each_field_s_highest(
    make: Make, clients: list[fakeredis.FakeRedis]
) -> None:
    """raise_times keeps each field's highest time on each node; read_times merges the
    nodes' records, each field at its highest, whichever nodes missed a write."""
    rl = make()
    assert rl.raise_times("sends", {"a": 100.5, "b": 7.0}, keep=60) == N
    assert rl.raise_times("sends", {"a": 50.0}, keep=60) == N  # lower: not taken
    clients[0].hset("sends", "b", "9.25")  # a write only one node took
    clients[1].hset("sends", "c", "not a time")  # not ours: ignored
    times, answered = rl.read_times("sends")
    assert answered == N
    assert times == {"a": 100.5, "b": 9.25}
    assert 0 < clients[2].pttl("sends") <= 60_000
    with pytest.raises(ValueError, match="finite"):
        rl.raise_times("sends", {"a": math.inf}, keep=60)
    assert rl.read_times("nothing-noted") == ({}, N)
    # Fields named in forget are dropped (with or without new times).
    assert rl.raise_times("sends", {"d": 200.0}, keep=60, forget=["b"]) == N
    assert rl.read_times("sends") == ({"a": 100.5, "d": 200.0}, N)
    assert rl.raise_times("sends", {}, keep=60, forget=["a"]) == N
    assert rl.read_times("sends") == ({"d": 200.0}, N)
    assert rl.raise_times("sends", {}, keep=60) == 0  # nothing to do: nothing sent


@pytest.mark.parametrize(
    ("option", "value"), [("retry_delay", 1e10), ("node_timeout", 1e12), ("node_timeout", 86401)]
)
def test_a_wait_too_long_for_the_clocks_is_refused_at_construction(
    make: Make, option: str, value: float
) -> None:
    """A retry_delay or node_timeout the clocks it waits on cannot hold fails when
    the manager is built, naming the option, not with an OverflowError at run time."""
    with pytest.raises(RedlockConfigError, match=f"{option} must be at most"):
        make(**{option: value})
