"""Server specs, node names, RESP encoding and decoding, the fan-out, and the Lua
scripts, against fakeredis."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest
import redis
from redis.exceptions import NoScriptError, ResponseError

from celery_redlock import NodeVote, RedlockConfigError, Vote, _nodes, _scripts
from celery_redlock._nodes import (
    Fanout,
    Node,
    classify,
    pack,
    pack_args,
    parse_server,
    parse_servers,
    redact,
)

SECRET = "s3cretPW"


def kwargs_of(node: Node) -> dict[str, Any]:
    return dict(node.connection_kwargs)


# --------------------------------------------------------------------------
# Parsing specs


@pytest.mark.parametrize(
    ("spec", "name", "expected"),
    [
        (
            "redis://user:pw@h:1/2",
            "h:1/2",
            {"host": "h", "port": 1, "db": 2, "username": "user", "password": "pw"},
        ),
        ("redis://h:7001/0", "h:7001", {"host": "h", "port": 7001}),
        ("redis://h", "h:6379", {"host": "h"}),
        ("rediss://:pw@h:6380/0", "rediss://h:6380", {"host": "h", "port": 6380, "password": "pw"}),
        (
            "unix:///tmp/redis.sock?db=1",
            "unix:/tmp/redis.sock/1",
            {"path": "/tmp/redis.sock", "db": 1},
        ),
        ("unix:///tmp/redis.sock", "unix:/tmp/redis.sock", {"path": "/tmp/redis.sock"}),
        ("10.0.0.5:7000", "10.0.0.5:7000", {"host": "10.0.0.5", "port": 7000, "db": 0}),
        ("myhost", "myhost:6379", {"host": "myhost", "port": 6379}),
        ("[::1]:7000", "[::1]:7000", {"host": "::1", "port": 7000}),
        ("[::1]", "[::1]:6379", {"host": "::1", "port": 6379}),
        ("redis://[::1]:7001/3", "[::1]:7001/3", {"host": "::1", "port": 7001, "db": 3}),
        ("  h:5  ", "h:5", {"host": "h", "port": 5}),
    ],
)
def test_string_specs_parse_to_named_nodes(spec: str, name: str, expected: dict[str, Any]) -> None:
    node = parse_server(spec)
    assert node.name == name
    kwargs = kwargs_of(node)
    for key, value in expected.items():
        assert kwargs.get(key) == value, key


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("redis://h:1/0", redis.Connection),
        ("h:1", redis.Connection),
        ("rediss://h:1/0", redis.SSLConnection),
        ("unix:///tmp/s.sock", redis.UnixDomainSocketConnection),
    ],
)
def test_each_scheme_gets_its_connection_class(spec: str, cls: type) -> None:
    assert parse_server(spec).connection_class is cls


def test_a_redis_client_is_taken_with_its_settings() -> None:
    client = redis.Redis(host="rh", port=9, db=4, username="u", password=SECRET)
    node = parse_server(client)
    assert node.name == "rh:9/4"
    assert kwargs_of(node)["password"] == SECRET
    assert kwargs_of(node)["username"] == "u"
    assert SECRET not in repr(node)


def test_a_unix_and_a_tls_client_are_named_by_path_and_scheme() -> None:
    assert parse_server(redis.Redis(unix_socket_path="/tmp/s.sock")).name == "unix:/tmp/s.sock"
    assert parse_server(redis.Redis(host="t", port=2, ssl=True)).name == "rediss://t:2"


def test_a_fakeredis_client_is_a_node_of_its_own() -> None:
    clients = [fakeredis.FakeRedis(server=fakeredis.FakeServer()) for _ in range(3)]
    nodes = parse_servers(clients)
    assert len({node.name for node in nodes}) == 3


def test_one_spec_alone_is_a_list_of_one() -> None:
    assert [n.name for n in parse_servers("h:1")] == ["h:1"]
    assert [n.name for n in parse_servers(redis.Redis(host="h", port=2))] == ["h:2"]
    assert [n.name for n in parse_servers(iter(["a:1", "b:2"]))] == ["a:1", "b:2"]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (f"redis://u:{SECRET}@h:notaport/0", "notaport"),
        (f"redis://:{SECRET}@h:99999/0", "99999"),
        (f"http://u:{SECRET}@h:1", "http"),
        (f"redis://:{SECRET}@/0", "redis://***@/0"),
        (f"unix://:{SECRET}@", "unix://"),
        ("h:1:2", "h:1:2"),
        ("h:0", "h:0"),
        ("h:70000", "h:70000"),
        ("ho st:1", "ho st:1"),
    ],
)
def test_unparsable_spec_is_named_without_its_password(spec: str, named: str) -> None:
    with pytest.raises(RedlockConfigError) as caught:
        parse_server(spec)
    assert named in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_password_holding_an_at_sign_is_redacted_whole() -> None:
    """redis-py reads 'pa@ss3cretPW' as the password of this URL; none of it may be shown."""
    with pytest.raises(RedlockConfigError) as caught:
        parse_server(f"redis://:pa@s{SECRET}@h:notaport/0")
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("spec", [5, 1.5, b"h:1", object(), ""])
def test_a_spec_of_the_wrong_type_or_empty_is_refused(spec: object) -> None:
    with pytest.raises(RedlockConfigError):
        parse_server(spec)


@pytest.mark.parametrize("servers", [None, [], (), 5, iter([])])
def test_no_servers_is_a_config_error(servers: object) -> None:
    with pytest.raises(RedlockConfigError):
        parse_servers(servers)


@pytest.mark.parametrize(
    "servers",
    [
        ["h:1", "h:1"],
        ["h:1", "redis://h:1/0"],
        ["redis://h:1", redis.Redis(host="h", port=1)],
        ["unix:///tmp/a.sock", "unix:///tmp/a.sock?db=0"],
        ["a:1", "b:2", "redis://:pw@b:2/0"],
    ],
)
def test_the_same_server_twice_is_refused(servers: list[object]) -> None:
    with pytest.raises(RedlockConfigError, match="twice"):
        parse_servers(servers)


def test_a_server_named_with_and_without_its_default_port_is_one_node() -> None:
    """ "redis://h" is port 6379: listed again as "redis://h:6379/1" it would count
    as two of the votes."""
    with pytest.raises(RedlockConfigError, match="listed twice"):
        parse_servers(["redis://h/0", "redis://h:6379/1", "redis://x"])


def test_different_ports_or_hosts_are_different_nodes() -> None:
    assert len(parse_servers(["h:1", "h:2", "g:1"])) == 3


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("redis://user:pw@h:1/0", "redis://***@h:1/0"),
        ("rediss://:pw@h:1", "rediss://***@h:1"),
        ("unix://:pw@/tmp/s.sock", "unix://***@/tmp/s.sock"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("h:1", "h:1"),
        ("redis://h:1/0?password=pw&db=2", "redis://h:1/0?password=***&db=2"),
    ],
)
def test_redact_hides_credentials_in_urls(text: str, redacted: str) -> None:
    assert redact(text) == redacted


# --------------------------------------------------------------------------
# RESP


def test_pack_encodes_a_command_in_resp() -> None:
    assert pack("SET", b"k", 10) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n10\r\n"
    assert pack_args("é") == b"$2\r\n\xc3\xa9\r\n"


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (b":42\r\n", 42),
        (b"$3\r\nabc\r\n", b"abc"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"+OK\r\n", b"OK"),
        (b"*2\r\n$1\r\na\r\n:-2\r\n", [b"a", -2]),
        (b"*-1\r\n", None),
        (b"_\r\n", None),
        (b"#t\r\n", True),
        (b",1.5\r\n", 1.5),
        (b"(12345678901234567890\r\n", 12345678901234567890),
        (b"=8\r\ntxt:abcd\r\n", b"abcd"),
        (b"%1\r\n+k\r\n:1\r\n", {b"k": 1}),
        (b"~1\r\n:7\r\n", [7]),
    ],
)
def test_replies_are_parsed_from_resp2_and_resp3(wire: bytes, value: object) -> None:
    parsed, end = _nodes._parse(wire + b"+next\r\n", 0)
    assert parsed == value
    assert end == len(wire)


def test_error_replies_become_exceptions_and_noscript_is_told_apart() -> None:
    error, _ = _nodes._parse(b"-ERR wrong\r\n", 0)
    assert type(error) is ResponseError
    assert str(error) == "ERR wrong"
    noscript, _ = _nodes._parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert type(noscript) is NoScriptError
    blob, _ = _nodes._parse(b"!5\r\nERR x\r\n", 0)
    assert type(blob) is ResponseError


@pytest.mark.parametrize("wire", [b"", b":4", b"$3\r\nab", b"*2\r\n:1\r\n", b"$3\r\nabc\r"])
def test_a_reply_cut_short_asks_for_more(wire: bytes) -> None:
    with pytest.raises(_nodes._Incomplete):
        _nodes._parse(wire, 0)


# --------------------------------------------------------------------------
# Votes


@pytest.mark.parametrize(
    ("reply", "yes", "vote"),
    [
        (1, True, Vote.YES),
        (0, False, Vote.HELD),
        (redis.TimeoutError("slow"), False, Vote.TIMEOUT),
        (TimeoutError("slow"), False, Vote.TIMEOUT),
        (redis.ConnectionError("refused"), False, Vote.ERROR),
        (ResponseError("OOM"), False, Vote.ERROR),
    ],
)
def test_classify_turns_a_reply_into_a_vote(reply: object, yes: bool, vote: Vote) -> None:
    node = parse_server("h:1")
    result = classify(node, reply, yes)
    assert isinstance(result, NodeVote)
    assert (result.node, result.vote) == ("h:1", vote)


def test_classify_redacts_urls_in_error_details() -> None:
    vote = classify(parse_server("h:1"), redis.ConnectionError(f"to redis://u:{SECRET}@h:1"), False)
    assert SECRET not in vote.detail
    assert "ConnectionError" in vote.detail


# --------------------------------------------------------------------------
# The fan-out over fakeredis


@pytest.fixture
def fakes() -> list[fakeredis.FakeRedis]:
    return [fakeredis.FakeRedis(server=fakeredis.FakeServer()) for _ in range(3)]


@pytest.fixture
def fanout(fakes: list[fakeredis.FakeRedis]) -> Fanout:
    return Fanout(parse_servers(fakes), 0.5)


def test_call_returns_one_reply_per_node_in_order(
    fanout: Fanout, fakes: list[fakeredis.FakeRedis]
) -> None:
    fakes[1].set("k", "one")
    assert fanout.call(pack("GET", "k")) == [None, b"one", None]


def test_call_sends_only_to_targets(fanout: Fanout, fakes: list[fakeredis.FakeRedis]) -> None:
    assert fanout.call(pack("SET", "k", "v"), targets=[0, 2]) == [b"OK", None, b"OK"]
    assert [c.get("k") for c in fakes] == [b"v", None, b"v"]


def test_noscript_is_answered_by_a_full_eval(
    fanout: Fanout, fakes: list[fakeredis.FakeRedis]
) -> None:
    """After SCRIPT FLUSH on a node, the call still runs the script there."""
    assert fanout.script(_scripts.ACQUIRE, (b"k",), ("tok", 1000)) == [1, 1, 1]
    fakes[0].script_flush()
    fakes[2].script_flush()
    assert fanout.script(_scripts.RELEASE, (b"k",), ("tok",)) == [1, 1, 1]
    assert [c.exists("k") for c in fakes] == [0, 0, 0]


def test_a_node_error_is_a_reply_not_an_exception(fakes: list[fakeredis.FakeRedis]) -> None:
    fakes[1].connection_pool.connection_kwargs["server"].connected = False
    fanout = Fanout(parse_servers(fakes), 0.5)
    replies = fanout.call(pack("PING"))
    assert replies[0] == replies[2] == b"PONG"
    assert isinstance(replies[1], redis.ConnectionError)


def test_a_failed_node_is_skipped_for_the_cooldown_then_tried_again(
    fakes: list[fakeredis.FakeRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(_nodes, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    server = fakes[0].connection_pool.connection_kwargs["server"]
    fanout = Fanout(parse_servers(fakes), 0.5)
    server.connected = False
    assert isinstance(fanout.call(pack("PING"))[0], redis.ConnectionError)
    server.connected = True
    now[0] += _nodes.NODE_COOLDOWN / 2
    skipped = fanout.call(pack("PING"))[0]
    assert isinstance(skipped, redis.ConnectionError)
    assert "skipped" in str(skipped)
    now[0] += _nodes.NODE_COOLDOWN
    assert fanout.call(pack("PING")) == [b"PONG"] * 3


def test_admin_call_returns_one_reply_per_command_per_node(
    fanout: Fanout, fakes: list[fakeredis.FakeRedis]
) -> None:
    fakes[2].set("k", "v")
    replies = fanout.admin_call([pack("PING"), pack("GET", "k")], 1.0)
    assert replies == [[b"PONG", None], [b"PONG", None], [b"PONG", b"v"]]


def test_connections_are_reused_between_calls(fanout: Fanout) -> None:
    fanout.call(pack("PING"))
    idle = fanout._idle[0]
    fanout.call(pack("PING"))
    assert fanout._idle == [idle]
    fanout.close()
    assert fanout._idle == []


def test_a_forked_child_forgets_the_parents_idle_connections(fanout: Fanout) -> None:
    fanout.call(pack("PING"))
    assert fanout._idle
    _nodes._after_fork_in_child()
    assert fanout._idle == []


# --------------------------------------------------------------------------
# The Lua scripts, run as EVAL on fakeredis


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def run(r: fakeredis.FakeRedis, script: _scripts.Script, keys: list[str], *args: str | int) -> Any:
    return r.eval(script.source.decode(), len(keys), *keys, *args)


def test_script_sha_is_the_sha1_of_its_source_and_evalsha_finds_it(
    r: fakeredis.FakeRedis,
) -> None:
    for script in (_scripts.ACQUIRE, _scripts.RELEASE, _scripts.EXTEND, _scripts.INSPECT):
        assert script.sha == hashlib.sha1(script.source).hexdigest().encode()
        assert r.script_load(script.source) == script.sha.decode()
    # EVALSHA sha numkeys key arg: 5 parts; the key and the argument follow the head
    head = _scripts.RELEASE.evalsha_head(1, 1)
    assert head == b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n" + _scripts.RELEASE.sha + b"\r\n$1\r\n1\r\n"


def test_acquire_sets_a_free_key_rearms_its_own_and_refuses_another(
    r: fakeredis.FakeRedis,
) -> None:
    assert run(r, _scripts.ACQUIRE, ["k"], "me", 1000) == 1
    assert r.get("k") == b"me"
    assert 0 < r.pttl("k") <= 1000
    assert run(r, _scripts.ACQUIRE, ["k"], "me", 50_000) == 3  # re-armed, not set
    assert r.pttl("k") > 1000
    assert run(r, _scripts.ACQUIRE, ["k"], "you", 1000) == 0
    assert r.get("k") == b"me"


def test_acquire_fenced_returns_granted_counter_and_clock_also_when_held(
    r: fakeredis.FakeRedis,
) -> None:
    before = int(time.time() * 1_000_000)
    granted, counter, clock = run(r, _scripts.ACQUIRE_FENCED, ["k", "k:fence"], "me", 1000)
    assert (granted, counter) == (1, 0)
    assert before - 1_000_000 <= clock <= int(time.time() * 1_000_000) + 1_000_000
    r.set("k:fence", 7)
    assert run(r, _scripts.ACQUIRE_FENCED, ["k", "k:fence"], "me", 1000)[:2] == [3, 7]
    # held by another token: not granted, but the counter is still reported
    assert run(r, _scripts.ACQUIRE_FENCED, ["k", "k:fence"], "you", 1000)[:2] == [0, 7]
    assert r.get("k") == b"me"


def test_fence_write_raises_never_lowers_and_needs_the_lock(r: fakeredis.FakeRedis) -> None:
    r.set("k", "me")
    assert run(r, _scripts.FENCE_WRITE, ["k", "k:fence"], "me", 5) == 1
    assert r.get("k:fence") == b"5"
    assert run(r, _scripts.FENCE_WRITE, ["k", "k:fence"], "me", 3) == 1
    assert r.get("k:fence") == b"5"
    assert run(r, _scripts.FENCE_WRITE, ["k", "k:fence"], "you", 9) == 0
    assert r.get("k:fence") == b"5"
    assert r.ttl("k:fence") == -1


def test_release_deletes_only_the_owners_key_and_announces_it_on_the_key_s_channel(
    r: fakeredis.FakeRedis,
) -> None:
    pubsub = r.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe("celery_redlock:released:k")
    r.set("k", "me")
    r.set("other", "me")
    assert run(r, _scripts.RELEASE, ["k"], "you") == 0
    assert r.get("k") == b"me"
    assert run(r, _scripts.RELEASE, ["k"], "me") == 1
    assert r.exists("k") == 0
    assert run(r, _scripts.RELEASE, ["k"], "me") == 0
    assert run(r, _scripts.RELEASE, ["other"], "me") == 1  # announced on its own channel
    got = [pubsub.get_message(timeout=0.05) for _ in range(5)]  # the first eats the subscribe
    messages = [(m["channel"], m["data"]) for m in got if m is not None]
    # One announcement: only the delete that happened, and only on the key's channel.
    assert messages == [(b"celery_redlock:released:k", b"k")]


def test_extend_rearms_only_the_owners_key(r: fakeredis.FakeRedis) -> None:
    r.set("k", "me", px=1000)
    assert run(r, _scripts.EXTEND, ["k"], "you", 60_000) == 0
    assert r.pttl("k") <= 1000
    assert run(r, _scripts.EXTEND, ["k"], "me", 60_000) == 1
    assert r.pttl("k") > 1000
    assert run(r, _scripts.EXTEND, ["gone"], "me", 60_000) == 0
    assert r.exists("gone") == 0


def test_inspect_returns_token_and_pttl(r: fakeredis.FakeRedis) -> None:
    assert run(r, _scripts.INSPECT, ["k"]) == [None, -2]
    r.set("k", "me")
    assert run(r, _scripts.INSPECT, ["k"]) == [b"me", -1]
    r.pexpire("k", 5000)
    token, pttl = run(r, _scripts.INSPECT, ["k"])
    assert token == b"me"
    assert 0 < pttl <= 5000


def test_ready_never_waits_on_a_socket_with_a_python_timeout() -> None:
    """Where the kernel timeouts are not used (a Python timeout on the socket), ready()
    must not block in recv: it answers at once, and sees data that came."""
    import socket as socket_mod

    from celery_redlock._nodes import _Wire

    a, b = socket_mod.socketpair()
    try:
        a.settimeout(0.5)
        wire = _Wire.__new__(_Wire)
        wire.sock, wire.raw, wire.buf, wire.conn, wire.used = a, True, b"", object(), False
        wire.kernel_timed = False  # as connect() leaves a socket under a Python timeout
        started = time.monotonic()
        assert not wire.ready()
        assert time.monotonic() - started < 0.1
        b.sendall(b"+OK\r\n")
        assert wait_until(wire.ready)
        assert wire.read() == b"OK"
    finally:
        a.close()
        b.close()


def wait_until(check: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("python_timeout", [None, 0.5])
def test_owed_ready_waits_for_every_reply_owed_not_only_the_first(
    python_timeout: float | None,
) -> None:
    """A connection may owe a plain command's reply and then a script's (a release
    sent behind an unread acquire): the next call may send only once both can be
    read, or it would block on the second without its deadline."""
    import socket as socket_mod

    from celery_redlock._nodes import _Wire

    a, b = socket_mod.socketpair()
    try:
        a.settimeout(python_timeout)
        wire = _Wire.__new__(_Wire)
        wire.sock, wire.raw, wire.buf, wire.conn, wire.used = a, True, b"", object(), False
        wire.kernel_timed = python_timeout is None  # as connect() sets it
        wire.owed = [None, lambda: b"EVAL"]
        assert not wire.owed_ready()
        b.sendall(b"+OK\r\n")  # the acquire's reply alone
        assert not wait_until(wire.owed_ready, timeout=0.2)
        assert wire.ready()  # a reply is there: ready() alone would let the call send
        b.sendall(b":1")  # the release's reply, cut short
        assert not wait_until(wire.owed_ready, timeout=0.2)
        b.sendall(b"\r\n")
        assert wait_until(wire.owed_ready)
        assert wire.settle() == []
        assert (wire.owed, wire.buf) == ([], b"")
        wire.owed = [None]
        b.close()  # closed: ready, so that read() meets the end and reports it
        assert wire.owed_ready()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("python_timeout", [None, 0.5])
def test_waiting_for_an_owed_reply_works_on_a_descriptor_above_1023(
    python_timeout: float | None,
) -> None:
    """A worker with many files open: a connection's descriptor is 1024 or more,
    where select() fails; the wait for a reply an earlier call left unread does not."""
    import os
    import resource
    import socket as socket_mod
    import threading

    from celery_redlock._nodes import _wait_ready, _Wire

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1100:
        pytest.skip(f"this process may open {hard} files, fewer than 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        a, b = socket_mod.socketpair()
    finally:
        for fd in fillers:
            os.close(fd)
    try:
        assert a.fileno() >= 1024
        a.settimeout(python_timeout)
        wire = _Wire.__new__(_Wire)
        wire.sock, wire.raw, wire.buf, wire.conn, wire.used = a, True, b"", object(), False
        wire.kernel_timed = python_timeout is None  # as connect() sets it
        wire.owed = [lambda: b"EVAL"]
        assert not wire.owed_ready()
        threading.Timer(0.1, b.sendall, (b":1\r\n",)).start()
        assert _wait_ready(wire, time.monotonic() + 5.0)
        assert wire.settle() == []
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(
    ("given", "taken"),
    [("CERT_REQUIRED", "required"), ("cert_none", "none"), ("optional", "optional")],
)
def test_kombu_s_ssl_cert_reqs_spelling_is_taken_as_redis_py_s(given: str, taken: str) -> None:
    """A broker URL as Celery's docs write it (``?ssl_cert_reqs=CERT_REQUIRED``), taken as
    the lock server when redlock_servers is unset, must connect, not fail every time."""
    node = parse_server(f"rediss://:pw@h:6380/0?ssl_cert_reqs={given}")
    assert kwargs_of(node)["ssl_cert_reqs"] == taken


def test_an_unknown_ssl_cert_reqs_is_refused_naming_it() -> None:
    with pytest.raises(RedlockConfigError, match="ssl_cert_reqs='CERT_MAYBE'"):
        parse_server("rediss://:pw@h:6380/0?ssl_cert_reqs=CERT_MAYBE")


def test_only_the_standard_library_s_own_socket_counts_as_plain() -> None:
    """Kernel timeouts and MSG_DONTWAIT reads are for it alone: not TLS, and not the
    sockets gevent and eventlet put in its place when they monkey-patch."""
    import socket
    import ssl

    with socket.socket() as plain, socket.socket(socket.AF_UNIX) as unix:
        assert _nodes._plain_socket(plain)
        assert _nodes._plain_socket(unix)
        wrapped = ssl.create_default_context().wrap_socket(
            socket.socket(), server_hostname="localhost", do_handshake_on_connect=False
        )
        with wrapped:
            assert not _nodes._plain_socket(wrapped)
    for green in ("gevent.socket", "eventlet.green.socket"):
        if importlib.util.find_spec(green.split(".")[0]) is None:  # not imported here
            pytest.skip(f"{green} is not installed")
        # In a process of its own: importing eventlet hooks every later fork.
        check = (
            f"import {green} as green\n"
            "from celery_redlock._nodes import _plain_socket\n"
            "with green.socket() as sock:\n"
            "    print(type(sock).__module__, _plain_socket(sock))\n"
        )
        done = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", check],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        module, plain = done.stdout.split()
        assert module.startswith(green.split(".")[0]), module
        assert plain == "False"


class PairConnection:
    """A connection (as redis-py's classes are built) over a socketpair whose peer
    answers the scripts a new connection loads, then nothing more."""

    def __init__(self, **kwargs: object) -> None:
        self._sock: Any = None
        self.peer: Any = None

    def connect(self) -> None:
        import socket as socket_mod

        self._sock, self.peer = socket_mod.socketpair()
        self.peer.sendall(b"+OK\r\n" * len(_nodes._PRELOADED))

    def disconnect(self) -> None:
        for sock in (self._sock, self.peer):
            if sock is not None:
                sock.close()


def test_a_timeout_under_a_microsecond_still_times_out() -> None:
    """A timeval of (0, 0) is no timeout at all: a node that never answers would
    hold the call for ever."""
    import struct
    import threading

    node = Node("pair:1", PairConnection, ())  # type: ignore[arg-type]
    fanout = Fanout([node], 5e-7)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.extend(fanout.call(pack("PING"))), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the call hangs"
    assert isinstance(got[0], redis.TimeoutError), got
    assert _nodes._timeval(5e-7) == struct.pack("ll", 0, 1)
    assert _nodes._timeval(0.0) == struct.pack("ll", 0, 1)
    assert _nodes._timeval(2.5) == struct.pack("ll", 2, 500_000)


def test_nodes_refusing_connections_are_reported_with_their_own_error() -> None:
    """Opened together, each refused connection's reply is its own error, not
    "skipped for up to 1.0s after: ..." (that is for later calls, while cooling)."""
    import socket as socket_mod

    ports = []
    for _ in range(2):
        with socket_mod.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])  # closed: nothing listens there
    fanout = Fanout(parse_servers([f"127.0.0.1:{port}" for port in ports]), 0.5)
    for replies in (
        fanout.call(pack("PING")),
        [r[0] for r in fanout.admin_call([pack("PING")], 0.5)],
    ):
        for reply in replies:
            assert isinstance(reply, redis.ConnectionError), replies
            assert "skipped" not in str(reply)
            assert "refused" in str(reply).lower()
    cooling = fanout.call(pack("PING"))
    assert all("skipped for up to" in str(r) and "refused" in str(r).lower() for r in cooling)
