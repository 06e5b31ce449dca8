"""Item 3 of issue 6: hand-off under contention.

Eight waiters, each a separate process (``multiprocessing`` spawn) with its
own client, loop on one resource::

    asked = time.monotonic()
    acquire(resource, ttl, wait=W)      # blocks until it holds the lock
    acquired = time.monotonic()
    sleep(HOLD)                         # 2 ms of "work"
    released = time.monotonic()         # the hand-off starts here ...
    release()
    sleep(pause)                        # 0, or PAUSE in the "+pause" cases

and send their stamps back. ``time.monotonic()`` is CLOCK_MONOTONIC, one
clock for every process on the machine (Linux), so the stamps of all waiters
can be merged and sorted. The hand-off latency is the next holder's
``acquired`` minus the previous holder's ``released`` (the time of the
release call, so it includes the release's own round trip), counted when the
next holder is another waiter. A waiter that takes the lock again right after
its own release (nothing stops it: it asks first, while the others are still
being woken) is counted apart, as "same waiter again". Fairness is the fewest
acquisitions of a waiter over the most (1.0: all equal; 0: one starved); the
wait is how long one acquire call blocked (its p99 shows a waiter that keeps
losing the race).

Cases, run in interleaved rounds (a new order each round):

- ``ours-wake``: celery_redlock, 3 nodes, ``acquire(..., wait=W)``: a waiter
  is woken by the release (the release script publishes the key; see
  ``celery_redlock/_wakeup.py``), polling at ``retry_delay`` is the fallback;
- ``ours-poll``: the same with the wake-up disabled in the waiter processes
  (each manager's ``Listener.register`` returns an event nobody sets), so it
  polls every ``retry_delay`` (the default, 0.2 s): what the wake-up buys;
- ``ours-threads``: 8 threads in one process sharing one ``Redlock`` (one
  manager per process, as in a Celery worker);
- ``pottery``: ``pottery.Redlock(...).acquire(blocking=True, timeout=W)``,
  3 nodes (it sleeps a random 0-0.2 s between attempts);
- ``python-redis-lock``: ``redis_lock.Lock(...).acquire(blocking=True,
  timeout=W)``, 1 node (a release pushes to a signal list that one waiter
  BLPOPs);
- the same with ``+pause``: each waiter sleeps :data:`PAUSE` after its
  release, so the releaser is not competing when the lock is handed off and
  the hand-off is the waiters' own.

The waiter processes are started once and run every case, each case on a key
of its own; a process has one celery_redlock manager with the wake-up and one
without, shared by the cases of that kind (so one set of listener threads per
process, as in real use).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import multiprocessing
import random
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .core import Check, Context, NodeAddr, Suite, SuiteResult, Table

__all__ = ["CASES", "HOLD", "SUITE", "WAITERS", "HandoffCase", "HandoffResult", "analyse"]

#: Waiter processes (and threads in the threaded case).
WAITERS = 8
#: Seconds each holder keeps the lock.
HOLD = 0.002
#: The lock's TTL (seconds): far above anything a round does.
TTL = 10.0
#: The most seconds one acquire may block (``wait=``, ``timeout=``).
WAIT = 5.0
#: Seconds after the end of a round a blocked waiter still waits.
GRACE = 0.02
#: Nodes the suite needs (python-redis-lock uses the first).
NODES = 3
#: Targets from issue 6.
MEDIAN_TARGET_MS = 5.0
FAIRNESS_TARGET = 0.5

#: Seconds per case per round, and rounds (full run; --quick uses the second pair).
FULL_SECONDS, FULL_ROUNDS = 1.5, 6
QUICK_SECONDS, QUICK_ROUNDS = 0.25, 1
#: Untimed seconds per case before the first round (connections, scripts, listeners).
WARMUP_SECONDS, QUICK_WARMUP_SECONDS = 0.3, 0.05

#: (waiter, asked, acquired, released): one acquisition.
Stamp = tuple[int, float, float, float]


@dataclass(frozen=True)
class HandoffCase:
    key: str
    label: str
    #: the client: "ours-wake", "ours-poll", "pottery", "python-redis-lock"
    kind: str
    nodes: int
    #: seconds a waiter sleeps after its release before it asks again (0: at once)
    pause: float = 0.0
    #: "process": one waiter per process; "threads": WAITERS threads in one process
    mode: str = "process"
    #: a module the case imports (a peer); skipped when missing
    requires: str | None = None


#: Seconds the "pause" cases sleep after a release: the releaser is not
#: competing when the lock is handed off, so the hand-off is the waiters' alone.
PAUSE = 0.005

CASES: tuple[HandoffCase, ...] = (
    HandoffCase("ours-wake", "ours, woken by the release", "ours-wake", 3),
    HandoffCase("ours-poll", "ours, polling only", "ours-poll", 3),
    HandoffCase("ours-threads", "ours, 8 threads in 1 process", "ours-wake", 3, mode="threads"),
    HandoffCase("pottery", "pottery", "pottery", 3, requires="pottery"),
    HandoffCase(
        "python-redis-lock", "python-redis-lock", "python-redis-lock", 1, requires="redis_lock"
    ),
    HandoffCase("ours-wake+pause", "ours, woken by the release", "ours-wake", 3, PAUSE),
    HandoffCase("ours-poll+pause", "ours, polling only", "ours-poll", 3, PAUSE),
    HandoffCase("pottery+pause", "pottery", "pottery", 3, PAUSE, requires="pottery"),
    HandoffCase(
        "python-redis-lock+pause",
        "python-redis-lock",
        "python-redis-lock",
        1,
        PAUSE,
        requires="redis_lock",
    ),
)


# --------------------------------------------------------------------------
# In the waiter processes


class _Locker:
    """One client's way to take and give back the case's lock (blocking)."""

    def acquire(self, wait: float) -> bool:
        """Block up to ``wait`` seconds for the lock; False when not had in time."""
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Close connections."""


