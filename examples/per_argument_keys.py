"""What makes two calls of a RedlockTask "the same": the ``redlock_key`` option.

- ``None`` (the default): all arguments, bound to the signature with defaults
  applied, so ``sync_account(42)``, ``sync_account(42, False)`` and
  ``sync_account(account_id=42)`` are one key.
- a tuple of argument names: only those count; ``charge(1, 10)`` and
  ``charge(1, 20)`` collide (one charge per account at a time).
- a callable taking the task's arguments and returning a str: your own
  identity, here a normalised e-mail address.
- ``""``: the task name alone: one run of the task at a time, whatever the
  arguments.

For each task the program holds the lock of a first call (as a running task
would), runs other calls eagerly (``.apply()``, which locks as a worker
does) and prints which of them collide with it. No broker is needed, only
the lock nodes::

    REDLOCK_SERVERS=redis://r1:6379/0,redis://r2:6379/0,redis://r3:6379/0 \\
        python examples/per_argument_keys.py

It prints, for each task, lines such as::

    while charge(1, 10) holds redlock:keys.charge:...
      charge(1, 20)                                      collides (skipped)
      charge(2, 10)                                      runs
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery

from celery_redlock import Redlock, RedlockTask

app = Celery("per_argument_keys")
app.conf.redlock_servers = os.environ.get("REDLOCK_SERVERS", "redis://127.0.0.1:6379/0").split(",")


# None (default): every argument counts, defaults applied.
@app.task(base=RedlockTask, name="keys.sync_account")
def sync_account(account_id: int, full: bool = False) -> str:
    return "ran"


# Argument names: only account_id counts, so one charge per account at a time.
@app.task(base=RedlockTask, name="keys.charge", redlock_key=("account_id",))
def charge(account_id: int, amount: int, note: str = "") -> str:
    return "ran"


# A callable: it gets the task's arguments and returns the identity as a str.
def customer_identity(customer: Mapping[str, str], plan: str) -> str:
    return customer["email"].strip().lower()


@app.task(base=RedlockTask, name="keys.subscribe", redlock_key=customer_identity)
def subscribe(customer: Mapping[str, str], plan: str) -> str:
    return "ran"


# "": the task name alone; one rebuild at a time, whatever the shard.
@app.task(base=RedlockTask, name="keys.rebuild_index", redlock_key="")
def rebuild_index(shard: int) -> str:
    return "ran"


Call = tuple[Sequence[Any], Mapping[str, Any]]

#: task -> (the call holding the lock, the calls tried meanwhile)
CASES: list[tuple[Any, Call, list[Call]]] = [
    (
        sync_account,
        ((42,), {}),
        [((42, False), {}), ((), {"account_id": 42}), ((42, True), {}), ((7,), {})],
    ),
    (
        charge,
        ((1, 10), {}),
        [((1, 20), {}), ((1, 10), {"note": "again"}), ((2, 10), {})],
    ),
    (
        subscribe,
        (({"email": "ada@example.com"}, "pro"), {}),
        [
            (({"email": " ADA@example.com"}, "free"), {}),
            (({"email": "bob@example.com"}, "pro"), {}),
        ],
    ),
    (
        rebuild_index,
        ((1,), {}),
        [((1,), {}), ((2,), {})],
    ),
]


def show(task: Any, call: Call) -> str:
    args, kwargs = call
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{task.name.split('.')[-1]}({', '.join(shown)})"


def main() -> None:
    with Redlock(app.conf.redlock_servers) as rl:
        for task, first, others in CASES:
            key = task.redlock_key_for(*first)
            # Stand in for a running first call: hold its lock under another token.
            with rl.locked(key, 30, value="the-first-call"):
                print(f"while {show(task, first)} holds {key}")
                for call in others:
                    result = task.apply(*call).get()  # None: skipped as a duplicate
                    outcome = "runs" if result == "ran" else "collides (skipped)"
                    print(f"  {show(task, call):<50} {outcome}")


if __name__ == "__main__":
    main()
