"""The core (redlock, renewal, _nodes, _resend, _scripts, _wakeup, _process, exceptions):
no celery."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

CORE = [
    "celery_redlock.exceptions",
    "celery_redlock._scripts",
    "celery_redlock._nodes",
    "celery_redlock._wakeup",
    "celery_redlock._process",
    "celery_redlock._resend",
    "celery_redlock.redlock",
    "celery_redlock.renewal",
]

PROGRAM = """
import importlib, sys
sys.modules["celery"] = None  # any "import celery" now raises ImportError
for name in sys.argv[1:]:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "kombu" or m.startswith(("celery.", "kombu.")))
assert not leaked, leaked
print("ok", len(sys.argv) - 1)
"""


def present(modules: list[str]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is not None]


def run(modules: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, *modules],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_core_imports_with_celery_made_unimportable() -> None:
    modules = present(CORE)
    assert "celery_redlock.redlock" in modules
    result = run(modules)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ok {len(modules)}"


def test_the_check_would_catch_a_module_that_imports_celery() -> None:
    """The guard itself works: a module importing celery fails under it."""
    pytest.importorskip("celery")
    result = run(["celery.exceptions"])
    assert result.returncode != 0
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr
