"""Scenario 8: bad input, tried on purpose against the core.

Each gets a clear error naming the problem (a ``RedlockConfigError``, which is
also a ``ValueError``, for arguments; ``QuorumUnavailable`` / ``LockNotAcquired``
with the node's own error for servers that cannot be used), and none leaves a
key on any node. Only loopback traffic is allowed here, so an unreachable host
is a closed local port, and a host that never answers is a local listener that
never reads.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Iterator

import pytest

from celery_redlock import (
    LockNotAcquired,
    QuorumUnavailable,
    Redlock,
    RedlockConfigError,
    RedlockError,
    Vote,
)
from tests.faults.harness import Result, lock_keys, record
from tests.servers import RedisServer

SCENARIO = "8. bad input tried on purpose (resources, TTLs, servers, settings)"


def report(case: str, ok: bool, gap: str = "") -> None:
    """One bad input tried: counted under scenario 8 (the report sums the rows)."""
    notes = "each rejected with an error naming the problem, no key left" if ok else f"GAP: {gap}"
    record(Result(SCENARIO, 0, faults=1, overlaps=0, fence_violations=0, notes=notes))


@pytest.fixture
def rl(redis_urls: list[str]) -> Iterator[Redlock]:
    manager = Redlock(redis_urls, retry_count=1, logger=None)
    yield manager
    manager.close()


@pytest.fixture(autouse=True)
def no_key_left(redis_nodes: list[RedisServer], redis_urls: list[str]) -> Iterator[None]:
    """After every case: not one key on any node (fence counters included)."""
    yield
    for node in redis_nodes:
        assert node.is_running()
        assert lock_keys(node) == [], node_keys(node)


def node_keys(node: RedisServer) -> list[bytes]:
    with node.client() as client:
        return list(client.keys("*"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------
# Resources, TTLs, tokens, settings


@pytest.mark.parametrize("resource", [b"res", 1, None, "", 1.5, ["res"], object()], ids=repr)
def test_a_resource_that_is_not_a_str_is_refused(rl: Redlock, resource: object) -> None:
    """A resource that is not a non-empty str: RedlockConfigError naming it."""
    with pytest.raises(RedlockConfigError, match="resource must be a non-empty str") as caught:
        rl.acquire(resource, 10)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    report(f"resource {resource!r}", True)


@pytest.mark.parametrize(
    "ttl", [0, -1, math.nan, math.inf, -math.inf, "10", None, True, 0.0004], ids=repr
)
def test_a_bad_ttl_is_refused(rl: Redlock, ttl: object) -> None:
    """ttl 0, -1, NaN, inf, a string, None, a bool, under 1 ms: RedlockConfigError naming ttl."""
    with pytest.raises(RedlockConfigError, match="ttl") as caught:
        rl.acquire("res", ttl)  # type: ignore[arg-type]
    assert repr(ttl) in str(caught.value) or "0.001" in str(caught.value)
    with pytest.raises(RedlockConfigError, match="ttl"):
        rl.lock("res", ttl)  # type: ignore[arg-type]
    report(f"ttl {ttl!r}", True)


def test_a_ttl_too_large_for_redis_is_refused(rl: Redlock) -> None:
    """ttl 1e17 s (beyond Redis' PX range): RedlockConfigError naming ttl."""
    error: RedlockError | None = None
    try:
        rl.release(rl.acquire("res", 1e17))
    except RedlockError as exc:
        error = exc
    ok = isinstance(error, RedlockConfigError) and "ttl" in str(error)
    report("ttl 1e17", ok, "a ttl beyond Redis' PX range reaches the nodes")
    assert ok, str(error)


@pytest.mark.parametrize("field", ["resource", "value"])
def test_a_str_that_is_not_utf8_is_refused(rl: Redlock, field: str) -> None:
    """A resource or token with a lone surrogate: RedlockConfigError naming it."""
    kwargs = {"resource": "res", "value": None, field: "bad-\ud800"}
    try:
        rl.acquire(kwargs["resource"], 10, kwargs["value"])  # type: ignore[arg-type]
        error: Exception | None = None
    except Exception as exc:
        error = exc
    ok = isinstance(error, RedlockConfigError) and field in str(error)
    report(f"{field} with a lone surrogate", ok, f"a non-UTF-8 {field} raises UnicodeEncodeError")
    assert ok, repr(error)


@pytest.mark.parametrize("value", ["", 123, b"tok"], ids=repr)
def test_a_bad_token_is_refused(rl: Redlock, value: object) -> None:
    """A caller-chosen token that is not a non-empty str: RedlockConfigError."""
    with pytest.raises(RedlockConfigError, match="value"):
        rl.acquire("res", 10, value)  # type: ignore[arg-type]
    report(f"value {value!r}", True)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("retry_count", -1),
        ("retry_count", "3"),
        ("retry_count", 2.5),
        ("retry_delay", -0.1),
        ("retry_delay", math.nan),
        ("drift_factor", 0.5),
        ("drift_factor", -0.01),
        ("node_timeout", 0),
        ("node_timeout", math.inf),
    ],
    ids=lambda v: repr(v),
)
def test_a_bad_setting_is_refused(redis_urls: list[str], setting: str, value: object) -> None:
    """A bad manager setting: RedlockConfigError naming the setting, at construction."""
    with pytest.raises(RedlockConfigError, match=setting):
        Redlock(redis_urls, **{setting: value})  # type: ignore[arg-type]
    report(f"{setting}={value!r}", True)


