"""The lock on its own, no Celery: lock and release, wait for a lock, extend
it, and read the per-node votes when it cannot be had.

Run it against three independent Redis masters::

    REDLOCK_SERVERS=redis://r1:6379/0,redis://r2:6379/0,redis://r3:6379/0 \\
        python examples/plain_lock.py

Without ``REDLOCK_SERVERS`` it uses one local Redis (``redis://127.0.0.1:6379/0``):
enough to try it out (one node is its own quorum; the manager warns that
fewer than 3 nodes is not a Redlock deployment).

It prints one line per step, e.g.::

    acquired 'examples:report:2026-11': valid for 9.90 s, token 5f0c...
    held by someone else -> lock() returned None
    locked(wait=5.0) got the lock after 0.5 s
    extend while held -> True (valid for 9.90 s)
    LockNotAcquired (held), unavailable=False
      127.0.0.1:7001=held
      ...
"""

from __future__ import annotations

import os
import socket
import threading
import time

from celery_redlock import LockNotAcquired, Redlock

SERVERS = os.environ.get("REDLOCK_SERVERS", "redis://127.0.0.1:6379/0").split(",")

RESOURCE = "examples:report:2026-11"


def lock_and_release(rl: Redlock) -> None:
    lock = rl.lock(RESOURCE, 10)  # ttl in seconds; a Lock, or None when held elsewhere
    assert lock is not None
    print(f"acquired {lock.resource!r}: valid for {lock.validity:.2f} s, token {lock.value}")
    print(f"holder on a quorum -> {'this token' if rl.holder(RESOURCE) == lock.value else '?'}")
    print(f"held by someone else -> lock() returned {rl.lock(RESOURCE, 10)}")
    print(f"release -> {rl.release(lock)}")
    print(f"after release, holder -> {rl.holder(RESOURCE)}")


def wait_for_a_lock(rl: Redlock) -> None:
    other = rl.lock(RESOURCE, 10)
    assert other is not None
    # Another worker releases the lock after 0.5 s; locked(wait=) is woken by that release.
    releaser = threading.Timer(0.5, other.release)
    releaser.start()
    started = time.monotonic()
    with rl.locked(RESOURCE, 10, wait=5.0) as lock:
        print(f"locked(wait=5.0) got the lock after {time.monotonic() - started:.1f} s")
        # extend() re-arms the lock for another ttl while it is still ours
        print(f"extend while held -> {rl.extend(lock, 10)} (valid for {lock.validity:.2f} s)")
    # the with block released it
    print(f"extend after the block released it -> {rl.extend(lock, 10)}")
    releaser.join()


def lock_not_acquired(rl: Redlock) -> None:
    holder = rl.lock(RESOURCE, 10)
    assert holder is not None
    try:
        rl.acquire(RESOURCE, 10, retry_count=0)  # acquire() raises where lock() returns None
    except LockNotAcquired as exc:
        print(f"LockNotAcquired (held), unavailable={exc.unavailable}")
        for vote in exc.votes:
            print(f"  {vote}")  # node=vote (detail)
    finally:
        holder.release()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def redis_down() -> None:
    # Two of three nodes are down: the error says so, instead of "held".
    dead = [f"redis://127.0.0.1:{free_port()}/0" for _ in range(2)]
    with Redlock([SERVERS[0], *dead], version_check=False, logger=None) as rl:
        try:
            rl.acquire(RESOURCE, 10, retry_count=0)
        except LockNotAcquired as exc:
            print(f"LockNotAcquired (nodes down), unavailable={exc.unavailable}")
            for vote in exc.votes:
                print(f"  {vote}")  # node=vote (detail)


def main() -> None:
    # version_check=True (the default) checks the nodes at construction.
    with Redlock(SERVERS) as rl:
        print(rl)
        lock_and_release(rl)
        wait_for_a_lock(rl)
        lock_not_acquired(rl)
    redis_down()


if __name__ == "__main__":
    main()