class _Ours(_Locker):
    def __init__(self, manager: Any, resource: str) -> None:
        self.manager = manager
        self.resource = resource
        self.lock: Any = None

    def acquire(self, wait: float) -> bool:
        from celery_redlock import LockNotAcquired

        try:
            self.lock = self.manager.acquire(self.resource, TTL, wait=wait)
        except LockNotAcquired:
            return False
        return True

    def release(self) -> None:
        if not self.manager.release(self.lock):
            raise AssertionError(f"{self.resource}: released a lock it did not hold")


def _our_manager(nodes: Sequence[NodeAddr], wake: bool) -> Any:
    from celery_redlock import Redlock

    manager = Redlock([n.url for n in nodes], logger=None)
    if not wake:
        # No wake-up: every registration gets an event nobody sets (and no
        # listener thread starts), so a waiter polls every retry_delay.
        listener: Any = manager._listener
        listener.register = lambda key: threading.Event()
    return manager


class _Pottery(_Locker):
    def __init__(self, nodes: Sequence[NodeAddr], resource: str) -> None:
        import pottery
        import redis

        self.clients = [redis.Redis(host=n.host, port=n.port) for n in nodes]
        self.lock = pottery.Redlock(key=resource, masters=set(self.clients), auto_release_time=TTL)

    def acquire(self, wait: float) -> bool:
        return bool(self.lock.acquire(blocking=True, timeout=wait))

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        for client in self.clients:
            client.close()


