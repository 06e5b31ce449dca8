"""The harness: what a suite gets, what it returns, and the interleaved runner.

A suite (``cycles.py``, ``memory.py``; ``handoff.py`` and ``celery_tasks.py``
later) is a :class:`Suite`: a name, how many Redis nodes it needs, and a
``run(ctx)`` that returns a :class:`SuiteResult` made of tables (for the
console and the README) and :class:`Check`\\ s (a measured value against a
target from issue 6). The report module renders any suite the same way, so a
new suite only has to be listed in ``benchmarks.SUITE_MODULES``.

Measuring on a shared 2-core machine is noisy, so speed is never read from a
single run: :func:`run_interleaved` runs every case once per round, a short
block of cycles each, in a new random order every round (A B C, C A B, B C A,
...: no case always follows the same neighbour), for many rounds. A ratio is
the median of the ratios taken within each round (both sides measured within
a second of each other), reported with its quartiles so the noise shows.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Case",
    "CaseResult",
    "Check",
    "Context",
    "NodeAddr",
    "Runner",
    "Suite",
    "SuiteResult",
    "Table",
    "median_ratio",
    "ratio_quartiles",
    "run_interleaved",
]


@dataclass(frozen=True)
class NodeAddr:
    """One redis-server the benchmarks may use (never the shared one on 6379)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


@dataclass
class Context:
    """What every suite gets from ``python -m benchmarks``."""

    nodes: list[NodeAddr]
    #: lock+release cycles per case per round
    cycles: int
    #: interleaved rounds; every speed figure is the median over them
    rounds: int
    #: cycles of the long memory/keys run (item 5)
    soak_cycles: int
    quick: bool = False
    #: progress lines go here (stderr), results go to the report
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))


@dataclass
class Check:
    """One measured figure against its target (None: reported, no target)."""

    name: str
    value: float | None
    target: float | None = None
    #: True: the value must be >= target; False: <= target
    at_least: bool = True
    unit: str = "x"
    note: str = ""
    #: the first and third quartiles of the per-round values, when there are rounds
    spread: tuple[float, float] | None = None

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        if self.target is None:
            return "info"
        ok = self.value >= self.target if self.at_least else self.value <= self.target
        return "PASS" if ok else "MISS"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.at_least else '<='} {self.target:g}{self.unit}"

    def value_text(self) -> str:
        if self.value is None:
            return "-"
        if not self.unit and float(self.value).is_integer():
            return f"{self.value:,.0f}"
        return f"{self.value:.2f}{self.unit}"

    def spread_text(self) -> str:
        if self.spread is None:
            return ""
        return f"{self.spread[0]:.2f}-{self.spread[1]:.2f}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status
        return data


@dataclass
class Table:
    """Rows of already formatted cells; ``title`` heads it in every format."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    #: columns to right-align (numbers)
    numeric: set[int] = field(default_factory=set)


@dataclass
class SuiteResult:
    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the raw figures, for --json
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    #: how many nodes ctx.nodes must hold
    nodes: int
    run: Callable[[Context], SuiteResult]


# --------------------------------------------------------------------------
# Cases and the interleaved runner


class Runner:
    """A prepared case: ``cycle()`` does one lock+release; ``close()`` cleans up."""

    def cycle(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close connections (and anything the case started)."""


@dataclass(frozen=True)
class Case:
    """One line of a speed table.

    ``setup(nodes)`` gets the first ``nodes`` addresses and returns a
    :class:`Runner`. ``requires`` names a module the case imports (a peer
    library); when it is missing the case is skipped, not failed.
    ``scale`` shrinks the cycle count for very slow peers (rates are per
    second, so the figure stays comparable; only the run is shorter).
    """

    key: str
    label: str
    nodes: int
    setup: Callable[[Sequence[NodeAddr]], Runner]
    requires: str | None = None
    scale: float = 1.0


