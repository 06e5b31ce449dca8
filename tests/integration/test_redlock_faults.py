"""Nodes killed (SIGKILL) or paused (SIGSTOP) under a live Redlock: a minority
down changes nothing, a majority down fails fast and names the nodes, and
locking resumes when they come back."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_redlock import Lock, LockNotAcquired, Redlock, Vote, _nodes, _resend, _scripts
from tests.servers import RedisServer

N = 5
NODE_TIMEOUT = 0.1
RETRY_COUNT = 3
RETRY_DELAY = 0.2
MARGIN = 0.3
FreshNodes = Callable[..., list[RedisServer]]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def nodes(fresh_nodes: FreshNodes) -> list[RedisServer]:
    return fresh_nodes(N)


@pytest.fixture
def manager(nodes: list[RedisServer]) -> Iterator[Callable[..., Redlock]]:
    made: list[Redlock] = []

    def make(**kwargs: Any) -> Redlock:
        kwargs.setdefault("node_timeout", NODE_TIMEOUT)
        kwargs.setdefault("retry_count", RETRY_COUNT)
        kwargs.setdefault("retry_delay", RETRY_DELAY)
        rl = Redlock([node.url for node in nodes], **kwargs)
        rl.release(rl.acquire("warm-up", 1))  # connections open, as in a running process
        made.append(rl)
        return rl

    yield make
    for rl in made:
        rl.close()


def name(node: RedisServer) -> str:
    return f"127.0.0.1:{node.port}"


def timed_cycles(rl: Redlock, seconds: float) -> list[float]:
    """Lock and release for ``seconds``; each acquire's duration. Fails on a refusal."""
    durations = []
    until = time.monotonic() + seconds
    n = 0
    while time.monotonic() < until:
        n += 1
        started = time.monotonic()
        lock = rl.lock(f"cycle-{n}", 10)
        durations.append(time.monotonic() - started)
        assert lock is not None, f"cycle {n} refused"
        rl.release(lock)
        time.sleep(0.05)
    return durations


# --------------------------------------------------------------------------
# A minority down


