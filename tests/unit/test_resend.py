"""The thread that sends missed releases again: a send in flight is waited out by
forget() and drop(), a dropped delete is never sent again, a node answering
"not held" is asked once more, and a failed thread start at shutdown is no error."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis

from celery_redlock import _resend
from celery_redlock._resend import Resender


class FakeNode:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeFanout:
    """Answers the release script from ``answers`` (node index -> reply); can hold a
    send until ``gate`` is set."""

    def __init__(self, answers: dict[int, Any], gate: threading.Event | None = None) -> None:
        self.nodes = [FakeNode(f"n{i}") for i in range(3)]
        self.answers = answers
        self.gate = gate
        self.sending = threading.Event()
        self.calls: list[list[int]] = []

    def cooling_until(self, i: int) -> float:
        return 0.0

    def script(self, script: Any, keys: Any, args: Any, targets: list[int]) -> list[Any]:
        self.calls.append(list(targets))
        self.sending.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return [self.answers.get(i) if i in targets else None for i in range(3)]


def timeout() -> Exception:
    return redis.TimeoutError("no reply")


def wait_for(condition: Any, seconds: float = 5.0) -> None:
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.01)


def test_a_missed_node_is_sent_the_delete_until_it_answers() -> None:
    fanout = FakeFanout({0: timeout(), 1: 1})
    resender = Resender()
    resender.add(fanout, b"k", "t", [0, 1], time.monotonic() + 30)  # type: ignore[arg-type]
    wait_for(lambda: resender.freed == 1)  # node 1 answered 1: done there
    assert fanout.calls[0] == [0, 1]
    fanout.answers[0] = 1  # node 0 comes back
    wait_for(lambda: len(fanout.calls) >= 2, seconds=5)
    assert fanout.calls[1] == [0]  # only the node still missing
    wait_for(lambda: resender.pending(b"k") == 0)
    assert resender.freed == 2


def test_not_held_is_asked_once_more_then_left() -> None:
    fanout = FakeFanout({0: 0})
    resender = Resender()
    resender.add(fanout, b"k", "t", [0], time.monotonic() + 30)  # type: ignore[arg-type]
    wait_for(lambda: resender.pending(b"k") == 0, seconds=5)
    assert fanout.calls == [[0], [0]]


def test_a_node_that_answers_only_past_the_keys_ttl_is_still_sent_the_delete() -> None:
    """A stalled node applies a queued SET, with its whole TTL, when it wakes: the
    delete goes on past the TTL the key had when it was sent."""
    fanout = FakeFanout({0: timeout()})
    resender = Resender()
    resender.add(fanout, b"k", "t", [0], time.monotonic() + 0.01)  # type: ignore[arg-type]
    wait_for(lambda: len(fanout.calls) >= 1)
    fanout.answers[0] = 1  # it wakes, past the TTL
    wait_for(lambda: resender.freed == 1, seconds=5)
    assert resender.pending(b"k") == 0


def test_a_node_that_never_answers_is_given_up_at_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_resend, "LATE_MARGIN", 0.0)
    fanout = FakeFanout({0: timeout()})
    resender = Resender()
    resender.add(fanout, b"k", "t", [0], time.monotonic() + 0.01)  # type: ignore[arg-type]
    wait_for(lambda: resender.pending(b"k") == 0)
    assert fanout.calls == []  # its first send was due after the cap


def test_forget_interrupted_while_it_waits_drops_nothing() -> None:
    gate = threading.Event()
    fanout = FakeFanout({0: timeout()}, gate)
    resender = Resender()
    resender.add(fanout, b"k", "t", [0], time.monotonic() + 30)  # type: ignore[arg-type]
    assert fanout.sending.wait(5)

    class Interrupted(Exception):
        pass

    def interrupt(timeout: float | None = None) -> bool:
        raise Interrupted  # a signal handler's exception, in the wait

    real_wait = resender._cond.wait
    resender._cond.wait = interrupt  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        resender.forget(fanout, b"k", "t")  # type: ignore[arg-type]
    resender._cond.wait = real_wait  # type: ignore[method-assign]
    gate.set()
    wait_for(lambda: len(fanout.calls) >= 2, seconds=5)  # still kept: sent again
    assert resender.pending(b"k") == 1


@pytest.mark.parametrize("how", ["forget", "drop"])
def test_a_send_in_flight_is_waited_out_and_never_repeated(how: str) -> None:
    gate = threading.Event()
    fanout = FakeFanout({0: timeout()}, gate)  # would be sent again: node 0 times out
    resender = Resender()
    resender.add(fanout, b"k", "t", [0], time.monotonic() + 30)  # type: ignore[arg-type]
    assert fanout.sending.wait(5)
    returned = threading.Event()
    result: list[Any] = []

    def call() -> None:
        if how == "forget":
            result.append(resender.forget(fanout, b"k", "t"))  # type: ignore[arg-type]
        else:
            resender.drop(fanout)  # type: ignore[arg-type]
        returned.set()

    threading.Thread(target=call, daemon=True).start()
    if how == "forget":
        assert not returned.wait(0.3)  # the send is still in flight
    gate.set()
    assert returned.wait(5)
    if how == "forget":
        assert result == [({0}, pytest.approx(time.monotonic() + 30, abs=1))]
    time.sleep(1.5)  # past the next send, had it been kept
    assert fanout.calls == [[0]]
    assert resender.pending(b"k") == 0


def test_forget_of_another_token_keeps_the_delete() -> None:
    fanout = FakeFanout({0: timeout()})
    resender = Resender()
    resender.add(fanout, b"k", "t", [0], time.monotonic() + 30)  # type: ignore[arg-type]
    assert resender.forget(fanout, b"k", "other") is None  # type: ignore[arg-type]
    assert resender.pending(b"k") == 1
    assert resender.forget(fanout, b"k", "t") == ({0}, pytest.approx(time.monotonic() + 30, abs=1))  # type: ignore[arg-type]
    assert resender.pending(b"k") == 0


def test_a_thread_that_cannot_start_at_shutdown_is_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    resender = Resender()
    resender.add(FakeFanout({}), b"k", "t", [0], time.monotonic() + 30)  # type: ignore[arg-type]
    assert resender.pending(b"k") == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_keeps_nothing_of_its_parents() -> None:
    code = """
import os, time
from celery_redlock import _resend
import redis
class N:
    name = "n"
class F:
    nodes = [N()]
    def cooling_until(self, i): return time.monotonic() + 60
    def script(self, *a, **k): return [redis.TimeoutError("x")]
f = F()
_resend.resend(f, b"k", "t", [0], time.monotonic() + 120)
assert _resend.get_resender().pending(b"k") == 1
pid = os.fork()
if pid == 0:
    os._exit(0 if _resend.get_resender().pending(b"k") == 0 else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
assert _resend.get_resender().pending(b"k") == 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
