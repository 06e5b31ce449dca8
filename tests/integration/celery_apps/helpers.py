"""Helpers shared by the Celery integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from tests.servers import RedisServer


def server_url(server: RedisServer, db: int) -> str:
    """``server``'s URL on database ``db``."""
    return server.url.rsplit("/", 1)[0] + f"/{db}"


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed; True if it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


Interval = tuple[float, float]


def overlaps(intervals: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Every interval that starts before an earlier-starting one has ended, with that one."""
    found: list[tuple[Interval, Interval]] = []
    latest: Interval | None = None  # the interval reaching furthest so far
    for current in sorted(intervals):
        if latest is not None and current[0] < latest[1]:
            found.append((latest, current))
        if latest is None or current[1] > latest[1]:
            latest = current
    return found
