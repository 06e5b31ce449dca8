"""Rendering: the console report, the README's markdown, and the JSON dump."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .core import Check, SuiteResult, Table

__all__ = ["as_json", "as_markdown", "as_readme", "as_text", "replace_block"]


def _text_table(table: Table) -> list[str]:
    cells = [table.columns, *table.rows]
    widths = [
        max(len(row[i]) if i < len(row) else 0 for row in cells) for i in range(len(table.columns))
    ]

    def line(row: Sequence[str]) -> str:
        out = []
        for i, width in enumerate(widths):
            cell = row[i] if i < len(row) else ""
            out.append(cell.rjust(width) if i in table.numeric else cell.ljust(width))
        return "  ".join(out).rstrip()

    return [
        table.title,
        line(table.columns),
        "  ".join("-" * w for w in widths),
        *map(line, table.rows),
    ]


def _checks_table(checks: Sequence[Check]) -> Table:
    return Table(
        title="Targets (issue 6)",
        columns=["check", "value", "per-round IQR", "target", "status"],
        rows=[
            [
                c.name,
                c.value_text(),
                c.spread_text(),
                c.target_text,
                c.status + (f" ({c.note})" if c.note else ""),
            ]
            for c in checks
        ],
        numeric={1, 2},
    )


def as_text(machine_line: str, results: Sequence[SuiteResult], header: str) -> str:
    out = [header, f"machine: {machine_line}", ""]
    for result in results:
        out.append(f"== {result.title} ({result.seconds:.0f} s)")
        for table in result.tables:
            out += _text_table(table)
            out.append("")
        if result.checks:
            out += _text_table(_checks_table(result.checks))
            out.append("")
        out += [f"  * {note}" for note in result.notes]
        out.append("")
    misses = [c.name for r in results for c in r.checks if c.status == "MISS"]
    out.append("all targets met" if not misses else f"MISSED: {'; '.join(misses)}")
    return "\n".join(out) + "\n"


def _md_table(table: Table, heading: str = "####") -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---:" if i in table.numeric else "---" for i in range(len(table.columns))]
    return [
        f"{heading} {table.title}",
        "",
        "| " + " | ".join(map(esc, table.columns)) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(map(esc, row)) + " |" for row in table.rows),
        "",
    ]


def as_markdown(
    machine_line: str, results: Sequence[SuiteResult], command: str, warning: str = ""
) -> str:
    """The README section: machine, each suite's tables and targets."""
    out = [
        f"Measured with `{command}` on: {machine_line}.",
        "",
    ]
    if warning:
        out += [f"> {warning}", ""]
    for result in results:
        out.append(f"### {result.title}")
        out.append("")
        for table in result.tables:
            out += _md_table(table)
        if result.checks:
            out += _md_table(_checks_table(result.checks))
        out += [f"- {note}" for note in result.notes]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def as_readme(machine_line: str, results: Sequence[SuiteResult], command: str) -> str:
    """The README's speed block: the machine, every target and figure, where the rest is."""
    checks = [c for r in results for c in r.checks]
    out = [
        f"Measured with `{command}` on: {machine_line}. The full tables are in",
        "[docs/benchmarks.md](docs/benchmarks.md).",
        "",
    ]
    if checks:
        table = _checks_table(checks)
        table.title = "Targets and figures"
        out += _md_table(table)
    return "\n".join(out).rstrip() + "\n"


def replace_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``path``."""
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} has no {start.strip()} ... {end} block to write into")
    head, rest = doc.split(start, 1)
    path.write_text(head + start + text + end + rest.split(end, 1)[1])


def as_json(
    machine: dict[str, Any], settings: dict[str, Any], results: Sequence[SuiteResult]
) -> str:
    data = {
        "machine": machine,
        "settings": settings,
        "suites": {
            r.name: {
                "title": r.title,
                "seconds": round(r.seconds, 2),
                "checks": [c.as_dict() for c in r.checks],
                "tables": [asdict(t) | {"numeric": sorted(t.numeric)} for t in r.tables],
                "notes": r.notes,
                "data": r.data,
            }
            for r in results
        },
    }
    return json.dumps(data, indent=2, default=str) + "\n"
