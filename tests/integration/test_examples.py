"""Every program in examples/ runs and prints what its docstring promises.

Each example is run as a user would run it, ``python examples/<name>.py``,
in a subprocess with its Redis URLs in the environment: the lock nodes are
three of the session's redis-server nodes, emptied first (``redis_urls``),
and the broker a database of the tests' own broker server (never the
shared Redis on 6379). ``examples/testing_your_tasks.py`` is run with
pytest, needing no Redis at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from celery import current_app
from celery.utils.imports import symbol_by_name

from celery_redlock.beat import RedlockScheduler
from tests.integration.celery_apps.helpers import server_url
from tests.servers import RedisServer

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
RUN_TIMEOUT = 60.0
#: The broker server's databases the examples use (others belong to other tests).
BROKER_DB, RESULT_DB, BEAT_DB = 12, 13, 14


@pytest.fixture
def env(redis_urls: list[str], broker_server: RedisServer) -> dict[str, str]:
    """The environment an example runs in: three empty lock nodes, a broker of its own."""
    for db in (BROKER_DB, RESULT_DB, BEAT_DB):
        with broker_server.client(db=db) as client:
            client.flushdb()
    values = {
        "REDLOCK_SERVERS": ",".join(redis_urls[:3]),
        "CELERY_BROKER_URL": server_url(broker_server, BROKER_DB),
        "CELERY_RESULT_BACKEND": server_url(broker_server, RESULT_DB),
    }
    return {**os.environ, **values}


def run_example(name: str, env: dict[str, str]) -> list[str]:
    """Run ``examples/<name>`` like a user; its stdout lines. Fails on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.splitlines()


def line_after(lines: list[str], prefix: str) -> str:
    """The rest of the one line starting with ``prefix``."""
    found = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"expected one line starting {prefix!r} in:\n" + "\n".join(lines)
    return found[0]


def test_plain_lock_locks_waits_extends_and_reports_votes(env: dict[str, str]) -> None:
    lines = run_example("plain_lock.py", env)
    nodes = [url.split("://")[1].rsplit("/", 1)[0] for url in env["REDLOCK_SERVERS"].split(",")]
    assert lines[0] == f"<Redlock [{', '.join(nodes)}] quorum=2>"
    acquired = line_after(lines, "acquired 'examples:report:2026-11': ")
    match = re.fullmatch(r"valid for ([0-9.]+) s, token [0-9a-f]{32}", acquired)
    assert match, acquired
    assert 9.5 < float(match.group(1)) < 10.0  # ttl 10 less the drift allowance and the trip
    assert line_after(lines, "holder on a quorum -> ") == "this token"
    assert line_after(lines, "held by someone else -> lock() returned ") == "None"
    assert line_after(lines, "release -> ") == "True"
    assert line_after(lines, "after release, holder -> ") == "None"
    waited = float(line_after(lines, "locked(wait=5.0) got the lock after ").removesuffix(" s"))
    assert 0.4 <= waited <= 2.0  # woken by the other holder's release at 0.5 s
    assert line_after(lines, "extend while held -> ").startswith("True (valid for 9.")
    assert line_after(lines, "extend after the block released it -> ") == "False"
    held = lines.index("LockNotAcquired (held), unavailable=False")
    assert lines[held + 1 : held + 4] == [f"  {node}=held" for node in nodes]
    down = lines.index("LockNotAcquired (nodes down), unavailable=True")
    assert lines[down + 1] == f"  {nodes[0]}=yes"
    assert all(re.match(r"  127\.0\.0\.1:\d+=error \(", line) for line in lines[down + 2 :])
    assert len(lines) == down + 4


def test_task_lock_skips_the_duplicate_and_runs_other_calls(env: dict[str, str]) -> None:
    lines = run_example("task_lock.py", env)
    key = line_after(lines, "sync_account(42) is running, holding lock ")
    assert re.fullmatch(r"redlock:task_lock\.sync_account:[0-9a-f]{64}", key)
    assert line_after(lines, "the holder is the first call's task id -> ") == "True"
    assert re.fullmatch(
        r"None \(skipped: task [0-9a-f-]{36} holds the lock\)",
        line_after(lines, "duplicate sync_account(42) -> "),
    )
    assert line_after(lines, "skipped in favour of the first call -> ") == "True"
    assert line_after(lines, "sync_account(7) -> ") == "'synced account 7'"
    assert line_after(lines, "first sync_account(42) -> ") == "'synced account 42'"
    assert line_after(lines, "lock after the first finished -> ") == "None"
    again = line_after(lines, "sync_account(42) again, after the first finished -> ")
    assert again == "'synced account 42'"


