"""A real ``celery worker -P prefork`` subprocess for the tests that need one.

Each worker runs the venv's python in its own session (process group), so a
test ends it, and every pool process it forked, by that group; with
``setpriv --pdeathsig`` where the machine has it, it also dies with pytest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from tests.integration.celery_apps.helpers import wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Seconds a worker has to log " ready." after it was started.
READY_TIMEOUT = 30.0

__all__ = ["READY_TIMEOUT", "CeleryWorker", "group_alive"]


class CeleryWorker:
    """One ``celery -A app_module worker -P prefork`` subprocess (or ``pool``), logging to
    ``directory``."""

    def __init__(
        self,
        app_module: str,
        name: str,
        env: dict[str, str],
        directory: Path,
        concurrency: int,
        pool: str = "prefork",
    ) -> None:
        self.app_module = app_module
        self.pool = pool
        self.name = f"{name}-{uuid.uuid4().hex[:6]}"
        self.env = env
        self.concurrency = concurrency
        self.log = directory / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-n", f"{self.name}@%h",
            "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--logfile={self.log}",
        ]  # fmt: skip
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]  # dies with pytest
        return command

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process; not waiting for it to be ready."""
        with open(str(self.log) + ".err", "wb") as err:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env={**os.environ, **self.env, "PYTHONPATH": str(REPO_ROOT)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        return self.proc

    def start(self) -> CeleryWorker:
        """Start the process and wait until it logs " ready."; RuntimeError with its log if not."""
        self.launch()
        if not wait_for(self._ready, READY_TIMEOUT, 0.05):
            tail = self.tail()
            self.kill()
            raise RuntimeError(f"worker {self.name} did not start:\n{tail}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited at start:\n{self.tail()}")
        return self.log.exists() and " ready." in self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` of the worker's log and of its stderr."""
        text = ""
        for path in (self.log, Path(str(self.log) + ".err")):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def kill(self) -> float:
        """SIGKILL the worker and its pool processes (its group); reap; the kill's moment."""
        proc = self.proc
        killed = time.monotonic()
        if proc is None:
            return killed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        wait_for(lambda: not group_alive(proc.pid), 5.0)
        return killed


def group_alive(pgid: int) -> bool:
    """True while some process of the process group ``pgid`` runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True