class _PythonRedisLock(_Locker):
    def __init__(self, nodes: Sequence[NodeAddr], resource: str) -> None:
        import redis
        import redis_lock

        self.client = redis.Redis(host=nodes[0].host, port=nodes[0].port)
        self.lock = redis_lock.Lock(self.client, resource, expire=int(TTL))

    def acquire(self, wait: float) -> bool:
        # Whole seconds only (and 0 would mean "the lock's expire"): at least 1 s. A
        # waiter is woken by each release, so the round's end costs no more than that.
        return bool(self.lock.acquire(blocking=True, timeout=max(1, math.ceil(wait))))

    def release(self) -> None:
        self.lock.release()

    def close(self) -> None:
        self.client.close()


def _loop(
    locker: _Locker, who: int, start_at: float, stop_at: float, pause: float, out: list[Stamp]
) -> None:
    """Take, hold, release (then pause) until ``stop_at``; one stamp per acquisition.

    A waiter still blocked at the end gives up ``GRACE`` seconds after
    ``stop_at`` (nothing after ``stop_at`` is counted), so pollers do not
    stretch the round; one not served in ``WAIT`` seconds before that fails
    the case.
    """
    wait = start_at - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    monotonic, sleep = time.monotonic, time.sleep
    while monotonic() < stop_at:
        asked = monotonic()
        if not locker.acquire(min(WAIT, stop_at + GRACE - asked)):
            if monotonic() < stop_at:
                raise TimeoutError(f"waiter {who}: no lock in {WAIT:g} s")
            out.append((who, asked, math.inf, math.inf))  # still waiting at the end
            return
        acquired = monotonic()
        sleep(HOLD)
        released = monotonic()
        locker.release()
        out.append((who, asked, acquired, released))
        if pause:
            sleep(pause)


