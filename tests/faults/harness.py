"""The fault-injection harness: contending clients, a ledger, a fault injector, a checker.

A run (:func:`run_load`) looks like this:

- **Clients.** Each :class:`Load` starts ``processes`` client processes
  (``python -m tests.faults.harness client``, JSON config on stdin), each with
  ``threads`` threads, that contend for a few resources on the nodes. A thread
  takes a lock (``fencing=True``; every other process with ``wait=``, so the
  release wake-ups are exercised too), "works" for ``hold`` seconds (some
  holds ``extend()`` half-way), then releases. Every hold is appended to its
  process's ledger as (start, end, validity deadline, validity, fence, client
  id, resource, attempt start). Times come from ``time.monotonic()``:
  CLOCK_MONOTONIC is one clock for every process on a Linux machine, so holds
  recorded by different processes can be compared.
- **Faults.** A :class:`FaultInjector` thread in the test process (it owns the
  :class:`~tests.servers.RedisServer` objects) runs the scenario's schedule:
  pause/resume, kill/restart, SCRIPT FLUSH, or the latency of a
  :class:`DelayProxy`. Every fault is recorded as a :class:`Fault` window and
  undone when the run ends, also on failure.
- **Checker.** :func:`check` merges the ledgers and reports acquisitions,
  overlapping holds per resource (two holders inside their validity at once),
  fence-order violations (a later holder with a fence not above an earlier
  one's), holds handed out with no validity left, and holders that kept
  working past their validity (where only the fence protects the data).

Slow nodes: the plan was network namespaces with ``tc netem``. This machine's
kernel has no ``sch_netem`` (``tc qdisc add ... netem`` answers "Specified
qdisc kind is unknown"), so latency and loss come from :class:`DelayProxy`, a
TCP proxy in front of a node. It also runs without root, on any CI.

Celery scenarios (issue 5: worker child SIGKILL, revoke terminate, broker
restart, hard time limit) plug in here once the Celery layer exists: a task
body records its hold with ``LedgerWriter.from_env()`` (the ledger directory
comes from :data:`LEDGER_ENV`, so prefork children find it), the injector
signals the worker processes instead of Redis nodes (recording each fault
with :meth:`FaultInjector.window`), and the test reports
``Result(lost_messages=...)``, which adds the "lost messages" column to the
table. :func:`check` and ``report.py`` take those runs unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import RedisServer

__all__ = [
    "LEDGER_ENV",
    "RESULTS_ENV",
    "SEED_ENV",
    "ClientSummary",
    "DelayProxy",
    "Fault",
    "FaultInjector",
    "Hold",
    "LedgerWriter",
    "Load",
    "Result",
    "Run",
    "Verdict",
    "check",
    "lock_keys",
    "read_ledgers",
    "record",
    "run_load",
]

#: Directory a process appends its holds to (one ledger file per process).
LEDGER_ENV = "REDLOCK_FAULTS_LEDGER"
#: File ``record()`` appends scenario results to (set by ``report.py``).
RESULTS_ENV = "REDLOCK_FAULTS_RESULTS"
#: Seed of the random choices of a run (to replay one).
SEED_ENV = "REDLOCK_FAULTS_SEED"

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
#: Seconds the clients get to start (interpreter, imports) before the run begins.
STARTUP = 1.0
#: How many failed calls with failing nodes a client keeps in its summary.
FAILURE_SAMPLES = 2000


# --------------------------------------------------------------------------
# The ledger


@dataclass(frozen=True)
class Hold:
    """One holder's hold of one resource, on the machine's monotonic clock."""

    start: float  #: when acquire() returned
    end: float  #: when the holder stopped working (just before release)
    expires_at: float  #: the lock's validity deadline (Lock.expires_at)
    validity: float  #: seconds of validity when acquired (Lock.validity)
    fence: int | None
    client: str
    resource: str
    #: when the attempt that won the lock began (its validity counts from there);
    #: NaN when unknown (then :attr:`began` falls back to ``start``)
    attempt: float = float("nan")

    @property
    def began(self) -> float:
        """When the winning attempt began: its votes were all cast after this moment."""
        return self.start if math.isnan(self.attempt) else self.attempt

    def to_line(self) -> bytes:
        fence = "-" if self.fence is None else str(self.fence)
        return (
            f"{self.start:.6f}\t{self.end:.6f}\t{self.expires_at:.6f}\t{self.validity:.6f}\t"
            f"{fence}\t{self.client}\t{self.resource}\t{self.attempt:.6f}\n"
        ).encode()

    @classmethod
    def from_line(cls, line: str) -> Hold:
        start, end, expires, validity, fence, client, resource, attempt = line.rstrip("\n").split(
            "\t"
        )
        return cls(
            float(start),
            float(end),
            float(expires),
            float(validity),
            None if fence == "-" else int(fence),
            client,
            resource,
            float(attempt),
        )


class LedgerWriter:
    """Append-only ledger of one process: one line per hold, written with one
    ``write(2)`` on an ``O_APPEND`` file, so threads need no lock and a process
    killed mid-run leaves whole lines behind."""

    def __init__(self, directory: str | Path, name: str | None = None) -> None:
        name = name or f"pid{os.getpid()}"
        self.path = Path(directory) / f"{name}.ledger"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def from_env(cls) -> LedgerWriter | None:
        """A writer into ``$REDLOCK_FAULTS_LEDGER``, or None when it is unset."""
        directory = os.environ.get(LEDGER_ENV)
        return cls(directory) if directory else None

    def write(self, hold: Hold) -> None:
        os.write(self._fd, hold.to_line())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def read_ledgers(directory: str | Path) -> list[Hold]:
    """Every hold in every ``*.ledger`` file of ``directory`` (a torn last line is skipped)."""
    holds: list[Hold] = []
    for path in sorted(Path(directory).glob("*.ledger")):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                holds.append(Hold.from_line(line))
    return holds


# --------------------------------------------------------------------------
# The checker


@dataclass
class Verdict:
    """What :func:`check` found in a set of holds."""

    acquisitions: int
    #: pairs of holds of one resource whose valid parts overlap (two holders at once)
    overlaps: list[tuple[Hold, Hold]]
    #: pairs that overlap as lived: one holder kept working past its validity
    raw_overlaps: list[tuple[Hold, Hold]]
    #: consecutive holds of one resource (by start) whose fences do not increase
    fence_violations: list[tuple[Hold, Hold]]
    #: holds handed out with no validity left (acquire returned after the deadline)
    granted_expired: list[Hold]
    #: holds that ended after their validity deadline
    overruns: int

    def describe(self, limit: int = 5) -> str:
        """A readable account of what went wrong (for assertion messages)."""
        lines = [
            f"{self.acquisitions} acquisitions, {len(self.overlaps)} overlaps, "
            f"{len(self.raw_overlaps)} raw overlaps, {len(self.fence_violations)} fence "
            f"violations, {len(self.granted_expired)} granted expired, {self.overruns} overruns"
        ]
        for label, pairs in (
            ("overlap", self.overlaps),
            ("fence", self.fence_violations),
        ):
            for first, second in pairs[:limit]:
                lines.append(f"  {label}: {first} / {second}")
        lines.extend(f"  granted expired: {hold}" for hold in self.granted_expired[:limit])
        return "\n".join(lines)


def _overlapping(holds: Sequence[Hold], valid_only: bool) -> list[tuple[Hold, Hold]]:
    """Holds that start before an earlier-started hold of the same resource ended."""
    found: list[tuple[Hold, Hold]] = []
    ordered = sorted(holds, key=lambda h: h.start)
    latest: Hold | None = None
    latest_end = float("-inf")
    for hold in ordered:
        end = min(hold.end, hold.expires_at) if valid_only else hold.end
        if latest is not None and hold.start < latest_end:
            found.append((latest, hold))
        if end > latest_end:
            latest, latest_end = hold, end
    return found


def check(holds: Sequence[Hold]) -> Verdict:
    """Check the holds of a run: overlaps per resource, fence order, validity."""
    by_resource: dict[str, list[Hold]] = defaultdict(list)
    for hold in holds:
        by_resource[hold.resource].append(hold)
    overlaps: list[tuple[Hold, Hold]] = []
    raw: list[tuple[Hold, Hold]] = []
    fences: list[tuple[Hold, Hold]] = []
    for group in by_resource.values():
        overlaps += _overlapping(group, valid_only=True)
        raw += _overlapping(group, valid_only=False)
        fenced = sorted((h for h in group if h.fence is not None), key=lambda h: h.start)
        for earlier, later in itertools.pairwise(fenced):
            if (later.fence or 0) <= (earlier.fence or 0):
                fences.append((earlier, later))
    return Verdict(
        acquisitions=len(holds),
        overlaps=overlaps,
        raw_overlaps=raw,
        fence_violations=fences,
        granted_expired=[h for h in holds if h.validity <= 0 or h.start >= h.expires_at],
        overruns=sum(1 for h in holds if h.end > h.expires_at),
    )


# --------------------------------------------------------------------------
# Client processes


@dataclass
class Load:
    """What one group of client processes does."""

    processes: int = 3
    threads: int = 4
    resources: int = 3
    ttl: float = 1.0
    hold: float = 0.001  #: seconds of "work" under the lock
    #: share of holds that extend() their lock half-way (the new deadline is checked)
    extend_probability: float = 0.2
    retry_count: int = 20
    retry_delay: float = 0.02
    node_timeout: float = 0.05
    #: acquire(wait=...) in every other process (release wake-ups); None: retries only
    wait: float | None = 2.0
    fencing: bool = True
    name: str = "c"  #: client ids are f"{name}{process}.{thread}"
    #: resource names are f"{resource_prefix}{i}"; loads with one prefix contend
    resource_prefix: str = "res"


@dataclass
class ClientConfig:
    """Everything one client process needs (passed as JSON on its command line)."""

    servers: list[str]
    resources: list[str]
    ttl: float
    hold: float
    extend_probability: float
    threads: int
    start_at: float
    stop_at: float
    ledger_dir: str
    client_id: str
    retry_count: int
    retry_delay: float
    node_timeout: float
    wait: float | None
    fencing: bool
    seed: int


@dataclass
class Failure:
    """One failed acquire() call where some node erred or timed out."""

    at: float  #: when the call started
    seconds: float  #: how long it took
    failed_nodes: list[str]  #: nodes that voted error or timeout
    unavailable: bool  #: LockNotAcquired.unavailable
    message: str


@dataclass
class ClientSummary:
    """What one client process did, beyond its holds."""

    client: str
    calls: int = 0
    acquired: int = 0
    not_acquired: int = 0
    #: release() returned False: the token no longer held a quorum when released
    lost_at_release: int = 0
    extends: int = 0  #: extend() calls in the middle of a hold
    extends_refused: int = 0  #: of which returned False
    slowest_call: float = 0.0  #: the longest acquire() call, granted or not
    slowest_failure: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    #: anything other than LockNotAcquired raised by the core (must stay empty)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientSummary:
        failures = [Failure(**f) for f in data.pop("failures")]
        return cls(failures=failures, **data)


def _client_thread(
    rl: Any,
    cfg: ClientConfig,
    ledger: LedgerWriter,
    summary: ClientSummary,
    mutex: threading.Lock,
    number: int,
) -> None:
    from celery_redlock import LockNotAcquired, Vote
    from celery_redlock.redlock import DRIFT_CONSTANT

    rng = random.Random(cfg.seed * 1000 + number)
    client = f"{cfg.client_id}.{number}"
    while time.monotonic() < cfg.stop_at:
        resource = rng.choice(cfg.resources)
        called = time.monotonic()
        try:
            lock = rl.acquire(resource, cfg.ttl, fencing=cfg.fencing, wait=cfg.wait)
        except LockNotAcquired as exc:
            took = time.monotonic() - called
            failed = [v.node for v in exc.votes if v.vote in (Vote.ERROR, Vote.TIMEOUT)]
            with mutex:
                summary.calls += 1
                summary.not_acquired += 1
                summary.slowest_call = max(summary.slowest_call, took)
                if failed:
                    summary.slowest_failure = max(summary.slowest_failure, took)
                    if len(summary.failures) < FAILURE_SAMPLES:
                        summary.failures.append(
                            Failure(called, took, failed, exc.unavailable, str(exc))
                        )
            continue
        except Exception as exc:  # a bug in the core: recorded, the run goes on
            with mutex:
                summary.calls += 1
                summary.errors.append(f"acquire: {type(exc).__name__}: {exc}")
            continue
        start = time.monotonic()
        granted, validity = lock.expires_at, lock.validity
        assert granted is not None
        # Lock.expires_at = attempt start + ttl - drift (redlock._attempt)
        attempt = granted - cfg.ttl + rl.drift_factor * cfg.ttl + DRIFT_CONSTANT
        with mutex:
            summary.slowest_call = max(summary.slowest_call, start - called)
        time.sleep(cfg.hold / 2)
        extended = False
        if rng.random() < cfg.extend_probability:
            try:
                extended = rl.extend(lock, cfg.ttl)
            except Exception as exc:
                with mutex:
                    summary.errors.append(f"extend: {type(exc).__name__}: {exc}")
            with mutex:
                summary.extends += 1
                summary.extends_refused += 0 if extended else 1
        time.sleep(cfg.hold / 2)
        end = time.monotonic()
        # An extended lock is valid up to its new deadline: the checker holds it to that.
        expires = lock.expires_at if extended and lock.expires_at is not None else granted
        ledger.write(Hold(start, end, expires, validity, lock.fence, client, resource, attempt))
        try:
            released = rl.release(lock)
        except Exception as exc:
            with mutex:
                summary.errors.append(f"release: {type(exc).__name__}: {exc}")
            released = False
        with mutex:
            summary.calls += 1
            summary.acquired += 1
            summary.lost_at_release += 0 if released else 1


def client_main(cfg: ClientConfig) -> None:
    """One client process: ``cfg.threads`` threads taking locks until ``cfg.stop_at``."""
    from celery_redlock import Redlock

    ledger = LedgerWriter(cfg.ledger_dir, cfg.client_id)
    summary = ClientSummary(cfg.client_id)
    rl = Redlock(
        cfg.servers,
        retry_count=cfg.retry_count,
        retry_delay=cfg.retry_delay,
        node_timeout=cfg.node_timeout,
        version_check=False,
        logger=None,
    )
    time.sleep(max(0.0, cfg.start_at - time.monotonic()))
    mutex = threading.Lock()
    threads = [
        threading.Thread(
            target=_client_thread, args=(rl, cfg, ledger, summary, mutex, n), daemon=True
        )
        for n in range(cfg.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rl.close()
    ledger.close()
    out = Path(cfg.ledger_dir) / f"{cfg.client_id}.summary.json"
    out.write_text(json.dumps(asdict(summary)))


# --------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    """One injected fault: what, on which nodes, from when to when (monotonic)."""

    kind: str
    nodes: list[str]
    start: float
    end: float
    detail: str = ""
    #: figures a checker may need (e.g. the delay of a "slow" fault)
    params: dict[str, float] = field(default_factory=dict)

    def covers(self, moment: float, settle: float = 0.0) -> bool:
        """True when ``moment`` falls in the window, ``settle`` seconds after it began."""
        return self.start + settle <= moment <= self.end


def node_name(server: RedisServer) -> str:
    return f"{server.host}:{server.port}"


class FaultInjector:
    """Runs a scenario's schedule in a thread until ``stop_at``; records each fault.

    The schedule is a function taking the injector. It calls the helpers
    (:meth:`pause`, :meth:`kill`, :meth:`restart_now`, :meth:`flush_scripts`,
    :meth:`slow`) and :meth:`wait`, which returns False once the run is over.
    Every helper undoes its fault before returning, also when the run ends in
    the middle of it, so the nodes are healthy afterwards.
    """

    def __init__(self, schedule: Callable[[FaultInjector], None], seed: int = 0) -> None:
        self.schedule = schedule
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.start_at = self.stop_at = float("inf")
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)

    def start(self, start_at: float, stop_at: float) -> None:
        self.start_at, self.stop_at = start_at, stop_at
        self._thread.start()

    def _run(self) -> None:
        try:
            if self.wait(self.start_at - time.monotonic()):
                self.schedule(self)
        except BaseException as exc:  # re-raised by join()
            self._error = exc

    def join(self) -> None:
        """Stop the schedule (faults are undone) and re-raise its error, if any."""
        self._stop.set()
        if self._thread.ident is None:
            return  # never started
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            raise RuntimeError("the fault injector did not stop within 60 s")
        if self._error is not None:
            raise self._error

    def running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.stop_at

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` (cut short at the end of the run); False when the run is over."""
        seconds = min(seconds, self.stop_at - time.monotonic())
        if seconds > 0:
            self._stop.wait(seconds)
        return self.running()

    def uniform(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def choose(self, servers: Sequence[RedisServer], count: int) -> list[RedisServer]:
        return self.rng.sample(list(servers), count)

    @contextlib.contextmanager
    def window(
        self, kind: str, nodes: Sequence[str], detail: str = "", **params: float
    ) -> Iterator[Fault]:
        """Record a fault from entering the block to leaving it: the helpers enter it
        once the fault is in full effect and leave it before undoing it."""
        fault = Fault(kind, list(nodes), time.monotonic(), float("inf"), detail, params)
        self.faults.append(fault)
        try:
            yield fault
        finally:
            fault.end = time.monotonic()

    def pause(self, servers: Sequence[RedisServer], seconds: float) -> None:
        """SIGSTOP ``servers`` for ``seconds``, then SIGCONT."""
        try:
            for server in servers:
                server.pause()
            with self.window("pause", [node_name(s) for s in servers]):
                self.wait(seconds)
        finally:
            for server in servers:
                if server.paused:
                    server.resume()

    def kill(self, servers: Sequence[RedisServer], down_for: float) -> None:
        """SIGKILL ``servers``, keep them down ``down_for`` seconds, restart them empty."""
        try:
            for server in servers:
                server.kill()
            with self.window("kill", [node_name(s) for s in servers], f"down {down_for:.2f}s"):
                self.wait(down_for)
        finally:
            for server in servers:
                server.restart()

    def restart_now(self, servers: Sequence[RedisServer]) -> None:
        """SIGKILL ``servers`` and start them again at once, empty (no delayed restart)."""
        with self.window("restart", [node_name(s) for s in servers]):
            for server in servers:
                server.kill()
            for server in servers:
                server.restart()

    def flush_scripts(self, server: RedisServer) -> None:
        """SCRIPT FLUSH: the node forgets every cached script (EVALSHA -> NOSCRIPT)."""
        with self.window("script-flush", [node_name(server)]), server.client() as client:
            client.script_flush()

    def slow(
        self,
        proxies: Sequence[DelayProxy],
        seconds: float,
        delay: float,
        stall_probability: float = 0.0,
        stall: float = 0.0,
    ) -> None:
        """Put ``delay`` (and random stalls) on ``proxies`` for ``seconds``, then remove it."""
        detail = f"delay {delay * 1000:.0f}ms" + (
            f", {stall_probability:.0%} stalls of {stall * 1000:.0f}ms" if stall_probability else ""
        )
        try:
            for proxy in proxies:
                proxy.set_latency(delay, stall_probability, stall)
            with self.window("slow", [p.name for p in proxies], detail, delay=delay):
                self.wait(seconds)
        finally:
            for proxy in proxies:
                proxy.set_latency(0.0)


# --------------------------------------------------------------------------
# A delaying TCP proxy (latency and stalls without tc netem)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 in front of one node, adding latency to requests.

    Bytes from the client reach the node ``delay`` seconds late (so a round
    trip takes ``delay`` longer); with ``stall_probability`` a chunk is held
    ``stall`` seconds more, as a lost segment waits for its retransmission.
    Order is kept, and data in flight still reaches the node after the
    client hangs up, as on a real network. Replies pass through at once.
    Runs an asyncio loop in a daemon thread; :meth:`stop` closes everything.
    """

    def __init__(self, target: RedisServer, seed: int = 0) -> None:
        self.target = target
        self.delay = 0.0
        self.stall_probability = 0.0
        self.stall = 0.0
        self.port = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def name(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def set_latency(self, delay: float, stall_probability: float = 0.0, stall: float = 0.0) -> None:
        self.delay, self.stall_probability, self.stall = delay, stall_probability, stall

    def start(self) -> DelayProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, HOST, 0), self._loop
        )
        self._server = future.result(timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _chunk_delay(self) -> float:
        extra = self.stall if self._rng.random() < self.stall_probability else 0.0
        return self.delay + extra

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, delayed=True),
                self._pipe(up_reader, writer, delayed=False),
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for each in (writer, up_writer):
                each.close()
                self._writers.discard(each)
            self._tasks.discard(task)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delayed: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                pause = due - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while True:
                try:
                    data = await src.read(65536)
                except OSError:
                    data = b""
                due = loop.time() + (self._chunk_delay() if delayed else 0.0)
                last_due = max(due, last_due)  # a stalled chunk holds back the ones after it
                queue.put_nowait((last_due, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()


# --------------------------------------------------------------------------
# A run


@dataclass
class Run:
    """The outcome of :func:`run_load`."""

    verdict: Verdict
    holds: list[Hold]
    faults: list[Fault]
    summaries: list[ClientSummary]
    started: float
    ended: float
    seed: int

    @property
    def errors(self) -> list[str]:
        return [e for s in self.summaries for e in s.errors]

    @property
    def failures(self) -> list[Failure]:
        return [f for s in self.summaries for f in s.failures]

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.summaries)

    @property
    def slowest_call(self) -> float:
        return max((s.slowest_call for s in self.summaries), default=0.0)

    @property
    def extends(self) -> tuple[int, int]:
        """(extend() calls, of which refused)."""
        return (
            sum(s.extends for s in self.summaries),
            sum(s.extends_refused for s in self.summaries),
        )

    @property
    def lost_at_release(self) -> int:
        return sum(s.lost_at_release for s in self.summaries)

    def holds_during(
        self, faults: Sequence[Fault], settle: float = 0.0, by_attempt: bool = False
    ) -> list[Hold]:
        """Holds that started inside one of ``faults`` (``settle`` s after it began);
        ``by_attempt``: whose winning attempt began inside one (its votes came after)."""
        return [
            h
            for h in self.holds
            if any(f.covers(h.began if by_attempt else h.start, settle) for f in faults)
        ]

    def fence_violations_without_data_loss(
        self, kinds: Sequence[str] = ("kill", "restart")
    ) -> list[tuple[Hold, Hold]]:
        """Fence violations with no node restarted empty (a ``kinds`` fault) between the
        two holds: those no data loss explains."""
        return [
            (earlier, later)
            for earlier, later in self.verdict.fence_violations
            if not any(
                f.kind in kinds and earlier.began <= f.end <= later.began for f in self.faults
            )
        ]

    def summary(self) -> str:
        """One paragraph for logs: counts, failures, the verdict."""
        failures = self.failures
        slowest = max((f.seconds for f in failures), default=0.0)
        return (
            f"{self.verdict.describe()}\n{self.calls} calls, {len(self.faults)} faults, "
            f"{len(failures)} failures with failing nodes (slowest {slowest:.3f} s), "
            f"{self.lost_at_release} lost at release, {self.extends[0]} extends "
            f"({self.extends[1]} refused), longest gap {self.longest_gap():.2f} s, "
            f"{len(self.errors)} errors; {SEED_ENV}={self.seed}"
        )

    def longest_gap(self) -> float:
        """The longest time with no new grant (any resource) during the run."""
        starts = sorted([self.started, *(h.start for h in self.holds), self.ended])
        return max(b - a for a, b in itertools.pairwise(starts))


def run_load(
    servers: Sequence[str],
    loads: Sequence[Load],
    duration: float,
    workdir: Path,
    schedule: Callable[[FaultInjector], None] | None = None,
    seed: int | None = None,
) -> Run:
    """Run ``loads`` against ``servers`` for ``duration`` seconds while ``schedule``
    injects faults; return the merged ledger, the faults and the checker's verdict.

    ``seed`` (default ``$REDLOCK_FAULTS_SEED``, else random; shown by
    :meth:`Run.summary`) drives the clients' and the injector's choices.
    """
    if seed is None:
        seed = int(os.environ.get(SEED_ENV) or random.randrange(1_000_000))
    workdir.mkdir(parents=True, exist_ok=True)
    start_at = time.monotonic() + STARTUP
    stop_at = start_at + duration
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    injector = FaultInjector(schedule or (lambda _: None), seed)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        for load in loads:
            resources = [f"{load.resource_prefix}{i}" for i in range(load.resources)]
            for p in range(load.processes):
                cfg = ClientConfig(
                    servers=list(servers),
                    resources=resources,
                    ttl=load.ttl,
                    hold=load.hold,
                    extend_probability=load.extend_probability,
                    threads=load.threads,
                    start_at=start_at,
                    stop_at=stop_at,
                    ledger_dir=str(workdir),
                    client_id=f"{load.name}{p}",
                    retry_count=load.retry_count,
                    retry_delay=load.retry_delay,
                    node_timeout=load.node_timeout,
                    wait=load.wait if p % 2 else None,
                    fencing=load.fencing,
                    seed=seed * 100 + len(procs),
                )
                log = open(workdir / f"{cfg.client_id}.log", "wb")  # noqa: SIM115
                with log:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "tests.faults.harness", "client"],
                        cwd=REPO_ROOT,
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(asdict(cfg)).encode())
                proc.stdin.close()
                procs.append((cfg.client_id, proc))
        injector.start(start_at, stop_at)
        for client_id, proc in procs:
            code = proc.wait(timeout=max(0.0, stop_at - time.monotonic()) + 60)
            if code != 0:
                tail = (workdir / f"{client_id}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"client {client_id} exited with {code}:\n{tail}")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        injector.join()
    holds = read_ledgers(workdir)
    summaries = [
        ClientSummary.from_json(json.loads(path.read_text()))
        for path in sorted(workdir.glob("*.summary.json"))
    ]
    return Run(check(holds), holds, injector.faults, summaries, start_at, stop_at, seed)


def lock_keys(server: RedisServer) -> list[bytes]:
    """The lock keys on a node (fence counters, which never expire, left out)."""
    with server.client(socket_timeout=5) as client:
        keys: list[bytes] = client.keys("*")
    return sorted(k for k in keys if not k.endswith(b":fence"))


# --------------------------------------------------------------------------
# Results for the report


@dataclass
class Result:
    """One row of the fault-injection table."""

    scenario: str
    acquisitions: int
    faults: int
    overlaps: int
    fence_violations: int
    notes: str = ""
    seconds: float = 0.0
    lost_messages: int | None = None  #: Celery scenarios only

    @classmethod
    def from_run(cls, scenario: str, run: Run, notes: str = "") -> Result:
        return cls(
            scenario=scenario,
            acquisitions=run.verdict.acquisitions,
            faults=len(run.faults),
            overlaps=len(run.verdict.overlaps),
            fence_violations=len(run.verdict.fence_violations),
            notes=notes,
            seconds=round(run.ended - run.started, 1),
        )


def record(result: Result, *, report: bool = True) -> None:
    """Add ``result`` to the report when ``report.py`` runs the suite (else a no-op).

    Short variants of long scenarios pass ``report=False``: the table shows
    the long runs and the one-off (deterministic) scenarios.
    """
    path = os.environ.get(RESULTS_ENV)
    if not path or not report:
        return
    line = json.dumps(asdict(result)) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Entry points for subprocesses


def holder_main(cfg: dict[str, Any]) -> None:
    """A lone holder for the paused-holder scenario, driven over stdin/stdout.

    Acquires ``cfg["resource"]`` with fencing and prints the lock as JSON;
    then waits for a line on stdin (the test SIGSTOPs and SIGCONTs it
    meanwhile), tries to keep the lock and prints what it saw.
    """
    from celery_redlock import Lock, Redlock

    rl = Redlock(cfg["servers"], retry_count=1, node_timeout=0.1, logger=None)
    lock = rl.acquire(cfg["resource"], cfg["ttl"], fencing=True)
    start = time.monotonic()
    print(
        json.dumps(
            {
                "value": lock.value,
                "fence": lock.fence,
                "start": start,
                "expires_at": lock.expires_at,
                "validity": lock.validity,
            }
        ),
        flush=True,
    )
    sys.stdin.readline()
    resumed = time.monotonic()
    rebuilt = Lock(lock.resource, lock.value, manager=rl)
    seen = {
        "resumed": resumed,
        "remaining": lock.remaining,
        "extend": lock.extend(cfg["ttl"]),
        "extend_rebuilt": rebuilt.extend(cfg["ttl"]),
        "release": rl.release(lock),
    }
    print(json.dumps(seen), flush=True)
    rl.close()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("client", "holder"):
        print("usage: python -m tests.faults.harness client|holder  (JSON config on stdin)")
        return 2
    # Die with the test process rather than linger (its SIGTERM handler stops the nodes).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    config = json.loads(sys.stdin.readline() if argv[0] == "holder" else sys.stdin.read())
    if argv[0] == "client":
        client_main(ClientConfig(**config))
    else:
        holder_main(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
