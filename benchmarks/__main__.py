"""``python -m benchmarks``: start throwaway Redis nodes, run the suites, report.

Run from the repository root (it imports ``tests.servers`` to start the
nodes, and ``celery_redlock`` from the working tree or the installed package).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from . import SUITE_MODULES
from .core import Context, NodeAddr, Suite, SuiteResult
from .machine import describe, summary
from .report import as_json, as_markdown, as_readme, as_text, replace_block

FULL = {"cycles": 200, "rounds": 100, "soak_cycles": 20000}
QUICK = {"cycles": 100, "rounds": 5, "soak_cycles": 2000}


def load_suites(names: Sequence[str] | None = None) -> list[Suite]:
    """The registered suites, in order; only ``names`` when given."""
    suites = [importlib.import_module(m).SUITE for m in SUITE_MODULES]
    if not names:
        return suites
    known = {s.name: s for s in suites}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; known: {', '.join(known)}")
    return [s for s in suites if s.name in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="celery_redlock against raw redis-py and its peers, side by side "
        "(issue 6). Starts its own redis-server nodes; never touches port 6379.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small counts for a smoke run (defaults become {QUICK})",
    )
    parser.add_argument(
        "--cycles", type=int, help=f"cycles per case per round, one block ({FULL['cycles']})"
    )
    parser.add_argument("--rounds", type=int, help=f"interleaved rounds ({FULL['rounds']})")
    parser.add_argument(
        "--soak-cycles", type=int, help=f"cycles of the memory/keys run ({FULL['soak_cycles']})"
    )
    parser.add_argument(
        "--suite",
        action="append",
        metavar="NAME",
        help="run only this suite (repeatable); see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    parser.add_argument(
        "--markdown", type=Path, metavar="PATH", help="write the README tables (markdown)"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        metavar="PATH",
        help="write the targets table between the <!-- bench-table --> marks of PATH",
    )
    parser.add_argument(
        "--fail-on-miss", action="store_true", help="exit 1 when a target is missed"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, default in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _busy(machine: dict[str, object]) -> str:
    """A warning when other work shared the CPUs (the ratios between node counts suffer)."""
    load, cpus = machine.get("loadavg"), machine.get("nproc")
    if not isinstance(load, list) or not isinstance(cpus, int) or cpus < 1:
        return ""
    if load[0] <= cpus / 2:
        return ""
    return (
        f"WARNING: load {load[0]:.2f} on {cpus} CPUs before the run: other processes "
        "competed for the CPUs, so cycles/s are low and ratios between node counts are "
        "skewed; rerun on an idle machine for the README table"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    suites = load_suites(args.suite)
    if args.list:
        for suite in load_suites():
            print(f"{suite.name:10} {suite.title} ({suite.nodes} nodes)")
        return 0

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    from tests.servers import RedisNodes

    count = max(s.nodes for s in suites)
    began = time.monotonic()
    log(f"starting {count} redis-server nodes")
    servers = RedisNodes(count).start()
    try:
        nodes = [NodeAddr(s.host, s.port) for s in servers.nodes]
        machine = describe(nodes)
        ctx = Context(nodes, args.cycles, args.rounds, args.soak_cycles, args.quick, log)
        results: list[SuiteResult] = []
        for suite in suites:
            results.append(suite.run(ctx))
    finally:
        servers.stop()
    elapsed = time.monotonic() - began
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    line = summary(machine)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # What reproduces the figures (output paths left out).
    command = shlex.join(
        ["python", "-m", "benchmarks", "--cycles", str(args.cycles), "--rounds", str(args.rounds)]
        + ["--soak-cycles", str(args.soak_cycles)]
        + [f"--suite={name}" for name in args.suite or ()]
    )
    header = (
        f"celery_redlock benchmarks, {when}: {args.cycles} cycles x {args.rounds} rounds, "
        f"soak {args.soak_cycles} cycles; {elapsed:.0f} s"
    )
    busy = _busy(machine)
    if busy:
        header += "\n" + busy
    print(as_text(line, results, header), end="")
    settings = {
        "cycles": args.cycles,
        "rounds": args.rounds,
        "soak_cycles": args.soak_cycles,
        "quick": args.quick,
        "suites": [s.name for s in suites],
        "when": when,
        "seconds": round(elapsed, 1),
    }
    if args.json:
        args.json.write_text(as_json(machine | {"summary": line}, settings, results))
        log(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(as_markdown(line, results, command, busy))
        log(f"wrote {args.markdown}")
    if args.readme:
        text = as_readme(line, results, command)
        if busy:
            text = f"> {busy}\n\n{text}"
        replace_block(args.readme, "bench-table", text)
        log(f"wrote the bench-table block of {args.readme}")
    missed = any(c.status == "MISS" for r in results for c in r.checks)
    return 1 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    sys.exit(main())
