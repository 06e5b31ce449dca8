"""Several processes hammering one resource: never two holders at once, and fences
that grow with every new holder.

Each worker appends one line per hold to a shared ledger (O_APPEND, one write
per line, after the release): start and end of the hold on time.monotonic(),
which on Linux is CLOCK_MONOTONIC, one clock for every process on the machine.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = 3
HAMMER_SECONDS = 2.5
MIN_HOLDS = 100

WORKER = r"""
import os, random, sys, time
from celery_redlock import Redlock

urls, ledger, start_at, stop_at, fencing = sys.argv[1:6]
start_at, stop_at, fencing = float(start_at), float(stop_at), fencing == "1"
rl = Redlock(urls.split(","), retry_count=0, node_timeout=0.5)
fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
while time.monotonic() < start_at:
    time.sleep(0.001)
while time.monotonic() < stop_at:
    lock = rl.lock("hammer", 5, fencing=fencing)
    if lock is None:
        time.sleep(random.uniform(0, 0.002))
        continue
    start = time.monotonic()
    time.sleep(0.001)  # hold it for a moment: without the lock, holds would overlap
    end = time.monotonic()
    in_time = end < lock.expires_at
    released = rl.release(lock)
    fence = lock.fence if fencing else -1
    line = f"{start!r} {end!r} {fence} {in_time:d} {released:d} {os.getpid()}\n"
    os.write(fd, line.encode())
os.close(fd)
"""


@dataclass(frozen=True)
class Hold:
    start: float
    end: float
    fence: int
    in_time: bool
    released: bool
    pid: int


def read_ledger(path: Path) -> list[Hold]:
    holds = []
    for line in path.read_text().splitlines():
        start, end, fence, in_time, released, pid = line.split()
        holds.append(
            Hold(float(start), float(end), int(fence), in_time == "1", released == "1", int(pid))
        )
    return sorted(holds, key=lambda h: h.start)


def overlaps(holds: list[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs (earlier, later) where the later hold began before the earlier one ended."""
    found = []
    latest: Hold | None = None
    for hold in sorted(holds, key=lambda h: h.start):
        if latest is not None and hold.start < latest.end:
            found.append((latest, hold))
        if latest is None or hold.end > latest.end:
            latest = hold
    return found


def hammer(redis_urls: list[str], ledger: Path, fencing: bool) -> list[Hold]:
    start_at = time.monotonic() + 1.5  # time for every interpreter to start
    stop_at = start_at + HAMMER_SECONDS
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [",".join(redis_urls), str(ledger), repr(start_at), repr(stop_at), str(int(fencing))]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(WORKERS)
    ]
    try:
        for worker in workers:
            _, err = worker.communicate(timeout=HAMMER_SECONDS + 30)
            assert worker.returncode == 0, err
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    holds = read_ledger(ledger)
    assert len(holds) >= MIN_HOLDS, f"only {len(holds)} holds"
    assert len({h.pid for h in holds}) == WORKERS, "every process held the lock"
    assert all(h.released and h.in_time for h in holds)  # no hold outlived its validity
    return holds


def test_the_overlap_check_finds_overlaps() -> None:
    """The ledger check can fail: it sees a hold that starts inside another."""

    def hold(start: float, end: float) -> Hold:
        return Hold(start, end, -1, True, True, 1)

    assert overlaps([hold(0, 1), hold(1, 2), hold(2.5, 3)]) == []
    assert len(overlaps([hold(0, 1), hold(0.5, 2)])) == 1
    assert len(overlaps([hold(0, 5), hold(1, 2), hold(3, 4)])) == 2  # both inside the first


def test_processes_hammering_one_resource_never_hold_it_at_once(
    redis_urls: list[str], tmp_path: Path
) -> None:
    holds = hammer(redis_urls, tmp_path / "ledger", fencing=False)
    assert overlaps(holds) == []


def test_fences_from_several_processes_increase_with_each_holder(
    redis_urls: list[str], tmp_path: Path
) -> None:
    holds = hammer(redis_urls, tmp_path / "ledger", fencing=True)
    assert overlaps(holds) == []
    fences = [h.fence for h in holds]
    assert all(a < b for a, b in itertools.pairwise(fences)), "fences out of order"
    assert fences[0] >= 1


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("relies on CLOCK_MONOTONIC being one clock for every process (Linux)")