def test_per_argument_keys_collide_as_documented(env: dict[str, str]) -> None:
    lines = run_example("per_argument_keys.py", env)
    holders = [line for line in lines if line.startswith("while ")]
    assert [line.split(" holds ")[0] for line in holders] == [
        "while sync_account(42)",
        "while charge(1, 10)",
        "while subscribe({'email': 'ada@example.com'}, 'pro')",
        "while rebuild_index(1)",
    ]
    assert holders[-1].endswith(" holds redlock:keys.rebuild_index")  # "": the name alone
    outcomes = {
        call.strip(): outcome
        for call, outcome in (line.rsplit("  ", 1) for line in lines if line.startswith("  "))
    }
    assert outcomes == {
        "sync_account(42, False)": "collides (skipped)",
        "sync_account(account_id=42)": "collides (skipped)",
        "sync_account(42, True)": "runs",
        "sync_account(7)": "runs",
        "charge(1, 20)": "collides (skipped)",
        "charge(1, 10, note='again')": "collides (skipped)",
        "charge(2, 10)": "runs",
        "subscribe({'email': ' ADA@example.com'}, 'free')": "collides (skipped)",
        "subscribe({'email': 'bob@example.com'}, 'pro')": "runs",
        "rebuild_index(1)": "collides (skipped)",
        "rebuild_index(2)": "collides (skipped)",
    }


@pytest.fixture
def beat_env(env: dict[str, str], broker_server: RedisServer) -> dict[str, str]:
    return {**env, "CELERY_BROKER_URL": server_url(broker_server, BEAT_DB)}


def test_ha_beat_elects_one_leader_and_fails_over(beat_env: dict[str, str]) -> None:
    lines = run_example("ha_beat.py", beat_env)
    assert lines[:4] == [
        "beat a: leader",
        "beat b: standby",
        "leader lock redlock:beat:ha_beat held by beat a -> True",
        "beat a: closed (handed the leader lock over)",
    ]
    taken_over = re.fullmatch(r"beat b: leader after ([0-9.]+) s", lines[4])
    assert taken_over, lines
    assert float(taken_over.group(1)) < 5.0  # at its next poll (1 s), not after the 30 s TTL
    assert len(lines) == 5