@dataclass
class CaseResult:
    key: str
    label: str
    nodes: int
    cycles: int
    #: cycles/s, one per round, in round order
    rates: list[float] = field(default_factory=list)
    #: client CPU seconds per cycle (process_time), one per round
    cpu: list[float] = field(default_factory=list)
    #: the redis-servers' CPU seconds per cycle, summed over the case's nodes, per round
    server_cpu: list[float] = field(default_factory=list)
    skipped: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu) if self.cpu else None

    @property
    def server_cpu_median(self) -> float | None:
        return statistics.median(self.server_cpu) if self.server_cpu else None


def _time_cycles(runner: Runner, count: int) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) for ``count`` cycles."""
    cycle = runner.cycle
    loop = range(count)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for _ in loop:
        cycle()
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    return t1 - t0, cpu1 - cpu0


def run_interleaved(
    cases: Sequence[Case],
    nodes: Sequence[NodeAddr],
    cycles: int,
    rounds: int,
    log: Callable[[str], None],
    warmup: int | None = None,
    server_cpu: Callable[[Sequence[NodeAddr]], float] | None = None,
    seed: int = 6,
) -> list[CaseResult]:
    """Run every case ``rounds`` times, interleaved, ``cycles`` cycles each time.

    Each round runs the cases in a new order (shuffled with ``seed``), so no
    case always follows the same neighbour. ``server_cpu(nodes)``, when given, reads the servers'
    CPU counters before and after each timed block (outside the timing).
    Returns one :class:`CaseResult` per case, in case order.
    """
    results = [CaseResult(c.key, c.label, c.nodes, max(1, int(cycles * c.scale))) for c in cases]
    runners: list[Runner | None] = []
    try:
        for case, result in zip(cases, results):
            runners.append(_prepare(case, result, nodes, warmup, log))
        live = [i for i, r in enumerate(runners) if r is not None]
        shuffle = random.Random(seed).shuffle
        for rnd in range(rounds):
            order = list(live)
            shuffle(order)
            gc.collect()
            for i in order:
                runner, result = runners[i], results[i]
                assert runner is not None
                used = nodes[: result.nodes]
                before = server_cpu(used) if server_cpu is not None else 0.0
                wall, cpu = _time_cycles(runner, result.cycles)
                result.rates.append(result.cycles / wall)
                result.cpu.append(cpu / result.cycles)
                if server_cpu is not None:
                    result.server_cpu.append((server_cpu(used) - before) / result.cycles)
            if rnd + 1 == rounds or (rnd + 1) % max(1, rounds // 5) == 0:
                log(
                    f"  round {rnd + 1}/{rounds}: "
                    + ", ".join(f"{results[i].key} {results[i].rates[-1]:,.0f}" for i in live)
                )
    finally:
        for runner in runners:
            if runner is not None:
                runner.close()
    return results


def _prepare(
    case: Case,
    result: CaseResult,
    nodes: Sequence[NodeAddr],
    warmup: int | None,
    log: Callable[[str], None],
) -> Runner | None:
    if case.requires is not None:
        try:
            __import__(case.requires)
        except ImportError as exc:
            result.skipped = f"not installed ({exc.name or case.requires})"
            log(f"  {case.key}: skipped, {result.skipped}")
            return None
    if len(nodes) < case.nodes:
        result.skipped = f"needs {case.nodes} nodes, have {len(nodes)}"
        return None
    runner = case.setup(nodes[: case.nodes])
    try:
        # Connect, load scripts, warm caches; also proves the case really locks.
        for _ in range(warmup if warmup is not None else min(200, max(5, result.cycles))):
            runner.cycle()
    except BaseException:
        runner.close()
        raise
    return runner


def _ratios(a: CaseResult, b: CaseResult, invert: bool) -> list[float]:
    return [(y / x) if invert else (x / y) for x, y in zip(a.rates, b.rates)]


def median_ratio(a: CaseResult, b: CaseResult, invert: bool = False) -> float | None:
    """Median over rounds of a.rate / b.rate (or b / a with ``invert``)."""
    if not a.rates or not b.rates:
        return None
    return statistics.median(_ratios(a, b, invert))


def ratio_quartiles(
    a: CaseResult, b: CaseResult, invert: bool = False
) -> tuple[float, float] | None:
    """First and third quartiles of the per-round ratios (None under 4 rounds)."""
    ratios = _ratios(a, b, invert)
    if len(ratios) < 4:
        return None
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3