def _threads(
    manager: Any, resource: str, start_at: float, stop_at: float, pause: float
) -> list[Stamp]:
    """The threaded case: WAITERS threads sharing ``manager``, in this process."""
    outs: list[list[Stamp]] = [[] for _ in range(WAITERS)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            _loop(_Ours(manager, resource), i, start_at, stop_at, pause, outs[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(WAITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [stamp for out in outs for stamp in out]


class _Clients:
    """A waiter process's clients, made on first use and kept for every round.

    One celery_redlock manager with the wake-up and one without per process,
    shared by the cases of that kind (as a process shares its manager), so
    each process has one set of listener threads, as in real use.
    """

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        self.nodes = nodes
        self.managers: dict[bool, Any] = {}
        self.lockers: dict[str, _Locker] = {}

    def manager(self, wake: bool) -> Any:
        if wake not in self.managers:
            self.managers[wake] = _our_manager(self.nodes[:NODES], wake)
        return self.managers[wake]

    def locker(self, case: HandoffCase) -> _Locker:
        made = self.lockers.get(case.key)
        if made is None:
            resource, nodes = _resource(case.key), self.nodes[: case.nodes]
            if case.kind in ("ours-wake", "ours-poll"):
                made = _Ours(self.manager(case.kind == "ours-wake"), resource)
            elif case.kind == "pottery":
                made = _Pottery(nodes, resource)
            elif case.kind == "python-redis-lock":
                made = _PythonRedisLock(nodes, resource)
            else:
                raise ValueError(f"unknown hand-off case kind {case.kind!r}")
            self.lockers[case.key] = made
        return made

    def run(self, case: HandoffCase, who: int, start_at: float, stop_at: float) -> list[Stamp]:
        if case.mode == "threads":
            manager = self.manager(case.kind == "ours-wake")
            return _threads(manager, _resource(case.key), start_at, stop_at, case.pause)
        stamps: list[Stamp] = []
        _loop(self.locker(case), who, start_at, stop_at, case.pause, stamps)
        return stamps

    def close(self) -> None:
        for made in [*self.lockers.values(), *self.managers.values()]:
            with contextlib.suppress(Exception):
                made.close()


def _resource(case: str) -> str:
    return f"bench:handoff:{case}"


def _waiter_main(index: int, conn: Connection, nodes: list[tuple[str, int]]) -> None:
    """A waiter process: runs the cases the parent sends until told to stop.

    Messages in: ``("run", case, start_at, stop_at)`` or ``("stop",)``.
    Out: ``("ok", stamps)`` or ``("error", text)``.
    """
    clients = _Clients([NodeAddr(host, port) for host, port in nodes])
    try:
        while True:
            message = conn.recv()
            if message[0] != "run":
                break
            _, case, start_at, stop_at = message
            try:
                conn.send(("ok", clients.run(case, index, start_at, stop_at)))
            except Exception as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                conn.send(("error", f"{type(exc).__name__}: {exc} (at {where.name})"))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        clients.close()


# --------------------------------------------------------------------------
# In the benchmark process


@dataclass
class HandoffResult:
    case: HandoffCase
    #: seconds to another waiter, pooled over rounds
    handoffs: list[float] = field(default_factory=list)
    #: per-round median hand-off (seconds)
    round_medians: list[float] = field(default_factory=list)
    #: per-round fairness (fewest / most acquisitions of a waiter in that round)
    round_fairness: list[float] = field(default_factory=list)
    #: seconds each acquire call blocked, pooled over rounds
    waits: list[float] = field(default_factory=list)
    #: acquisitions per waiter, summed over rounds
    counts: list[int] = field(default_factory=lambda: [0] * WAITERS)
    #: the previous holder took the lock again
    same_again: int = 0
    #: measured seconds (rounds x seconds per round)
    seconds: float = 0.0
    skipped: str = ""

    @property
    def key(self) -> str:
        return self.case.key

    @property
    def acquisitions(self) -> int:
        return sum(self.counts)

    @property
    def fairness(self) -> float | None:
        most = max(self.counts)
        return min(self.counts) / most if most else None

    @property
    def same_share(self) -> float | None:
        total = self.same_again + len(self.handoffs)
        return self.same_again / total if total else None

    def percentile(self, share: float) -> float | None:
        """The ``share`` quantile of the hand-offs (nearest rank), or None."""
        return _quantile(self.handoffs, share)

    def wait_percentile(self, share: float) -> float | None:
        """The ``share`` quantile of the time an acquire call blocked, or None."""
        return _quantile(self.waits, share)

    @property
    def median(self) -> float | None:
        return statistics.median(self.handoffs) if self.handoffs else None


def _quantile(values: Sequence[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def analyse(result: HandoffResult, stamps: Sequence[Stamp], stop_at: float) -> None:
    """Add one round's stamps (every waiter's, in any order) to ``result``.

    Only what happened while every waiter was still in its loop counts:
    acquisitions before ``stop_at``, and hand-offs whose release was before it.
    A waiter still blocked at ``stop_at`` (its lock came later, or never: an
    infinite ``acquired``) adds the time it had waited by then, so a waiter that
    starves shows in the wait percentiles although it has no acquisition.
    """
    ordered = sorted((s for s in stamps if s[2] != math.inf), key=lambda s: s[2])
    handoffs: list[float] = []
    counts = [0] * len(result.counts)
    for who, asked, acquired, _ in stamps:
        if acquired < stop_at:
            counts[who] += 1
            result.waits.append(acquired - asked)
        elif asked < stop_at:
            result.waits.append(stop_at - asked)
    result.counts = [a + b for a, b in zip(result.counts, counts)]
    if max(counts):
        result.round_fairness.append(min(counts) / max(counts))
    for (who, _, _, released), (nxt, _, acquired, _) in itertools.pairwise(ordered):
        if released >= stop_at:
            break
        if nxt == who:
            result.same_again += 1
        else:
            handoffs.append(acquired - released)
    result.handoffs.extend(handoffs)
    if handoffs:
        result.round_medians.append(statistics.median(handoffs))


class _Pool:
    """The waiter processes; always stopped by :meth:`close`."""

    def __init__(self, nodes: Sequence[NodeAddr]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        spec = [(n.host, n.port) for n in nodes]
        try:
            for i in range(WAITERS):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_waiter_main,
                    args=(i, child, spec),
                    name=f"handoff-waiter-{i}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def run(self, case: HandoffCase, seconds: float) -> tuple[list[Stamp], float, str]:
        """Run ``case`` on every waiter (process 0 only for threads): stamps, stop_at, error."""
        # Time for every process to get the message before the start.
        start_at = time.monotonic() + 0.05
        stop_at = start_at + seconds
        conns = self.conns[:1] if case.mode == "threads" else self.conns
        for conn in conns:
            conn.send(("run", case, start_at, stop_at))
        stamps: list[Stamp] = []
        errors: list[str] = []
        for i, conn in enumerate(conns):
            # A waiter blocked in acquire at stop_at gets the lock within WAIT;
            # the first run also waits for the spawned processes' imports.
            if not conn.poll(max(0.0, stop_at - time.monotonic()) + WAIT + 60):
                raise RuntimeError(f"hand-off waiter {i} did not answer ({case.key})")
            status, payload = conn.recv()
            if status == "ok":
                stamps.extend(payload)
            else:
                errors.append(f"waiter {i}: {payload}")
        return stamps, stop_at, "; ".join(errors[:2])

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        for conn in self.conns:
            conn.close()


def _available(case: HandoffCase) -> str:
    if case.requires is None:
        return ""
    try:
        found = importlib.util.find_spec(case.requires) is not None
    except (ImportError, ValueError):
        found = False
    return "" if found else f"not installed ({case.requires})"


def measure(
    nodes: Sequence[NodeAddr],
    cases: Sequence[HandoffCase],
    rounds: int,
    seconds: float,
    log: Callable[[str], None],
    warmup: float = WARMUP_SECONDS,
    seed: int = 6,
) -> list[HandoffResult]:
    """Interleaved rounds of every case on one pool of waiter processes.

    Each round runs every case for ``seconds``, in a new random order.
    """
    results = [HandoffResult(c) for c in cases]
    for result in results:
        result.skipped = _available(result.case)
        if result.skipped:
            log(f"  {result.key}: skipped, {result.skipped}")
    pool = _Pool(nodes)

    def one(result: HandoffResult, length: float) -> tuple[list[Stamp], float] | None:
        stamps, stop_at, error = pool.run(result.case, length)
        if not error:
            return stamps, stop_at
        result.skipped = f"failed: {error}"
        log(f"  {result.key}: {result.skipped}")
        return None

    try:
        for result in results:  # connect, load scripts, start listeners: not counted
            if not result.skipped:
                one(result, warmup)
        shuffle = random.Random(seed).shuffle
        for rnd in range(rounds):
            order = [r for r in results if not r.skipped]
            shuffle(order)
            for result in order:
                got = one(result, seconds)
                if got is not None:
                    analyse(result, *got)
                    result.seconds += seconds
            log(
                f"  round {rnd + 1}/{rounds} (median ms): "
                + ", ".join(
                    f"{r.key} {_ms(r.round_medians[-1])}"
                    for r in results
                    if r.round_medians and not r.skipped
                )
            )
    finally:
        pool.close()
    return results


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _spread_ms(values: Sequence[float]) -> tuple[float, float] | None:
    if len(values) < 4:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1 * 1000, q3 * 1000


COLUMNS = [
    "case",
    "nodes",
    "hand-offs",
    "median ms",
    "p99 ms",
    "same waiter again",
    "acq/s",
    "wait p50 ms",
    "wait p99 ms",
    "acq per waiter",
    "min/max",
]


def _row(r: HandoffResult) -> list[str]:
    label = f"{r.case.label} ({r.key})"
    if r.skipped or not r.acquisitions:
        blank = [""] * (len(COLUMNS) - 3)
        return [label, str(r.case.nodes), "skipped: " + (r.skipped or "no data"), *blank]
    fairness, same = r.fairness, r.same_share
    return [
        label,
        str(r.case.nodes),
        f"{len(r.handoffs):,}",
        _ms(r.median),
        _ms(r.percentile(0.99)),
        "-" if same is None else f"{100 * same:.0f}%",
        f"{r.acquisitions / r.seconds:,.0f}" if r.seconds else "-",
        _ms(r.wait_percentile(0.5)),
        _ms(r.wait_percentile(0.99)),
        f"{min(r.counts):,}-{max(r.counts):,}",
        "-" if fairness is None else f"{fairness:.2f}",
    ]


def _median_check(r: HandoffResult | None, name: str, target: float | None) -> Check:
    value = None if r is None or r.skipped else r.median
    note = ""
    if value is None:
        note = "not measured" if r is None else r.skipped or "the releaser always took it back"
    return Check(
        name,
        None if value is None else value * 1000,
        target,
        at_least=False,
        unit=" ms",
        note=note or "",
        spread=None if r is None else _spread_ms(r.round_medians),
    )


def _fairness_check(r: HandoffResult | None, name: str, target: float | None) -> Check:
    """Over the whole run; the IQR is that of the rounds' own min/max (shorter windows)."""
    value = None if r is None or r.skipped else r.fairness
    spread = None
    if r is not None and len(r.round_fairness) >= 4:
        q1, _, q3 = statistics.quantiles(r.round_fairness, n=4)
        spread = (q1, q3)
    note = "" if value is not None else "not measured"
    return Check(name, value, target, unit="", note=note, spread=spread)


def _ratio_check(
    a: HandoffResult | None,
    b: HandoffResult | None,
    name: str,
    share: float = 0.5,
    waits: bool = False,
) -> Check:
    """a's hand-off (or, with ``waits``, wait) quantile ``share`` over b's."""

    def quantile(r: HandoffResult | None) -> float | None:
        if r is None or r.skipped:
            return None
        return r.wait_percentile(share) if waits else r.percentile(share)

    x, y = quantile(a), quantile(b)
    value = x / y if x and y else None
    return Check(name, value, None, note="" if value is not None else "not measured")


def run(ctx: Context) -> SuiteResult:
    started = time.monotonic()
    seconds, rounds = (QUICK_SECONDS, QUICK_ROUNDS) if ctx.quick else (FULL_SECONDS, FULL_ROUNDS)
    rounds = max(1, min(rounds, ctx.rounds))
    ctx.log(
        f"handoff: {len(CASES)} cases x {rounds} rounds x {seconds:g} s, "
        f"{WAITERS} waiters, hold {HOLD * 1000:g} ms"
    )
    warmup = QUICK_WARMUP_SECONDS if ctx.quick else WARMUP_SECONDS
    results = measure(ctx.nodes[:NODES], CASES, rounds, seconds, ctx.log, warmup)
    by_key = {r.key: r for r in results}
    get = by_key.get
    title = (
        f"{WAITERS} waiters on one resource, hold {HOLD * 1000:g} ms, "
        f"{rounds} interleaved rounds x {seconds:g} s per case"
    )
    tables = [
        Table(
            title=f"Hand-off, waiters ask again at once after their release: {title}",
            columns=COLUMNS,
            rows=[_row(r) for r in results if not r.case.pause],
            numeric=set(range(1, len(COLUMNS))),
        ),
        Table(
            title=(
                f"Hand-off, waiters pause {PAUSE * 1000:g} ms after their release "
                f"(the releaser is not competing): {title}"
            ),
            columns=COLUMNS,
            rows=[_row(r) for r in results if r.case.pause],
            numeric=set(range(1, len(COLUMNS))),
        ),
    ]
    wake, poll = get("ours-wake"), get("ours-poll")
    wake_p, poll_p = get("ours-wake+pause"), get("ours-poll+pause")
    checks = [
        _median_check(wake, "hand-off median, ours woken by the release", MEDIAN_TARGET_MS),
        _fairness_check(wake, "fairness min/max, ours woken by the release", FAIRNESS_TARGET),
        _median_check(poll, "hand-off median, ours polling only", None),
        _fairness_check(poll, "fairness min/max, ours polling only", None),
        _median_check(get("ours-threads"), "hand-off median, ours 8 threads", None),
        _fairness_check(get("ours-threads"), "fairness min/max, ours 8 threads", None),
        _median_check(wake_p, f"hand-off median, ours woken, {PAUSE * 1000:g} ms pause", None),
        _fairness_check(wake_p, f"fairness min/max, ours woken, {PAUSE * 1000:g} ms pause", None),
        _ratio_check(poll, wake, "what the wake-up buys: wait p99, polling / woken", 0.99, True),
        _ratio_check(
            poll_p, wake_p, "what the wake-up buys: wait p99, polling / woken, pause", 0.99, True
        ),
        _ratio_check(get("pottery"), wake, "median pottery / ours woken"),
        _ratio_check(get("python-redis-lock"), wake, "median python-redis-lock / ours woken"),
    ]
    notes = [
        "hand-off: the next holder's acquisition minus the previous holder's release call "
        "(time.monotonic(), one clock for all processes) when the next holder is another "
        "waiter; 'same waiter again': the releaser asked again first and took the lock "
        "back (not a hand-off, not in the latencies); wait: how long an acquire call "
        "blocked (one still blocked at the end of a round counts what it had waited "
        "by then); min/max: the fewest acquisitions of a waiter over the most, whole run",
        f"each waiter is a process with its own client (ours-threads: {WAITERS} threads "
        f"sharing one Redlock); acquire with wait/timeout up to {WAIT:g} s, TTL {TTL:g} s; "
        "median and p99 pooled over the rounds; the checks' IQR is that of the per-round "
        "medians (latency) or of the per-round min/max (fairness)",
        "polling only: celery_redlock with the wake-up disabled in the waiters (an event "
        "nobody sets), polling every retry_delay (0.2 s, the default); pottery sleeps a "
        "random 0-0.2 s between attempts; python-redis-lock (1 node) wakes one waiter per "
        "release (BLPOP on a signal list, served in order)",
    ]
    return SuiteResult(
        name="handoff",
        title="Item 3: hand-off under contention (8 waiters)",
        tables=tables,
        checks=checks,
        notes=notes,
        data={
            "waiters": WAITERS,
            "hold": HOLD,
            "pause": PAUSE,
            "ttl": TTL,
            "wait": WAIT,
            "rounds": rounds,
            "seconds_per_round": seconds,
            "cases": [_case_data(r) for r in results],
        },
        seconds=time.monotonic() - started,
    )


def _rounded_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _case_data(r: HandoffResult) -> dict[str, Any]:
    return {
        "key": r.key,
        "label": r.case.label,
        "kind": r.case.kind,
        "nodes": r.case.nodes,
        "mode": r.case.mode,
        "pause": r.case.pause,
        "skipped": r.skipped or None,
        "handoffs": len(r.handoffs),
        "median_ms": _rounded_ms(r.median),
        "p90_ms": _rounded_ms(r.percentile(0.9)),
        "p99_ms": _rounded_ms(r.percentile(0.99)),
        "round_medians_ms": [round(x * 1000, 3) for x in r.round_medians],
        "round_fairness": [round(x, 3) for x in r.round_fairness],
        "wait_p50_ms": _rounded_ms(r.wait_percentile(0.5)),
        "wait_p99_ms": _rounded_ms(r.wait_percentile(0.99)),
        "counts": r.counts,
        "acquisitions": r.acquisitions,
        "fairness": r.fairness,
        "same_again": r.same_again,
        "seconds": r.seconds,
    }


SUITE = Suite(
    "handoff", "hand-off under contention: 8 waiters, wake-up vs polling, peers", NODES, run
)
