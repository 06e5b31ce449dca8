"""``python -m celery_redlock demo``: its report, and that it leaves no process behind.

Every Celery process the demo starts inherits a marker in its environment
(``CELERY_REDLOCK_DEMO_RUN=<uuid>``, set only for the demo, not for this
test process), so those left behind are found in /proc. redis-server
overwrites its environment (its process title), so its servers are found by
the ports the demo prints: nothing may listen there afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_redlock.demo import BEAT_POLL, BEAT_TTL

REPO = Path(__file__).resolve().parents[2]
MARKER = "CELERY_REDLOCK_DEMO_RUN"

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def marked(marker: str) -> list[int]:
    """Pids of the live processes carrying ``marker`` in their environment."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    """A fresh marker; whatever still carries it at teardown is SIGKILLed (and fails the test)."""
    value = uuid.uuid4().hex
    yield value
    for pid in marked(value):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def redis_ports(output: str) -> list[int]:
    """The lock nodes' and the broker's ports, from the demo's progress lines."""
    match = re.search(r"lock nodes on ports ([0-9, ]+) of [0-9.]+; broker on port (\d+)", output)
    assert match, output
    return [int(p) for p in match[1].split(", ")] + [int(match[2])]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def redis_left(ports: list[int]) -> list[int]:
    """Ports of ``ports`` still served (by the demo's redis-server, or anyone's)."""
    return [port for port in ports if listening(port)]


def demo_env(marker: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, **{MARKER: marker, "PYTHONPATH": path})


def number(report: str, label: str) -> float:
    match = re.search(rf"^  {label} +([0-9.]+)", report, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{report}"
    return float(match[1])


def run_demo(marker: str, tmp_path: Path, seconds: float) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery_redlock", "demo", "--seconds", str(seconds)],
        env=demo_env(marker),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return done.stdout


def check_report(report: str, seconds: float) -> None:
    sent = number(report, "tasks sent")
    run = number(report, "bodies run")
    skipped = number(report, "duplicates skipped")
    assert sent == 24  # 3 accounts x 8 copies
    assert run + skipped == sent
    assert 3 <= run < sent  # each account ran; its copies sent at once were skipped
    assert skipped > 0
    assert number(report, "overlapping runs") == 0
    assert number(report, "locks left") == 0
    failover = number(report, "beat failover")  # "-" (no failover) would not match
    assert 0 < failover <= BEAT_TTL + BEAT_POLL + 1.0
    periodic = number(report, "periodic runs")
    assert seconds - BEAT_TTL - 3 <= periodic <= seconds + 2
    assert "PROBLEM" not in report


def test_demo_reports_no_overlap_no_lock_left_and_a_beat_failover(
    marker: str, tmp_path: Path
) -> None:
    seconds = 12.0
    report = run_demo(marker, tmp_path, seconds)
    check_report(report, seconds)
    assert "SIGKILL beat-" in report
    assert marked(marker) == []
    assert redis_left(redis_ports(report)) == []
    assert list(tmp_path.iterdir()) == []  # its files went to a temp dir, now removed


@pytest.mark.slow
def test_demo_at_its_default_length_finishes_within_a_minute(marker: str, tmp_path: Path) -> None:
    started = time.monotonic()
    report = run_demo(marker, tmp_path, 20.0)
    assert time.monotonic() - started < 60
    check_report(report, 20.0)
    assert marked(marker) == []


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_demo_stops_every_process_it_started(
    marker: str, tmp_path: Path, signum: int, code: int
) -> None:
    out = tmp_path / "out.txt"
    with open(out, "wb") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "celery_redlock", "demo"],
            env=demo_env(marker),
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in out.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, out.read_text()
            time.sleep(0.1)
        assert "ready:" in out.read_text()
        ports = redis_ports(out.read_text())
        assert len(redis_left(ports)) == 4
        assert len(marked(marker)) >= 1 + 2 + 2 + 4  # demo, 2 beats, 2 workers and their pools
        demo.send_signal(signum)
        # More of the same while it cleans up and exits (an impatient Ctrl-C): they
        # neither cut the clean-up short nor change the exit status.
        deadline = time.monotonic() + 30
        while demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                demo.send_signal(signum)
        assert demo.wait(timeout=5) == code, out.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "every process the demo started is stopped" in out.read_text()
    assert marked(marker) == []
    assert redis_left(ports) == []
