"""The fencing token: a lock alone cannot stop a holder that paused past its
TTL from writing late; the storage can, when it checks a fence.

``rl.acquire(resource, ttl, fencing=True).fence`` is an integer that
strictly increases for each successive holder. Every write carries it, and
the table keeps the highest fence it has seen: the write is an
``UPDATE ... WHERE fence <= ?``, so a write with a lower fence than the last
one stored changes nothing. (``<=``, not ``<``: the holder of the newest
fence may write more than once.)

The story, with an sqlite3 table standing in for your database:

1. Client A takes the lock (TTL 0.5 s) and writes a draft.
2. A pauses (a GC pause, swap, SIGSTOP) for longer than the TTL; the lock
   expires.
3. Client B takes the lock with a higher fence and writes.
4. A wakes up, still believing it holds the lock, and writes: refused.

Run it with the lock nodes in ``REDLOCK_SERVERS``::

    REDLOCK_SERVERS=redis://r1:6379/0,redis://r2:6379/0,redis://r3:6379/0 \\
        python examples/fencing_token.py

It prints, e.g.::

    A holds the lock, fence 1795740068945648
    A writes 'draft by A' -> accepted
    A pauses for 0.8 s; its lock (TTL 0.5 s) expires meanwhile
    B holds the lock, fence 1795740069746974 (higher than A's -> True)
    B writes 'final by B' -> accepted
    A wakes up and writes 'final by A' -> refused (fence 1795740068945648 < 1795740069746974)
    A tries to extend its lock -> False (only now does A learn it lost it)
    stored: 'final by B' with fence 1795740069746974
"""

from __future__ import annotations

import os
import sqlite3
import time

from celery_redlock import Redlock

SERVERS = os.environ.get("REDLOCK_SERVERS", "redis://127.0.0.1:6379/0").split(",")

RESOURCE = "examples:fencing:report:2026-11"
REPORT = "2026-11"
TTL = 0.5  # short, so the pause below outlasts it


def setup(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE reports (id TEXT PRIMARY KEY, body TEXT NOT NULL, fence INTEGER NOT NULL)"
    )
    db.execute("INSERT INTO reports (id, body, fence) VALUES (?, '', 0)", (REPORT,))
    db.commit()


def write(db: sqlite3.Connection, body: str, fence: int) -> bool:
    """Store ``body`` unless a write with a higher fence came first; True when stored."""
    with db:  # one transaction: the check and the write are one statement anyway
        cursor = db.execute(
            "UPDATE reports SET body = ?, fence = ? WHERE id = ? AND fence <= ?",
            (body, fence, REPORT, fence),
        )
    return cursor.rowcount == 1


def stored(db: sqlite3.Connection) -> tuple[str, int]:
    body, fence = db.execute("SELECT body, fence FROM reports WHERE id = ?", (REPORT,)).fetchone()
    return str(body), int(fence)


def outcome(db: sqlite3.Connection, body: str, fence: int) -> str:
    if write(db, body, fence):
        return "accepted"
    return f"refused (fence {fence} < {stored(db)[1]})"


def main() -> None:
    db = sqlite3.connect(":memory:")
    setup(db)
    with Redlock(SERVERS) as rl:
        a = rl.acquire(RESOURCE, TTL, fencing=True)
        assert a.fence is not None
        print(f"A holds the lock, fence {a.fence}")
        print(f"A writes 'draft by A' -> {outcome(db, 'draft by A', a.fence)}")

        pause = TTL + 0.3
        print(f"A pauses for {pause:.1f} s; its lock (TTL {TTL} s) expires meanwhile")
        time.sleep(pause)

        b = rl.acquire(RESOURCE, 10, fencing=True)  # the lock is free again
        assert b.fence is not None
        print(f"B holds the lock, fence {b.fence} (higher than A's -> {b.fence > a.fence})")
        print(f"B writes 'final by B' -> {outcome(db, 'final by B', b.fence)}")

        # A does not know it lost the lock (asking first would race with B anyway).
        print(f"A wakes up and writes 'final by A' -> {outcome(db, 'final by A', a.fence)}")
        print(f"A tries to extend its lock -> {a.extend(10)} (only now does A learn it lost it)")
        b.release()

    body, fence = stored(db)
    print(f"stored: {body!r} with fence {fence}")
    db.close()


if __name__ == "__main__":
    main()