def test_a_minority_killed_leaves_locking_working(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    rl = manager()
    nodes[0].kill()
    nodes[3].kill()
    for n in range(20):
        lock = rl.acquire(f"k{n}", 10)
        assert lock.validity > 9.5
        assert rl.holder(f"k{n}") == lock.value
        assert rl.extend(lock, 10) is True
        assert rl.release(lock) is True
    other = manager(version_check=False)
    assert other.lock("k0", 10) is not None  # a second manager too
    assert rl.lock("k0", 10) is None  # and they still exclude each other


def test_a_minority_paused_leaves_locking_working(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """Locks keep coming through a minority of frozen nodes, across their cool-downs."""
    rl = manager()
    nodes[1].pause()
    nodes[4].pause()
    durations = timed_cycles(rl, 2.5)
    assert len(durations) >= 10
    # At worst one node timeout per stalled node (see the test below).
    assert max(durations) < 2 * NODE_TIMEOUT + MARGIN, durations


@pytest.mark.parametrize("green", ["gevent", "eventlet"])
def test_under_gevent_or_eventlet_a_paused_node_costs_a_node_timeout_never_a_hang(
    green: str, fresh_nodes: FreshNodes
) -> None:
    """Their monkey-patching puts their own socket class in place of the standard
    one; such a socket waits in their hub under Python's timeout, so the kernel's
    timeouts and a non-blocking recv flag do not hold for it (a paused node used to
    hang the call for good)."""
    if importlib.util.find_spec(green) is None:  # not imported here: it patches forks
        pytest.skip(f"{green} is not installed")
    three = fresh_nodes(3)
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.integration.green_check", green,
         ",".join(n.url for n in three), str(three[0].pid), str(NODE_TIMEOUT)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (seconds, result) in steps.items():
        assert seconds < 2 * NODE_TIMEOUT + MARGIN, (name, steps)
        assert "LockNotAcquired" not in result, (name, steps)
    assert steps["release"][1] == steps["release after"][1] == "True"
    assert steps["holder"][1] == "None"
    assert steps["holder, one node paused"][1] == "None"


def test_nodes_frozen_on_open_connections_cost_one_node_timeout_in_all(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """Once one node has timed out, the others are not waited for one by one."""
    timeout = 0.3
    rl = manager(node_timeout=timeout, retry_count=0)
    for node in nodes[:3]:
        node.pause()
    started = time.monotonic()
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("frozen", 10)
    elapsed = time.monotonic() - started
    assert timeout <= elapsed < timeout + 0.25, f"{elapsed:.3f}s"
    assert [v.vote for v in caught.value.votes] == [Vote.TIMEOUT] * 3 + [Vote.YES] * 2


def test_a_minority_paused_costs_about_one_node_timeout_per_acquire(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """_nodes: 'a call never waits much longer than one timeout however many nodes stall'."""
    timeout = 0.3
    rl = manager(node_timeout=timeout, retry_count=0)
    nodes[1].pause()
    nodes[4].pause()
    durations = timed_cycles(rl, _nodes.NODE_COOLDOWN + 1.2)  # spans a reconnect
    assert max(durations) < timeout + 0.2, [round(d, 3) for d in durations]


# --------------------------------------------------------------------------
# A majority down, then back


def majority_down_fails_fast(rl: Redlock, down: list[RedisServer]) -> LockNotAcquired:
    bound = RETRY_COUNT * (RETRY_DELAY + NODE_TIMEOUT) + MARGIN
    started = time.monotonic()
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("m", 1.0)
    elapsed = time.monotonic() - started
    assert elapsed < bound, f"{elapsed:.3f}s"
    error = caught.value
    assert error.unavailable is True
    assert error.attempts == RETRY_COUNT
    down_names = {name(node) for node in down}
    for vote in error.votes:
        if vote.node in down_names:
            assert vote.vote in (Vote.ERROR, Vote.TIMEOUT), vote
            assert vote.node in str(error)
        else:
            assert vote.vote is Vote.YES, vote
    assert {v.node for v in error.votes} >= down_names
    return error


def test_a_majority_killed_fails_fast_then_recovers_on_restart(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    rl = manager()
    down = nodes[:3]
    for node in down:
        node.kill()
    majority_down_fails_fast(rl, down)
    assert rl.lock("other", 10) is None
    for node in down:
        node.restart()
    time.sleep(_nodes.NODE_COOLDOWN)
    lock = rl.acquire("m", 10)
    assert [node.client().get("m") for node in nodes] == [lock.value.encode()] * N
    assert rl.release(lock) is True


def test_a_majority_paused_fails_fast_then_recovers_on_resume(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    rl = manager()
    down = [nodes[0], nodes[2], nodes[4]]
    for node in down:
        node.pause()
    error = majority_down_fails_fast(rl, down)
    for vote in error.votes:  # a stall, told apart from a refused connection
        if vote.vote is not Vote.YES:
            assert re.search(r"no reply|timeout", vote.detail, re.IGNORECASE), vote
    for node in down:
        node.resume()
    time.sleep(_nodes.NODE_COOLDOWN)
    # SETs sent to the frozen nodes are applied when they wake (their replies were
    # lost), so "m" may be taken there until its 1 s TTL ends: wait it out.
    lock = rl.acquire("m", 10, wait=3.0)
    assert rl.holder("m") == lock.value
    assert rl.release(lock) is True
    fresh = rl.acquire("untouched", 10)
    assert [node.client().get("untouched") for node in nodes] == [fresh.value.encode()] * N


def holders(nodes: list[RedisServer], key: str) -> list[bytes | None]:
    return [node.client().get(key) for node in nodes]


def wait_until_free(nodes: list[RedisServer], key: str, seconds: float) -> float:
    """Seconds until no node holds ``key`` (fails after ``seconds``, naming the holders)."""
    started = time.monotonic()
    while any(holders(nodes, key)):
        if time.monotonic() - started > seconds:
            pytest.fail(f"{key!r} still held after {seconds} s: {holders(nodes, key)}")
        time.sleep(0.05)
    return time.monotonic() - started


def release_missing_a_majority(
    rl: Redlock, nodes: list[RedisServer], key: str, token: str | None = None
) -> Lock:
    """Take ``key``, then release it while nodes 1-3 cool down after a stall: the
    release misses that majority (they still hold it) and returns False."""
    lock = rl.acquire(key, 30, token)
    down = [nodes[1], nodes[2], nodes[3]]
    for node in down:
        node.pause()
    assert rl.extend(lock, 30) is False  # times out there: those nodes cool down
    for node in down:
        node.resume()
    assert rl.release(lock) is False  # skipped on the cooling majority
    return lock


@pytest.mark.parametrize("retries", [0, RETRY_COUNT])
def test_a_failed_attempt_on_a_majority_that_stalled_and_resumed_leaves_no_key(
    nodes: list[RedisServer], manager: Callable[..., Redlock], retries: int
) -> None:
    """The SETs a stalled majority applies when it wakes (their replies timed out, so
    the undo skipped those nodes) are deleted once they answer, not held for the TTL:
    no other contender is refused for 30 s with no one behind the key. Also when
    later attempts of the same call (skipped on the cooling nodes) follow the first."""
    rl = manager(retry_count=retries)
    freed = _resend.get_resender().freed
    down = [nodes[0], nodes[2], nodes[4]]
    for node in down:
        node.pause()
    with pytest.raises(LockNotAcquired) as caught:
        rl.acquire("orphan", 30)
    assert caught.value.unavailable
    for node in down:
        node.resume()  # they apply the SETs queued on the timed-out connections
    wait_until_free(nodes, "orphan", _nodes.NODE_COOLDOWN + 2.0)
    # Freed by the deletes sent again, not never set: a majority of those nodes held it.
    assert _resend.get_resender().freed - freed >= 2
    other = Redlock([node.url for node in nodes], node_timeout=NODE_TIMEOUT, retry_count=0)
    try:
        lock = other.acquire("orphan", 10)  # another contender gets it at once
        assert holders(nodes, "orphan") == [lock.value.encode()] * N
    finally:
        other.close()


def test_a_release_that_missed_a_majority_is_sent_again_when_they_answer(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """A release made while a majority is skipped (its cool-down after a stall) reaches
    them once they answer again; the lock is not held on a quorum until its TTL."""
    rl = manager(retry_count=0)
    release_missing_a_majority(rl, nodes, "held")
    assert [bool(h) for h in holders(nodes, "held")] == [False, True, True, True, False]
    wait_until_free(nodes, "held", _nodes.NODE_COOLDOWN + 2.0)


def test_a_late_release_never_deletes_the_same_token_taken_again(
    nodes: list[RedisServer], manager: Callable[..., Redlock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release kept for re-sending is dropped when this manager takes the key with
    the same token again: the new lock is not deleted by the late send."""
    # The first re-send 3 s after the release (not when the cool-down ends), so the
    # key is taken again, on every node, before it is due.
    monkeypatch.setattr(
        _resend.Resender, "_due", staticmethod(lambda fanout, nodes, now: now + 3.0)
    )
    rl = manager(retry_count=0)
    release_missing_a_majority(rl, nodes, "again", "same-token")
    released = time.monotonic()  # (a moment after it: the margins below are wide)
    assert _resend.get_resender().pending(b"again") == 1
    time.sleep(_nodes.NODE_COOLDOWN + 0.1)  # the cool-down is over, the re-send not due
    again = rl.acquire("again", 30, "same-token")
    assert time.monotonic() - released < 3.0, "taken again too late to test anything"
    assert _resend.get_resender().pending(b"again") == 0
    time.sleep(max(0.0, released + 3.5 - time.monotonic()))  # past when it was due
    assert holders(nodes, "again") == [b"same-token"] * N
    assert rl.release(again) is True


def test_a_failed_reentry_never_deletes_the_owners_lock_later(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """An owner re-entering its lock (same token) while a majority stalls fails, and
    its undo skips those nodes: nothing is sent to them later, since the key they
    hold is the owner's own lock, still valid."""
    rl = manager(retry_count=0)
    lock = rl.acquire("owned", 30, "owner-token")
    down = [nodes[0], nodes[2], nodes[4]]
    for node in down:
        node.pause()
    with pytest.raises(LockNotAcquired):
        rl.acquire("owned", 30, "owner-token")
    for node in down:
        node.resume()
    assert _resend.get_resender().pending(b"owned") == 0
    time.sleep(_nodes.NODE_COOLDOWN + 1.5)  # past when a re-send would have gone
    assert holders(nodes, "owned")[0::2] == [b"owner-token"] * 3
    assert (lock.remaining or 0) > 25
    other = Redlock([node.url for node in nodes], node_timeout=NODE_TIMEOUT, retry_count=0)
    try:
        assert other.lock("owned", 10) is None  # still held on a quorum
    finally:
        other.close()


def test_closing_the_manager_drops_the_releases_it_kept(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    rl = manager(retry_count=0)
    release_missing_a_majority(rl, nodes, "closed")
    assert _resend.get_resender().pending(b"closed") == 1
    rl.close()
    assert _resend.get_resender().pending(b"closed") == 0
    time.sleep(_nodes.NODE_COOLDOWN + 1.0)
    assert [bool(h) for h in holders(nodes, "closed")] == [False, True, True, True, False]


# --------------------------------------------------------------------------
# An exception raised by a signal handler in the middle of a call


class Interrupted(Exception):
    """What a signal handler raises (Celery's SoftTimeLimitExceeded is an Exception)."""


@contextlib.contextmanager
def interrupted_after(seconds: float) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_an_exception_from_a_signal_handler_mid_call_leaves_no_reply_to_misread(
    fresh_nodes: FreshNodes,
) -> None:
    """A signal handler raises while a call waits for a node's reply: the exception
    propagates (it is no node's reply), and the next call on the connection reads
    its own reply, not the one that was in flight."""
    (node,) = fresh_nodes(1)
    fanout = _nodes.Fanout(_nodes.parse_servers([node.url]), timeout=5.0)
    assert fanout.call(_nodes.pack(b"PING")) == [b"PONG"]  # connected
    node.pause()
    try:
        with pytest.raises(Interrupted), interrupted_after(0.2):
            fanout.call(_nodes.pack(b"SET", b"k", b"v1"))
    finally:
        node.resume()
    time.sleep(0.2)  # the SET's reply, had the connection been kept, is there now
    assert fanout.call(_nodes.pack(b"GET", b"k")) in ([b"v1"], [None])
    fanout.close()


def test_an_acquire_interrupted_mid_call_leaves_no_key_behind(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """Interrupted after the SET reached the nodes that answer, the acquire undoes it
    before the exception propagates: the key is not held for its TTL by no one."""
    rl = manager(node_timeout=1.0)
    nodes[0].pause()  # its reply is awaited first: the SET reaches the others meanwhile
    try:
        with pytest.raises(Interrupted), interrupted_after(0.3):
            rl.acquire("interrupted", 30, retry_count=0)
    finally:
        nodes[0].resume()
    # The paused node may still apply the SET it had not read (a minority).
    values = [node.client().get("interrupted") for node in nodes[1:]]
    assert values == [None] * (N - 1)
    assert rl.holder("interrupted") is None


def test_a_takeover_interrupted_mid_call_gives_the_key_back_to_the_token_it_took(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """A takeover (a beat taking a hand-over, a run taking its task id's reservation)
    interrupted after the nodes that answer applied it (a SIGTERM's SystemExit) gives
    the key back to the token it took it from: the hand-over's content, or the
    reservation, is not destroyed, and the next taker still finds it on a quorum."""
    rl = manager(node_timeout=1.0)
    handed = 'handover:{"sent": {"every-minute": 1700000000.0}}'
    reservation = rl.acquire("handed", 30, handed)
    assert holders(nodes, "handed") == [handed.encode()] * N
    fanout = rl._fanout
    plain_script = fanout.script

    sent: list[bool] = []

    def script(script: Any, *args: Any, **kwargs: Any) -> Any:
        if script is _scripts.ACQUIRE:  # the takeover, after the SET NX every node refused
            nodes[0].pause()  # its reply is awaited first: the others apply it meanwhile
            sent.append(True)
        return plain_script(script, *args, **kwargs)

    fanout.script = script  # type: ignore[method-assign]
    try:
        with pytest.raises(Interrupted), interrupted_after(0.3):
            rl.acquire("handed", 30, "new-leader", retry_count=0, takeover=reservation.value)
    finally:
        nodes[0].resume()
        fanout.script = plain_script  # type: ignore[method-assign]
    assert sent, "interrupted before the takeover was sent: nothing tested"
    # The paused node may still apply the takeover it had not read (a minority).
    assert holders(nodes, "handed")[1:] == [handed.encode()] * (N - 1)
    assert rl.holder("handed") == handed
    other = manager()
    lock = other.acquire("handed", 30, "next-leader", takeover=handed)
    assert rl.holder("handed") == lock.value


def test_a_takeover_interrupted_on_a_free_key_leaves_no_key_nor_reservation(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """A run taking its task id's reservation over where there is none (a first run,
    ``takeover=task id``) and interrupted after its ``SET NX`` reached the nodes that
    answer: the key is released there, not turned into a reservation no one takes."""
    rl = manager(node_timeout=1.0)
    nodes[0].pause()  # its reply is awaited first: the SET reaches the others meanwhile
    try:
        with pytest.raises(Interrupted), interrupted_after(0.3):
            rl.acquire("first-run", 30, "task-id|run", retry_count=0, takeover="task-id")
    finally:
        nodes[0].resume()
    # The paused node may still apply the SET it had not read (a minority).
    assert holders(nodes, "first-run")[1:] == [None] * (N - 1)


def test_an_acquire_interrupted_while_a_majority_stalls_leaves_no_key_once_they_wake(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """Interrupted while a majority stalls, the undo misses those nodes too: it is
    sent again when they answer, so the SETs they apply on waking do not hold the
    key on a quorum for its TTL."""
    rl = manager(node_timeout=1.0)
    down = [nodes[0], nodes[2], nodes[4]]
    for node in down:
        node.pause()
    try:
        with pytest.raises(Interrupted), interrupted_after(0.3):
            rl.acquire("stalled", 30, retry_count=0)
        assert _resend.get_resender().pending(b"stalled") == 1
    finally:
        for node in down:
            node.resume()
    wait_until_free(nodes, "stalled", _nodes.NODE_COOLDOWN + 5.0)


def test_a_release_keeps_nothing_for_a_node_that_never_had_the_key(
    nodes: list[RedisServer], manager: Callable[..., Redlock]
) -> None:
    """A node down when the lock was taken never had it: a release missing it is not
    kept (with a node down for long, every release would otherwise be)."""
    rl = manager(retry_count=0)
    nodes[4].kill()
    # The first lock after the kill may have written to its open connection (its
    # reply unread at quorum): that one is kept. From then on the node is known down.
    rl.release(rl.acquire("first-after", 30))
    for n in range(20):  # within the cool-down and past it (a refused reconnect)
        lock = rl.acquire(f"without-4-{n}", 30)
        assert rl.release(lock) is True
        assert _resend.get_resender().pending(f"without-4-{n}".encode()) == 0
        time.sleep(0.1)


def test_a_reconnect_and_an_owed_reply_on_stalled_nodes_cost_one_timeout_together(
    fresh_nodes: FreshNodes,
) -> None:
    """One stalled node must be connected again, another owes a script's reply from
    an earlier call: the call has one deadline for both, not a timeout each."""
    timeout = 0.3
    nodes = fresh_nodes(3)
    with Redlock([n.url for n in nodes], node_timeout=timeout, retry_count=0) as rl:
        rl.release(rl.acquire("warm", 10))
        assert rl.holder("warm") is None  # reads every node: nothing owed yet
        nodes[2].pause()  # its replies are left unread at quorum from now on
        rl.release(rl.acquire("owed", 10))  # the release leaves a script's reply owed
        (wires,) = rl._fanout._idle
        assert any(wires[2].owed)  # a script's reply among them
        nodes[1].pause()
        wires[1].close()  # so the next call opens it again, on a stalled node
        started = time.monotonic()
        with pytest.raises(LockNotAcquired):
            rl.acquire("stalled", 10)
        elapsed = time.monotonic() - started
        nodes[1].resume()
        nodes[2].resume()
    assert elapsed < timeout + 0.15, f"{elapsed:.3f}s"


def test_a_call_in_flight_across_close_closes_its_connections_when_it_ends(
    fresh_nodes: FreshNodes,
) -> None:
    """close() in one thread while another thread's call waits for a reply: that
    call's connections are closed when it ends, not left open in the idle list."""
    import threading

    (node,) = fresh_nodes(1)
    fanout = _nodes.Fanout(_nodes.parse_servers([node.url]), timeout=5.0)
    assert fanout.call(_nodes.pack(b"PING")) == [b"PONG"]
    (wires,) = fanout._idle
    node.pause()
    replies: list[Any] = []
    caller = threading.Thread(target=lambda: replies.extend(fanout.call(_nodes.pack(b"PING"))))
    caller.start()
    try:
        deadline = time.monotonic() + 2.0
        while fanout._idle and time.monotonic() < deadline:  # until the call took them
            time.sleep(0.01)
        assert not fanout._idle
        fanout.close()
    finally:
        node.resume()
    caller.join(5)
    assert replies == [b"PONG"]
    assert fanout._idle == []
    assert wires[0].sock is None  # closed