def import_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` in this process (not under its own name: no clash)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = current_app._get_current_object()
    try:
        spec.loader.exec_module(module)
    finally:
        previous.set_current()  # the example's Celery() made itself the current app
    return module


def test_ha_beat_app_configures_the_redlock_scheduler(
    beat_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDLOCK_SERVERS", "CELERY_BROKER_URL"):
        monkeypatch.setenv(name, beat_env[name])
    module = import_example("ha_beat")
    conf = module.app.conf
    assert symbol_by_name(conf.beat_scheduler) is RedlockScheduler
    assert conf.redlock_servers == beat_env["REDLOCK_SERVERS"].split(",")
    assert conf.beat_schedule["report-every-10-s"] == {"task": "ha_beat.report", "schedule": 10.0}
    assert "ha_beat.report" in module.app.tasks
    # Outside a Django project (this process): no DatabaseScheduler to wrap.
    assert module.HADatabaseScheduler is None


def test_ha_beat_defines_its_database_scheduler_inside_a_django_project(
    beat_env: dict[str, str],
) -> None:
    pytest.importorskip("django_celery_beat")
    check = (
        "import django, importlib.util, sys\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['django_celery_beat'], USE_TZ=True,\n"
        "    DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}})\n"
        "django.setup()\n"
        "spec = importlib.util.spec_from_file_location('ha_beat', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "from celery_redlock.beat import RedlockSchedulerMixin\n"
        "from django_celery_beat.schedulers import DatabaseScheduler\n"
        "cls = module.HADatabaseScheduler\n"
        "print(issubclass(cls, RedlockSchedulerMixin), issubclass(cls, DatabaseScheduler),\n"
        "      cls.redlock_standby_ticks)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, str(EXAMPLES / "ha_beat.py")],
        env={**beat_env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "True", "False"]


@contextlib.contextmanager
def popen(args: list[str], **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    """A child process that is killed (with its group) if the test leaves it running."""
    proc = subprocess.Popen(args, start_new_session=True, text=True, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_ha_beat_docstring_command_runs_a_leading_beat(
    beat_env: dict[str, str], tmp_path: Path
) -> None:
    """``celery -A ha_beat beat -s ...`` from the examples folder, as the docstring says."""
    log = tmp_path / "beat.log"
    schedule = str(tmp_path / "beat.db")
    args = [sys.executable, "-m", "celery", "-A", "ha_beat", "beat", "-s", schedule, "-l", "info"]
    with (
        log.open("w") as out,
        popen(args, cwd=EXAMPLES, env=beat_env, stdout=out, stderr=subprocess.STDOUT) as proc,
    ):
        deadline = time.monotonic() + 20
        while "beat: leader now" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean shutdown hands the leader lock over
        proc.wait(timeout=15)
    text = log.read_text()
    assert ". scheduler -> celery_redlock.beat.RedlockScheduler" in text
    assert "beat: leader now (lock redlock:beat:ha_beat, ttl 30.0s)" in text
    assert "beat: handed the leader lock redlock:beat:ha_beat over" in text


def test_django_settings_resolve_through_the_celery_namespace(env: dict[str, str]) -> None:
    lines = run_example("django_settings.py", env)
    servers = env["REDLOCK_SERVERS"].split(",")
    assert line_after(lines, "app.conf.get('redlock_servers') -> ") == repr(servers)
    assert line_after(lines, "app.conf.get('redlock_ttl') -> ") == "60.0"
    assert line_after(lines, "app.conf.get('redlock_beat_ttl') -> ") == "30.0"
    assert line_after(lines, "refresh_feed's settings: ") == (
        "ttl 60.0, on_duplicate 'skip', key_prefix 'proj:lock:', servers 3"
    )
    assert line_after(lines, "nightly_export's settings: ") == "ttl 600.0 (its own attribute wins)"
    held = line_after(lines, "refresh_feed(3) ran holding its lock ")
    assert re.fullmatch(r"proj:lock:proj\.refresh_feed:[0-9a-f]{64} -> True", held)
    typo = line_after(lines, "a worker with CELERY_REDLOCK_TTL_SECONDS refuses to start: ")
    assert typo.startswith("CELERY_REDLOCK_TTL_SECONDS is not a celery_redlock setting")
    assert "did you mean CELERY_REDLOCK_TTL?" in typo


def test_fencing_token_refuses_the_paused_holders_late_write(env: dict[str, str]) -> None:
    lines = run_example("fencing_token.py", env)
    fence_a = int(line_after(lines, "A holds the lock, fence "))
    assert line_after(lines, "A writes 'draft by A' -> ") == "accepted"
    assert line_after(lines, "A pauses for ") == "0.8 s; its lock (TTL 0.5 s) expires meanwhile"
    b = re.fullmatch(
        r"(\d+) \(higher than A's -> True\)", line_after(lines, "B holds the lock, fence ")
    )
    assert b, lines
    fence_b = int(b.group(1))
    assert fence_b > fence_a
    assert line_after(lines, "B writes 'final by B' -> ") == "accepted"
    late = line_after(lines, "A wakes up and writes 'final by A' -> ")
    assert late == f"refused (fence {fence_a} < {fence_b})"
    assert line_after(lines, "A tries to extend its lock -> ").startswith("False")
    assert line_after(lines, "stored: ") == f"'final by B' with fence {fence_b}"


def test_testing_your_tasks_passes_under_pytest_without_redis() -> None:
    """As its docstring says: ``pytest examples/testing_your_tasks.py``, no Redis in sight."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDLOCK_", "CELERY_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "examples/testing_your_tasks.py", "-q"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"^8 passed in ", output, re.MULTILINE), output  # none skipped or failed
