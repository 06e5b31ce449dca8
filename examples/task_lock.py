"""A Celery task that never runs twice at once for the same arguments
(``base=RedlockTask``): a duplicate sent while the first still runs is
skipped, a call with other arguments runs alongside, and once the first has
finished the same call runs again.

``python examples/task_lock.py`` starts a worker inside the process
(``celery.contrib.testing.worker.start_worker``, a thread pool) and sends the
calls itself. The module is also an ordinary app: in production, run
``celery -A task_lock worker`` from the examples folder on as many hosts as
you like, and the lock holds across all of them.

Environment (defaults: a local Redis)::

    REDLOCK_SERVERS=redis://r1:6379/0,redis://r2:6379/0,redis://r3:6379/0  # the lock nodes
    CELERY_BROKER_URL=redis://127.0.0.1:6379/1
    CELERY_RESULT_BACKEND=redis://127.0.0.1:6379/2   # default: the broker

It prints, e.g.::

    sync_account(42) is running, holding lock redlock:task_lock.sync_account:3f5b...
    duplicate sync_account(42) -> None (skipped: task <id> holds the lock)
    sync_account(7) -> 'synced account 7'
    first sync_account(42) -> 'synced account 42'
    sync_account(42) again, after the first finished -> 'synced account 42'
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from celery_redlock import Redlock, RedlockTask
from celery_redlock.keys import task_id_of
from celery_redlock.signals import lock_skipped

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")

app = Celery("task_lock", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(
    redlock_servers=os.environ.get("REDLOCK_SERVERS", "redis://127.0.0.1:6379/0").split(","),
    redlock_ttl=30.0,  # the lock is renewed while the body runs, so it may run for longer
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(base=RedlockTask, name="task_lock.sync_account")
def sync_account(account_id: int, full: bool = False) -> str:
    """Slow work that must not run twice at once for one account."""
    time.sleep(2.0)
    return f"synced account {account_id}"


# lock_skipped tells a skipped duplicate (result None) from a run that returned None.
SKIPPED: dict[str, str | None] = {}


@lock_skipped.connect
def remember_skip(sender: Any, task_id: str, holder: str | None, **_: Any) -> None:
    SKIPPED[task_id] = holder


def wait_until_held(key: str, rl: Redlock, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    # A running task's token is its task id and a mark of the run: task_id_of reads the id.
    while (holder := task_id_of(rl.holder(key))) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"nobody took {key} within {timeout} s: is the worker running?")
        time.sleep(0.05)
    return holder


def main() -> None:
    with (
        start_worker(app, pool="threads", concurrency=4, perform_ping_check=False),
        Redlock(app.conf.redlock_servers) as rl,
    ):
        first = sync_account.delay(42)
        # The lock key is the task name and a digest of the bound arguments:
        # sync_account(42), sync_account(42, False) and sync_account(account_id=42) share it.
        key = sync_account.redlock_key_for((42,))
        holder = wait_until_held(key, rl)
        print(f"sync_account(42) is running, holding lock {key}")
        print(f"the holder is the first call's task id -> {holder == first.id}")

        duplicate = sync_account.delay(account_id=42, full=False)
        result = duplicate.get(timeout=10)
        who = SKIPPED.get(duplicate.id)
        print(f"duplicate sync_account(42) -> {result!r} (skipped: task {who} holds the lock)")
        print(f"skipped in favour of the first call -> {who == first.id}")

        print(f"sync_account(7) -> {sync_account.delay(7).get(timeout=10)!r}")
        print(f"first sync_account(42) -> {first.get(timeout=10)!r}")
        print(f"lock after the first finished -> {rl.holder(key)}")
        again = sync_account.delay(42).get(timeout=10)
        print(f"sync_account(42) again, after the first finished -> {again!r}")


if __name__ == "__main__":
    main()
