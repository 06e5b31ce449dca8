"""Every program in examples/ runs and prints what its docstring promises.

Each example is run as a user would run it, ``python examples/<name>.py``,
in a subprocess with its Redis URLs in the environment: the lock nodes are
three of the session's redis-server nodes, emptied first (``redis_urls``),
and the broker a database of the tests' own broker server (never the
shared Redis on 6379). ``examples/testing_your_tasks.py`` is run with
pytest, needing no Redis at all.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap
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
    # Outside a Django project (this process): no DatabaseScheduler to wrap, and a
    # lookup says so (the module imports all the same).
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    with pytest.raises(ImportError, match="HADatabaseScheduler needs a Django project"):
        module.HADatabaseScheduler  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'HADatabaseSchedulr'"):
        module.HADatabaseSchedulr  # noqa: B018


#: A Django project's settings module, for ``DJANGO_SETTINGS_MODULE``.
DJANGO_SETTINGS = """\
SECRET_KEY = "ha-beat-example"
INSTALLED_APPS = ["django_celery_beat"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
"""

#: What ``celery -A ha_beat beat -S ha_beat:HADatabaseScheduler`` does, in its order:
#: import the -A module (Django not set up yet), run the loader's init_worker (where
#: Celery's Django fixup calls django.setup()), then look the scheduler up by name.
#: ``early`` first looks it up before Django is set up.
RESOLVE_AS_CELERY_BEAT = """\
import sys
from celery.utils.imports import qualname, symbol_by_name
from django.apps import apps
from django.conf import settings

import ha_beat

print("after import:", settings.configured, apps.ready)
if sys.argv[1:] == ["early"]:
    try:
        symbol_by_name("ha_beat:HADatabaseScheduler")
    except ImportError as exc:
        print("early:", exc)
ha_beat.app.loader.init_worker()  # celery beat's init_loader: the fixup's django.setup()
print("after init_worker:", settings.configured, apps.ready)
cls = symbol_by_name("ha_beat:HADatabaseScheduler")
from django_celery_beat.schedulers import DatabaseScheduler
from celery_redlock.beat import RedlockSchedulerMixin
print("class:", qualname(cls), issubclass(cls, RedlockSchedulerMixin),
      issubclass(cls, DatabaseScheduler), cls.redlock_standby_ticks,
      symbol_by_name("ha_beat:HADatabaseScheduler") is cls)
"""


@pytest.fixture
def django_env(beat_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A Django project as Celery meets one: ``DJANGO_SETTINGS_MODULE`` names its
    settings (django-celery-beat installed, a SQLite file), on the path; not set up."""
    pytest.importorskip("django_celery_beat")
    db = str(tmp_path / "beat.sqlite3")
    (tmp_path / "ha_django_settings.py").write_text(DJANGO_SETTINGS.format(db=db))
    return {
        **beat_env,
        "DJANGO_SETTINGS_MODULE": "ha_django_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def resolve_as_celery_beat(env: dict[str, str], *args: str) -> list[str]:
    """Run :data:`RESOLVE_AS_CELERY_BEAT` from the examples folder (as ``-A ha_beat``)."""
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE_AS_CELERY_BEAT, *args],
        cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout.splitlines()


def test_ha_beat_database_scheduler_resolves_as_celery_beat_looks_it_up_in_django(
    django_env: dict[str, str],
) -> None:
    """``-S ha_beat:HADatabaseScheduler`` in a Django project: Celery imports the
    module before Django is set up, and looks the class up after ``django.setup()``."""
    lines = resolve_as_celery_beat(django_env)
    assert lines == [
        "after import: False False",  # what the module sees when Celery imports it
        "after init_worker: True True",
        "class: ha_beat.HADatabaseScheduler True True False True",
    ]


def test_ha_beat_database_scheduler_looked_up_before_django_setup_says_so(
    django_env: dict[str, str],
) -> None:
    """Before ``django.setup()`` a lookup is a clear ImportError (not Django's
    AppRegistryNotReady), and the class is built all the same once Django is set up."""
    lines = resolve_as_celery_beat(django_env, "early")
    assert lines[0] == "after import: False False"
    assert lines[1].startswith("early: HADatabaseScheduler needs Django set up")
    assert "django.setup() has not run yet" in lines[1]
    assert lines[2:] == [
        "after init_worker: True True",
        "class: ha_beat.HADatabaseScheduler True True False True",
    ]


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


def _beat_until_it_leads(args: list[str], env: dict[str, str], log: Path) -> str:
    """Run ``celery ... beat`` from the examples folder until it leads, then Ctrl-C it
    (a clean shutdown hands the leader lock over); its log."""
    with (
        log.open("w") as out,
        popen(args, cwd=EXAMPLES, env=env, stdout=out, stderr=subprocess.STDOUT) as proc,
    ):
        deadline = time.monotonic() + 20
        while "beat: leader now" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    return log.read_text()


def test_ha_beat_docstring_command_runs_a_leading_beat(
    beat_env: dict[str, str], tmp_path: Path
) -> None:
    """``celery -A ha_beat beat -s ...`` from the examples folder, as the docstring says."""
    schedule = str(tmp_path / "beat.db")
    args = [sys.executable, "-m", "celery", "-A", "ha_beat", "beat", "-s", schedule, "-l", "info"]
    text = _beat_until_it_leads(args, beat_env, tmp_path / "beat.log")
    assert ". scheduler -> celery_redlock.beat.RedlockScheduler" in text
    assert "beat: leader now (lock redlock:beat:ha_beat, ttl 30.0s)" in text
    assert "beat: handed the leader lock redlock:beat:ha_beat over" in text


def test_ha_beat_docstring_command_with_the_database_scheduler_leads(
    django_env: dict[str, str], tmp_path: Path
) -> None:
    """``celery -A ha_beat beat -S ha_beat:HADatabaseScheduler``, as the docstring
    says, in a Django project whose database is migrated: it starts and leads."""
    migrated = subprocess.run(
        [sys.executable, "-m", "django", "migrate", "-v", "0"],
        cwd=tmp_path, env=django_env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        check=False,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    args = [sys.executable, "-m", "celery", "-A", "ha_beat", "beat"]
    args += ["-S", "ha_beat:HADatabaseScheduler", "-l", "info"]
    text = _beat_until_it_leads(args, django_env, tmp_path / "beat.log")
    assert ". scheduler -> ha_beat.HADatabaseScheduler" in text
    assert "beat: leader now (lock redlock:beat:ha_beat, ttl 30.0s)" in text
    assert "beat: handed the leader lock redlock:beat:ha_beat over" in text


def docstring_sample(name: str) -> list[str]:
    """The lines of the sample output in ``examples/<name>``'s docstring (after
    "It prints, e.g.::"), as patterns: "..." stands for anything, and the
    docstring's hosts ``r1``, ``r2``, ... for the test's nodes."""
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    assert doc is not None
    block = doc.split("It prints, e.g.::\n\n", 1)[1].split("\n\n", 1)[0]
    patterns = []
    for line in textwrap.dedent(block).splitlines():
        pattern = re.escape(line).replace(re.escape("..."), ".*")
        patterns.append(re.sub(r"redis://r\d:6379/0", "redis://[^']+", pattern))
    return patterns


def test_django_settings_resolve_through_the_celery_namespace(env: dict[str, str]) -> None:
    lines = run_example("django_settings.py", env)
    sample = docstring_sample("django_settings.py")  # the docstring shows every line, in order
    assert len(lines) == len(sample), lines
    for pattern, line in zip(sample, lines):
        assert re.fullmatch(pattern, line), (pattern, line)
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
