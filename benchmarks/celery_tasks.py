"""Item 4 of issue 6: Celery tasks through a real prefork worker, with and without the lock.

One ``celery worker -P prefork -c 2`` subprocess (app: ``benchmarks.celery_app``)
runs three trivial tasks, ``return i``: ``bench.plain`` (a plain ``Task``),
``bench.locked`` (``base=RedlockTask``, every default: key from all the
arguments, TTL 30 s, renewed while the body runs, released when it ends) and
``bench.locked_broker`` (the same, its locks on the broker's server, as with
``redlock_servers`` unset and a Redis broker). The broker and the result
backend are a throwaway redis-server of their own; ``bench.locked``'s locks go
to the suite's 3 nodes, and the target is checked on it. The worker is
started once, warmed up (each pool child connects and checks the lock
nodes), reused for every round, and stopped at the end, also when something
fails.

- Throughput: each round publishes N tasks of one kind with ``.delay(i)``
  (distinct arguments, so no call is a duplicate), then waits for all their
  results; tasks/s = N / (last result - first publish). Rounds alternate
  between the three kinds in a new random order; the ratio is the median of the
  per-round ratios.
- Latency: one ``.delay(i).get()`` round trip at a time, the kinds
  interleaved, medians over many calls; the added latency is the locked
  median minus the plain one.

The publishing process shares the 2 CPUs with the worker, its two children
and the four redis-servers: the figures are for this whole machine. Around
each throughput batch the CPU each of them used is read (:class:`CpuMeter`),
so the report shows where the lock's added time goes.

``python -m benchmarks.celery_tasks`` runs one kind alone and prints that
split (``--locked-option redlock_auto_extend=false`` to price a feature), or
records the worker and its pool children with py-spy (``--profile OUT``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import Check, Context, NodeAddr, Suite, SuiteResult, Table

__all__ = [
    "CPU_PARTS",
    "SUITE",
    "THROUGHPUT_TARGET",
    "CpuMeter",
    "Worker",
    "main",
    "measure",
    "running_worker",
]

#: Lock nodes the suite needs (the broker is a server of its own).
NODES = 3
#: Locked throughput over plain, at least (issue 6).
THROUGHPUT_TARGET = 0.85
#: The worker's pool.
POOL, CONCURRENCY = "prefork", 2

#: (tasks per batch, throughput rounds per kind, latency calls per kind)
FULL = (500, 10, 200)
QUICK = (40, 2, 10)
#: Tasks of each kind run before measuring (every pool child takes some).
WARMUP = 40

#: Seconds to wait for the worker to answer its first task.
START_TIMEOUT = 60.0
#: Seconds to wait for one batch's results.
BATCH_TIMEOUT = 120.0
#: Seconds the worker gets to exit after SIGTERM, before SIGKILL.
STOP_TIMEOUT = 10.0

ROOT = Path(__file__).resolve().parent.parent

#: plain Task; RedlockTask on the 3 lock nodes; RedlockTask on the broker's server
KINDS = ("plain", "locked", "broker")
#: Each kind's task in benchmarks.celery_app.
TASK_NAMES = {"plain": "bench.plain", "locked": "bench.locked", "broker": "bench.locked_broker"}


class WorkerError(RuntimeError):
    """The worker could not be started or stopped answering; the message has its log."""


class Worker:
    """A ``celery worker`` subprocess in a session of its own; :meth:`stop` ends it all."""

    def __init__(
        self, env: dict[str, str], queue: str, logdir: Path, prefix: Sequence[str] = ()
    ) -> None:
        self.log = logdir / "worker.log"
        command = [
            sys.executable, "-m", "celery", "-A", "benchmarks.celery_app", "worker",
            "-P", POOL, "-c", str(CONCURRENCY), "-Q", queue, "-n", f"{queue}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "WARNING", "--logfile", str(self.log),
        ]  # fmt: skip
        command = [*prefix, *command]  # a profiler, for --profile
        setpriv = shutil.which("setpriv")
        if setpriv:  # the worker dies with the benchmark, even on SIGKILL
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        with open(logdir / "worker.out", "wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        text = ""
        for path in (self.log, self.log.with_name("worker.out")):
            with contextlib.suppress(OSError):
                text += path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _signal(self, signum: int) -> None:
        # The whole session: the main process and its pool children.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to whatever is left in its group.

        ``signum=SIGINT`` when a profiler runs the worker: it writes its output on SIGINT.
        """
        if self.alive():
            self._signal(signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        self._signal(signal.SIGKILL)  # also a pool child outliving its parent
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)


