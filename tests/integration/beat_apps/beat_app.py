"""The app the ``celery beat`` subprocesses of test_beat.py run.

Configured from the environment, which the test sets:

- ``REDLOCK_TEST_BROKER``: the broker URL (a Redis database of its own)
- ``REDLOCK_TEST_SERVERS``: the lock nodes, comma-separated
- ``REDLOCK_TEST_QUEUE``: the queue the periodic task is sent to (unique per run)
- ``REDLOCK_TEST_BEAT_TTL``, ``REDLOCK_TEST_BEAT_POLL``: the leader lock's TTL and
  a standby's poll, in seconds
- ``REDLOCK_TEST_INTERVAL``: the periodic task's interval in seconds

Nothing consumes the queue: the test reads the sent messages from the broker.
Each message carries two headers stamped at publish time by the beat that
sent it: ``beat_sent_at`` (``time.time()``) and ``beat_pid``.

Start::

    celery -A tests.integration.beat_apps.beat_app beat \\
        -S celery_redlock.beat:RedlockScheduler
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

#: The periodic task's name.
TASK = "beat_test.tick"

app = Celery("beat_test", broker=os.environ.get("REDLOCK_TEST_BROKER", "memory://"))
_queue = os.environ.get("REDLOCK_TEST_QUEUE", "beat-test")
_servers = [s for s in os.environ.get("REDLOCK_TEST_SERVERS", "").split(",") if s]
app.conf.update(
    redlock_servers=_servers or None,
    redlock_beat_ttl=float(os.environ.get("REDLOCK_TEST_BEAT_TTL", "3")),
    redlock_beat_poll=float(os.environ.get("REDLOCK_TEST_BEAT_POLL", "0.5")),
    task_default_queue=_queue,
    beat_max_loop_interval=1,
    beat_schedule={
        "every-interval": {
            "task": TASK,
            "schedule": float(os.environ.get("REDLOCK_TEST_INTERVAL", "1")),
        }
    },
)


@app.task(name=TASK)
def tick() -> None:
    """The periodic task (never run: the test reads the queue)."""


@before_task_publish.connect(weak=False, dispatch_uid="beat_test.stamp")
def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers["beat_sent_at"] = time.time()
        headers["beat_pid"] = os.getpid()
