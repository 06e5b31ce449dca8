"""Redlock under gevent's or eventlet's monkey-patching, with a node paused mid-run.

Run by test_redlock_faults.py in a subprocess of its own (the patching must
come before every other import, and must not reach the test process)::

    python -m tests.integration.green_check gevent|eventlet SERVERS PID TIMEOUT

``SERVERS``: three lock nodes, comma-separated; ``PID``: the redis-server of
the first one, which this process pauses (SIGSTOP) once its connections are
open and resumes before it exits; ``TIMEOUT``: the per-node timeout. Prints
one JSON object: how long each step took, in seconds, and what it returned.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    if sys.argv[1] == "gevent":
        from gevent import monkey

        monkey.patch_all()
    else:
        import eventlet

        eventlet.monkey_patch()

import json
import os
import signal
import time
from typing import Any

from celery_redlock import LockNotAcquired, Redlock


def main(servers: list[str], pid: int, timeout: float) -> dict[str, Any]:
    steps: dict[str, Any] = {}

    def timed(name: str, step: Any) -> Any:
        started = time.monotonic()
        try:
            result = step()
        except LockNotAcquired as exc:
            result = f"LockNotAcquired: {exc}"
        steps[name] = [round(time.monotonic() - started, 3), repr(result)]
        return result

    with Redlock(servers, node_timeout=timeout, retry_count=1) as rl:
        rl.release(rl.acquire("green-warm", 10))  # every connection open
        os.kill(pid, signal.SIGSTOP)
        try:
            # holder() reads every node: a read on the paused node's open connection.
            timed("holder, one node paused", lambda: rl.holder("green-warm"))
            lock = timed("acquire, one node paused", lambda: rl.acquire("green-1", 10))
            timed("release", lambda: rl.release(lock))
            again = timed("acquire after", lambda: rl.acquire("green-2", 10))
            timed("release after", lambda: rl.release(again))
            timed("holder", lambda: rl.holder("green-2"))
        finally:
            os.kill(pid, signal.SIGCONT)
    return steps


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[2].split(","), int(sys.argv[3]), float(sys.argv[4]))))