@pytest.mark.parametrize("wait", [-1, math.nan, "5"], ids=repr)
def test_a_bad_wait_is_refused(rl: Redlock, wait: object) -> None:
    with pytest.raises(RedlockConfigError, match="wait"):
        rl.acquire("res", 10, wait=wait)  # type: ignore[arg-type]
    report(f"wait={wait!r}", True)


# --------------------------------------------------------------------------
# Server lists


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("redis//127.0.0.1:7000", "redis//127.0.0.1:7000"),
        ("127.0.0.1:port:x", "127.0.0.1:port:x"),
        ("127.0.0.1:99999", "99999"),
        ("http://127.0.0.1:7000", "http"),
        ("redis://:s3cret@", "redis://***@"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_a_server_spec_with_a_typo_is_refused(spec: str, named: str) -> None:
    """A typo in a server spec: RedlockConfigError naming the spec (never its password)."""
    with pytest.raises(RedlockConfigError) as caught:
        Redlock(["127.0.0.1:1", spec, "127.0.0.1:2"])
    assert named in str(caught.value)
    assert "s3cret" not in str(caught.value)
    report(f"server {spec!r}", True)


@pytest.mark.parametrize("servers", [[], None, 42, [None]], ids=repr)
def test_an_empty_or_odd_server_list_is_refused(servers: object) -> None:
    with pytest.raises(RedlockConfigError, match="server"):
        Redlock(servers)
    report(f"servers={servers!r}", True)


def test_a_server_listed_twice_is_refused(redis_nodes: list[RedisServer]) -> None:
    """The same node twice (as "host:port" and as a URL): RedlockConfigError naming it."""
    node = redis_nodes[0]
    with pytest.raises(RedlockConfigError, match="listed twice") as caught:
        Redlock([f"127.0.0.1:{node.port}", redis_nodes[1].url, node.url])
    assert str(node.port) in str(caught.value)
    report("duplicate server", True)


def test_the_same_server_under_two_names_is_refused(redis_nodes: list[RedisServer]) -> None:
    """The same node as localhost:P and 127.0.0.1:P: RedlockConfigError at construction."""
    port = redis_nodes[0].port
    try:
        Redlock([f"localhost:{port}", f"127.0.0.1:{port}", redis_nodes[1].url], logger=None)
        ok = False
    except RedlockConfigError:
        ok = True
    report("same server under two names", ok, "the same server under two names is accepted")
    assert ok


# --------------------------------------------------------------------------
# Servers that cannot be used


def test_an_unreachable_server_is_named(redis_urls: list[str]) -> None:
    """Closed ports: construction says which nodes refused; without the construction
    check, the lock fails at once naming each node and its error."""
    urls = [f"redis://:s3cret@127.0.0.1:{closed_port()}/0" for _ in range(3)]
    started = time.monotonic()
    with pytest.raises(QuorumUnavailable) as caught:
        Redlock(urls)
    assert time.monotonic() - started < 1.0
    message = str(caught.value)
    assert all(u.split("@")[1].rstrip("/0") in message for u in urls), message
    assert "refused" in message.lower()
    assert "s3cret" not in message
    rl = Redlock(urls, version_check=False, retry_count=2, retry_delay=0.01, logger=None)
    with pytest.raises(LockNotAcquired) as lock_error:
        rl.acquire("res", 10)
    rl.close()
    assert lock_error.value.unavailable
    assert "s3cret" not in str(lock_error.value)
    assert all(v.vote is Vote.ERROR for v in lock_error.value.votes)
    report("closed ports", True)


def test_one_unreachable_server_of_five_still_locks(redis_urls: list[str]) -> None:
    """One node on a closed port: construction succeeds (4 of 5 answer), locks work."""
    urls = [*redis_urls[:4], f"127.0.0.1:{closed_port()}"]
    rl = Redlock(urls, retry_count=1, logger=None)
    lock = rl.acquire("res", 10, fencing=True)
    assert lock.release()
    rl.close()
    report("one closed port of five", True)


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A local port that accepts connections and never answers (a hung host)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_a_server_that_never_answers_times_out_quickly(
    redis_urls: list[str], silent_listener: str
) -> None:
    """A node that accepts but never answers: its vote is a timeout after node_timeout."""
    rl = Redlock(
        [silent_listener, *redis_urls[:2]],
        node_timeout=0.05,
        retry_count=1,
        version_check=False,
        logger=None,
    )
    started = time.monotonic()
    lock = rl.acquire("res", 10)
    took = time.monotonic() - started
    assert lock.release()
    rl.close()
    assert took < 0.05 + 0.3  # one node timeout, plus a busy machine's noise
    report("a node that never answers", True)


def test_tls_to_a_plain_port_is_named(redis_nodes: list[RedisServer]) -> None:
    """rediss:// to a plain Redis port: construction fails naming the node as TLS."""
    url = redis_nodes[0].url.replace("redis://", "rediss://")
    with pytest.raises(QuorumUnavailable) as caught:
        Redlock([url], node_timeout=0.1)
    message = str(caught.value)
    assert f"rediss://127.0.0.1:{redis_nodes[0].port}" in message
    report("TLS to a plain port", True)


def test_tls_to_a_plain_port_says_tls(redis_nodes: list[RedisServer]) -> None:
    """rediss:// to a plain port: the error says the TLS handshake failed."""
    url = redis_nodes[0].url.replace("redis://", "rediss://")
    rl = Redlock([url], node_timeout=0.1, version_check=False, retry_count=1, logger=None)
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("res", 10)
    rl.close()
    ok = bool(re.search(r"tls|ssl|handshake|connect", str(caught.value), re.I))
    report("TLS to a plain port, detail", ok, "a TLS mismatch reads as 'no reply'")
    assert ok, str(caught.value)