@dataclass
class KindResult:
    kind: str
    #: tasks/s, one per round
    rates: list[float] = field(default_factory=list)
    #: seconds of one delay().get() round trip, one per call
    latencies: list[float] = field(default_factory=list)
    #: CPU seconds per task by process group (CPU_PARTS), one dict per round
    cpu: list[dict[str, float]] = field(default_factory=list)

    def cpu_median(self, part: str) -> float | None:
        values = [c[part] for c in self.cpu if part in c]
        return statistics.median(values) if values else None

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def latency(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None


def _get(result: Any, worker: Worker, timeout: float) -> Any:
    """``result.get()``, failing early (with the worker's log) when the worker died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return result.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except Exception as exc:
            if type(exc).__name__ != "TimeoutError":
                raise
            if not worker.alive():
                raise WorkerError(f"the worker exited; its log:\n{worker.tail()}") from None
            if time.monotonic() >= deadline:
                raise WorkerError(
                    f"no result from the worker in {timeout:g} s; its log:\n{worker.tail()}"
                ) from None


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the pool processes of a worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def _server_cpu(nodes: Sequence[NodeAddr]) -> float:
    import redis

    total = 0.0
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port) as client:
            info = client.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


#: Where a task's CPU time goes: the process groups CpuMeter reads.
CPU_PARTS = ("publisher", "worker main", "pool children", "lock servers", "broker server")


class CpuMeter:
    """Reads the CPU seconds used so far by each of :data:`CPU_PARTS`.

    The publisher is this process (``time.process_time``, every thread); the
    worker's main process and its pool children from ``/proc`` (clock ticks:
    read over hundreds of tasks); the redis-servers from ``INFO cpu``. Not
    meaningful when a profiler is the worker's parent process.
    """

    def __init__(self, worker: Worker, locks: Sequence[NodeAddr], broker: NodeAddr) -> None:
        self.worker = worker
        self.locks = list(locks)
        self.broker = broker

    def snapshot(self) -> dict[str, float]:
        main_pid = self.worker.proc.pid
        return {
            "publisher": time.process_time(),
            "worker main": _proc_cpu(main_pid),
            "pool children": sum(_proc_cpu(pid) for pid in _children(main_pid)),
            "lock servers": _server_cpu(self.locks),
            "broker server": _server_cpu([self.broker]),
        }

    @staticmethod
    def per_task(before: dict[str, float], after: dict[str, float], tasks: int) -> dict[str, float]:
        return {part: (after[part] - before[part]) / tasks for part in before}


def _batch(task: Any, first: int, count: int, worker: Worker) -> float:
    """Publish ``count`` calls, wait for every result; tasks/s."""
    t0 = time.perf_counter()
    pending = [task.delay(i) for i in range(first, first + count)]
    for i, result in enumerate(pending, first):
        value = _get(result, worker, BATCH_TIMEOUT)
        if value != i:  # a skipped duplicate returns None: not a locked run
            raise AssertionError(f"{task.name}({i}) returned {value!r}")
    return count / (time.perf_counter() - t0)


def measure(
    app: Any,
    worker: Worker,
    batch: int,
    rounds: int,
    calls: int,
    log: Callable[[str], None],
    meter: CpuMeter | None = None,
    seed: int = 6,
) -> dict[str, KindResult]:
    """Warm up, then the interleaved throughput rounds and latency calls.

    ``meter``: read the CPU used around each throughput batch (outside its timing).
    """
    tasks = {kind: app.tasks[TASK_NAMES[kind]] for kind in KINDS}
    results = {kind: KindResult(kind) for kind in KINDS}
    counter = 1_000_000  # distinct arguments across the whole run
    rng = random.Random(seed)
    for kind in KINDS:
        _batch(tasks[kind], counter, WARMUP, worker)
        counter += WARMUP
    for rnd in range(rounds):
        order = list(KINDS)
        rng.shuffle(order)
        for kind in order:
            before = meter.snapshot() if meter is not None else {}
            results[kind].rates.append(_batch(tasks[kind], counter, batch, worker))
            if meter is not None:
                results[kind].cpu.append(meter.per_task(before, meter.snapshot(), batch))
            counter += batch
        log(
            f"  round {rnd + 1}/{rounds}: "
            + ", ".join(f"{k} {results[k].rates[-1]:,.0f} tasks/s" for k in KINDS)
        )
    for _ in range(calls):
        order = list(KINDS)
        rng.shuffle(order)
        for kind in order:
            t0 = time.perf_counter()
            value = _get(tasks[kind].delay(counter), worker, BATCH_TIMEOUT)
            results[kind].latencies.append(time.perf_counter() - t0)
            if value != counter:
                raise AssertionError(f"{kind}({counter}) returned {value!r}")
            counter += 1
    log("  latency: " + ", ".join(f"{k} {1000 * (results[k].latency or 0):.2f} ms" for k in KINDS))
    return results


def _ratios(results: dict[str, KindResult], kind: str = "locked") -> list[float]:
    return [a / b for a, b in zip(results[kind].rates, results["plain"].rates)]


@contextlib.contextmanager
def running_worker(
    locks: Sequence[str],
    log: Callable[[str], None],
    prefix: Sequence[str] = (),
    stop_signal: int = signal.SIGTERM,
    locked_options: Mapping[str, Any] | None = None,
) -> Iterator[tuple[Any, Worker, NodeAddr]]:
    """A broker redis-server and a worker answering tasks: ``(app, worker, broker)``.

    Both are stopped when the block ends, also on errors and Ctrl-C.
    ``locked_options``: extra task options for ``bench.locked`` (profiling).
    """
    from tests.servers import RedisServer

    from . import celery_app

    queue = f"bench-celery-{os.getpid()}"
    logdir = Path(tempfile.mkdtemp(prefix="bench-celery-"))
    broker_server = RedisServer().start()
    worker: Worker | None = None
    app: Any = None
    try:
        broker = NodeAddr(broker_server.host, broker_server.port)
        broker_url = f"redis://{broker.host}:{broker.port}/0"
        backend_url = f"redis://{broker.host}:{broker.port}/1"
        env = dict(os.environ)
        env.update(
            {
                celery_app.BROKER_ENV: broker_url,
                celery_app.BACKEND_ENV: backend_url,
                celery_app.LOCKS_ENV: ",".join(locks),
                celery_app.QUEUE_ENV: queue,
                celery_app.LOCKED_OPTIONS_ENV: json.dumps(dict(locked_options or {})),
                "PYTHONPATH": os.pathsep.join(
                    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
            }
        )
        app = celery_app.make_app(broker_url, backend_url, locks, queue, locked_options)
        worker = Worker(env, queue, logdir, prefix)
        t0 = time.monotonic()
        _get(app.tasks[celery_app.PLAIN].delay(0), worker, START_TIMEOUT)
        log(f"  worker up in {time.monotonic() - t0:.1f} s")
        yield app, worker, broker
    finally:
        if worker is not None:
            worker.stop(stop_signal)
        if app is not None:
            with contextlib.suppress(Exception):
                app.close()
        broker_server.stop()
        shutil.rmtree(logdir, ignore_errors=True)


def run(ctx: Context) -> SuiteResult:
    started = time.monotonic()
    batch, rounds, calls = QUICK if ctx.quick else FULL
    rounds = max(1, min(rounds, ctx.rounds))
    nodes = ctx.nodes[:NODES]
    ctx.log(
        f"celery: worker -P {POOL} -c {CONCURRENCY}; {rounds} rounds x {batch} tasks per kind, "
        f"{calls} round trips per kind"
    )
    with running_worker([n.url for n in nodes], ctx.log) as (app, worker, broker):
        commands_before = _lock_commands_run(nodes)
        meter = CpuMeter(worker, nodes, broker)
        results = measure(app, worker, batch, rounds, calls, ctx.log, meter)
        commands = [b - a for a, b in zip(commands_before, _lock_commands_run(nodes))]
        leftover = _lock_keys([*nodes, broker])

    plain, locked, on_broker = results["plain"], results["locked"], results["broker"]
    ratios = _ratios(results)
    ratio, spread = _median_iqr(ratios)
    broker_ratios = _ratios(results, "broker")
    broker_ratio, broker_spread = _median_iqr(broker_ratios)
    # Every locked run must have locked: an acquire (SET NX) and a release per node.
    locked_runs = WARMUP + len(locked.rates) * batch + len(locked.latencies)
    per_task = min(commands) / locked_runs if commands and locked_runs else None
    added = None
    if plain.latency is not None and locked.latency is not None:
        added = (locked.latency - plain.latency) * 1000

    def row(r: KindResult, label: str) -> list[str]:
        rate, lat = r.rate, r.latency
        return [
            label,
            "-" if rate is None else f"{rate:,.0f}",
            f"{min(r.rates):,.0f}-{max(r.rates):,.0f}" if r.rates else "-",
            "-" if lat is None else f"{lat * 1000:.2f}",
            _quantile_ms(r.latencies, 0.9),
            _quantile_ms(r.latencies, 0.99),
        ]

    table = Table(
        title=(
            f"Celery: trivial tasks through one worker -P {POOL} -c {CONCURRENCY} "
            f"(Redis broker and backend), {rounds} interleaved rounds x {batch} tasks, "
            f"{calls} round trips per kind"
        ),
        columns=[
            "task",
            "tasks/s",
            "range",
            "delay().get() median ms",
            "p90 ms",
            "p99 ms",
        ],
        rows=[
            row(plain, "plain Task"),
            row(locked, "base=RedlockTask (3 lock nodes)"),
            row(on_broker, "base=RedlockTask (the broker's Redis)"),
        ],
        numeric={1, 2, 3, 4, 5},
    )
    cpu_rows: list[list[str]] = []
    totals: dict[str, float] = {}
    lock_servers: dict[str, float] = {}
    for r, label in (
        (plain, "plain Task"),
        (locked, "base=RedlockTask (3 lock nodes)"),
        (on_broker, "base=RedlockTask (the broker's Redis)"),
    ):
        parts = [r.cpu_median(part) for part in CPU_PARTS]
        if any(p is None for p in parts):
            continue
        values = [p for p in parts if p is not None]
        totals[r.kind] = sum(values)
        lock_servers[r.kind] = values[CPU_PARTS.index("lock servers")]
        cpu_rows.append([label, *(f"{v * 1000:.3f}" for v in values), f"{sum(values) * 1000:.3f}"])
    if "plain" in totals and "locked" in totals:
        plain_cpu = [plain.cpu_median(p) or 0.0 for p in CPU_PARTS]
        locked_cpu = [locked.cpu_median(p) or 0.0 for p in CPU_PARTS]
        added_cpu = [b - a for a, b in zip(plain_cpu, locked_cpu)]
        cpu_rows.append(
            [
                "added by the lock (3 lock nodes)",
                *(f"{v * 1000:+.3f}" for v in added_cpu),
                f"{sum(added_cpu) * 1000:+.3f}",
            ]
        )
    cpu_table = Table(
        title="Celery: CPU ms per task by process (median of the throughput rounds)",
        columns=["task", *CPU_PARTS, "total"],
        rows=cpu_rows,
        numeric=set(range(1, len(CPU_PARTS) + 2)),
    )
    cpu_bound = elsewhere = None
    if "plain" in totals and "locked" in totals:
        cpu_bound = totals["plain"] / totals["locked"]
        elsewhere = totals["plain"] / (
            totals["locked"] - lock_servers["locked"] + lock_servers["plain"]
        )
    checks = [
        Check(
            "Celery: locked / plain throughput",
            ratio,
            THROUGHPUT_TARGET,
            spread=spread,
            note="" if ratio is not None else "not measured",
        ),
        Check(
            "Celery: locks on the broker's Redis / plain",
            broker_ratio,
            None,
            spread=broker_spread,
            note="one node: redlock_servers unset, a Redis broker"
            if broker_ratio is not None
            else "not measured",
        ),
        Check("Celery: added latency per task", added, None, at_least=False, unit=" ms"),
        Check(
            "Celery: plain / locked machine CPU per task",
            cpu_bound,
            None,
            note="the throughput ratio if CPU were the only limit",
        ),
        Check(
            "Celery: same, without the lock servers' CPU",
            elsewhere,
            None,
            note="as if the lock nodes ran on other machines",
        ),
        Check(
            "Celery: lock commands per locked task, per node",
            per_task,
            None,
            unit="",
            note="acquire + release: 2 expected" if per_task is not None else "not measured",
        ),
        Check(
            "Celery: lock keys left on the nodes",
            float(sum(leftover)),
            0,
            at_least=False,
            unit="",
        ),
    ]
    notes = [
        f"tasks/s: {batch} calls published with .delay(i) (distinct arguments), then every "
        "result waited for; the ratio is the median of the per-round ratios (IQR shown)",
        "added latency: the median delay().get() round trip of the locked task minus the "
        "plain one's, the kinds interleaved; each locked run adds an acquire (SET NX PX on "
        "each node), a renewal watch, and a release (one EVALSHA per node: GET, DEL, PUBLISH) "
        "before its result",
        "the broker's Redis: the same locked task with its locks on the broker and result "
        "server (one node), as with redlock_servers unset and a Redis broker; the target is "
        "checked on the 3 lock nodes",
        "the publisher, the worker, its 2 children and 4 redis-servers share the machine's "
        "CPUs; CPU per task: this process (publisher and result reader), the worker's main "
        "process and pool children (/proc), the redis-servers (INFO cpu), read around each "
        "throughput batch",
    ]
    return SuiteResult(
        name="celery",
        title="Item 4: Celery tasks with and without RedlockTask",
        tables=[table, cpu_table],
        checks=checks,
        notes=notes,
        data={
            "pool": POOL,
            "concurrency": CONCURRENCY,
            "batch": batch,
            "rounds": rounds,
            "calls": calls,
            "plain_rates": [round(x, 1) for x in plain.rates],
            "locked_rates": [round(x, 1) for x in locked.rates],
            "ratios": [round(x, 4) for x in ratios],
            "broker_rates": [round(x, 1) for x in on_broker.rates],
            "broker_ratios": [round(x, 4) for x in broker_ratios],
            "broker_latency_ms": _rounded_ms(on_broker.latency),
            "plain_latency_ms": _rounded_ms(plain.latency),
            "locked_latency_ms": _rounded_ms(locked.latency),
            "added_latency_ms": None if added is None else round(added, 3),
            "lock_keys_left": leftover,
            "lock_commands_per_node": commands,
            "cpu_ms_per_task": {
                r.kind: [{k: round(v * 1000, 4) for k, v in c.items()} for c in r.cpu]
                for r in (plain, locked, on_broker)
            },
        },
        seconds=time.monotonic() - started,
    )


def _median_iqr(values: Sequence[float]) -> tuple[float | None, tuple[float, float] | None]:
    """The median of ``values`` and, from 4 values on, their interquartile range."""
    if not values:
        return None, None
    if len(values) < 4:
        return statistics.median(values), None
    q1, _, q3 = statistics.quantiles(values, n=4)
    return statistics.median(values), (q1, q3)


def _quantile_ms(values: Sequence[float], share: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000:.2f}"


def _rounded_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _lock_commands_run(nodes: Sequence[NodeAddr]) -> list[int]:
    """SET + EVALSHA + EVAL calls each node has served so far (INFO commandstats)."""
    import redis

    counts = []
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port) as client:
            stats = client.info("commandstats")
        counts.append(
            sum(
                int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                for name in ("set", "evalsha", "eval")
            )
        )
    return counts


def _lock_keys(nodes: Sequence[NodeAddr]) -> list[int]:
    """How many task lock keys (``redlock:bench.*``) each node still holds."""
    import redis

    counts = []
    for node in nodes:
        with redis.Redis(host=node.host, port=node.port) as client:
            counts.append(sum(1 for _ in client.scan_iter(match="redlock:bench.*", count=1000)))
    return counts


SUITE = Suite(
    "celery", "Celery tasks through a prefork worker, with and without RedlockTask", NODES, run
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.celery_tasks``: where a task's CPU goes, or a py-spy profile.

    Starts 3 lock nodes, a broker and the worker, runs ``--tasks`` calls of
    ``--kind`` and prints tasks/s and CPU milliseconds per task of each
    process (publisher, worker main process, pool children, redis-servers).
    With ``--profile OUT`` the worker runs under ``py-spy record
    --subprocesses`` (the pool children too) and is stopped with SIGINT so
    py-spy writes ``OUT``. ``--locked-option NAME=JSON`` sets a task option
    of ``bench.locked`` (``--locked-option redlock_auto_extend=false``).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.celery_tasks")
    parser.add_argument("--kind", choices=KINDS, default="locked")
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument(
        "--locked-option", action="append", default=[], metavar="NAME=JSON",
        help="a task option of bench.locked, e.g. redlock_auto_extend=false",
    )  # fmt: skip
    parser.add_argument("--profile", type=Path, metavar="OUT", help="record with py-spy")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--format", default="raw", choices=("flamegraph", "speedscope", "raw"),
        help="py-spy output format (raw: collapsed stacks, one per line)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    for item in args.locked_option:
        name, _, value = item.partition("=")
        options[name] = json.loads(value)
    prefix: list[str] = []
    if args.profile is not None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.access(spy, os.X_OK):
            raise SystemExit("py-spy not found: pip install py-spy")
        prefix = [
            spy, "record", "--subprocesses", "--rate", str(args.rate),
            "--format", args.format, "--output", str(args.profile.resolve()), "--",
        ]  # fmt: skip
    from tests.servers import RedisNodes

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    servers = RedisNodes(NODES).start()
    stop = signal.SIGINT if prefix else signal.SIGTERM
    try:
        urls = [s.url for s in servers.nodes]
        locks = [NodeAddr(s.host, s.port) for s in servers.nodes]
        with running_worker(urls, log, prefix, stop, options) as (app, worker, broker):
            task = app.tasks[TASK_NAMES[args.kind]]
            _batch(task, 0, WARMUP * 5, worker)
            meter = CpuMeter(worker, locks, broker)
            before = meter.snapshot()
            done = 0
            t0 = time.perf_counter()
            while done < args.tasks:
                count = min(500, args.tasks - done)
                _batch(task, 1_000_000 + done, count, worker)
                done += count
            wall = time.perf_counter() - t0
            used = meter.per_task(before, meter.snapshot(), done)
        extra = f" {json.dumps(options)}" if options else ""
        print(f"{done} {args.kind} tasks{extra}: {done / wall:,.0f} tasks/s")
        if prefix:  # py-spy is the worker's parent: the per-process split would be wrong
            return 0
        for part in CPU_PARTS:
            print(f"  {part:15} {used[part] * 1000:6.3f} ms CPU per task")
        total = sum(used.values()) * 1000
        print(f"  {'total':15} {total:6.3f} ms CPU per task; wall {wall / done * 1000:.3f} ms")
    finally:
        servers.stop()
        if args.profile is not None:
            log(f"wrote {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
