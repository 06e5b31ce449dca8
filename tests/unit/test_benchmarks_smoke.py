"""The benchmark harness runs end to end with tiny counts on real nodes.

These tests check the harness's output structure and that a benchmark case
must really lock to count; they never assert on speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from benchmarks import cycles
from benchmarks.__main__ import main
from benchmarks.core import Case, Check, NodeAddr, run_interleaved
from tests.servers import RedisServer

STATUSES = {"PASS", "MISS", "info", "n/a"}


def test_quick_run_reports_every_case_target_and_the_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m benchmarks` with tiny counts writes JSON, markdown and a text report."""
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    rc = main(
        ["--quick", "--cycles", "10", "--rounds", "2", "--soak-cycles", "100", "-q",
         "--json", str(out_json), "--markdown", str(out_md)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out_json.read_text())

    machine = data["machine"]
    for field in ("nproc", "cpu_model", "python", "redis_server", "redis_py", "summary"):
        assert machine[field], field
    assert data["settings"]["rounds"] == 2
    assert set(data["suites"]) == {"cycles", "memory"}

    speed = data["suites"]["cycles"]
    cases = {c["key"]: c for c in speed["data"]["cases"]}
    assert list(cases) == [c.key for c in cycles.CASES]
    for key, case in cases.items():
        if case["skipped"]:  # a peer library that is not installed
            assert key.split("-")[0] in ("redlock", "pottery", "python"), key
            assert case["rates"] == []
            continue
        assert len(case["rates"]) == 2, key
        assert all(rate > 0 for rate in case["rates"]), key
        assert case["median"] > 0, key
    for always in ("raw-1", "hand-3", "ours-1", "ours-3", "ours-5", "ours-7", "redis-py-lock-1"):
        assert not cases[always]["skipped"], always

    checks = {c["name"]: c for c in speed["checks"]}
    assert {name for name, *_ in cycles.TARGETS} == set(checks)
    assert all(c["status"] in STATUSES for c in checks.values())
    mine = checks["ours 3 nodes / raw redis-py 1 node"]
    assert mine["value"] > 0
    assert mine["target"] == 1.0
    assert mine["status"] in ("PASS", "MISS")
    assert checks["time: ours 5 nodes / ours 1 node"]["at_least"] is False

    soak = data["suites"]["memory"]
    soak_checks = {c["name"]: c for c in soak["checks"]}
    # Correctness, not speed: no key may outlive the run.
    assert soak_checks["keys left behind on the nodes"]["status"] == "PASS"
    assert soak["data"]["dbsize_after"] == [0, 0, 0]
    assert soak["data"]["counts"]["refused"] > 0

    markdown = out_md.read_text()
    assert machine["summary"] in markdown
    assert "| case | nodes | cycles/s |" in markdown
    assert "ours 3 nodes / hand fan-out 3 nodes" in markdown

    text = capsys.readouterr().out
    assert "machine: " in text
    assert "Targets (issue 6)" in text


def test_a_case_whose_lock_is_held_elsewhere_fails_the_run() -> None:
    """A cycle that does not get its lock raises instead of being counted."""
    with RedisServer() as server:
        client = redis.Redis(host=server.host, port=server.port)
        client.set("bench:raw-1", "someone-else")
        case = Case("raw-1", "raw", 1, cycles.RawSingle)
        with pytest.raises(cycles.NotLocked):
            run_interleaved([case], [NodeAddr(server.host, server.port)], 3, 1, lambda _: None)
        client.close()


def test_a_case_whose_library_is_missing_is_skipped_not_failed() -> None:
    """A peer that is not installed shows as skipped, and its ratios as n/a."""
    case = Case("ghost-3", "ghost", 3, cycles.RawSingle, requires="no_such_module_for_bench")
    (result,) = run_interleaved([case], [], 3, 1, lambda _: None)
    assert result.skipped.startswith("not installed")
    assert result.rates == []
    assert Check("x", None, 1.0).status == "n/a"
