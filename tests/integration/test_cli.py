"""``celery -A proj redlock status|list|release|clear`` against real redis-server nodes.

Most tests run the celery command in-process through click's CliRunner (the
app is ``tests.integration.beat_apps.cli_app``, configured per call); one
runs ``celery`` as a subprocess to prove the ``celery.commands`` entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.bin.celery import celery
from click.testing import CliRunner, Result

from celery_redlock import Redlock
from tests.integration.beat_apps import cli_app
from tests.servers import RedisServer

REPO = Path(__file__).resolve().parents[2]
APP = "tests.integration.beat_apps.cli_app"
DEAD = ["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"]  # nothing listens there
PASSWORD = "s3cret-Pa55word"
TASK_KEY = "redlock:proj.tasks.add:" + "ab" * 32

Run = Callable[..., Result]


@pytest.fixture
def cli() -> Iterator[Run]:
    """``cli(servers, "list", "--json", prefix=...)``: run ``celery -A cli_app redlock ...``."""

    def run(servers: list[str], *args: str, prefix: str = "redlock:") -> Result:
        cli_app.app.conf.update(redlock_servers=servers, redlock_key_prefix=prefix)
        return CliRunner().invoke(celery, ["-A", APP, "redlock", *args])

    yield run
    cli_app.app.conf.update(redlock_servers=None, redlock_key_prefix=None)


@pytest.fixture
def three(redis_urls: list[str]) -> Iterator[tuple[list[str], Redlock]]:
    """Three clean lock nodes and a core Redlock on them."""
    urls = redis_urls[:3]
    manager = Redlock(urls)
    yield urls, manager
    manager.close()


def clients(urls: list[str]) -> list[Any]:
    import redis

    return [redis.Redis.from_url(url) for url in urls]


def rows(result: Result) -> list[list[str]]:
    """The table's body, split on runs of spaces."""
    lines = [line.split() for line in result.stdout.splitlines() if line.strip()]
    return lines[1:]


# -- status ---------------------------------------------------------------------


def test_status_table_shows_every_node_the_quorum_and_never_the_password(
    cli: Run, redis_urls: list[str], fresh_nodes: Callable[..., list[RedisServer]]
) -> None:
    (locked,) = fresh_nodes(1, password=PASSWORD)
    servers = [*redis_urls[:2], locked.url]
    result = cli(servers, "status")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    header = result.stdout.splitlines()[0].split()
    assert header[:5] == ["NODE", "REACHABLE", "VERSION", "ROLE", "RTT_MS"]
    table = rows(result)[:3]
    assert [r[0] for r in table] == [
        s.split("@")[-1].removeprefix("redis://")[:-2] for s in servers
    ]
    assert all(r[1] == "yes" and r[3] == "master" for r in table)
    assert "quorum: 2 of 3; reachable: 3 (ok)" in result.stdout
    # The test nodes keep nothing on disk: a warning says what to do.
    assert "has appendonly no: a restart loses every lock on it" in result.stdout
    assert "use appendonly yes with appendfsync always" in result.stdout


def test_status_warns_about_each_node_that_would_lose_locks_in_a_crash(
    cli: Run, fresh_nodes: Callable[..., list[RedisServer]]
) -> None:
    """No AOF at all, and AOF without fsync on every write, are each named; a node
    with ``appendonly yes`` and ``appendfsync always`` is not."""
    (no_aof,) = fresh_nodes(1)
    (lazy,) = fresh_nodes(1, extra_args=["--appendonly", "yes", "--appendfsync", "everysec"])
    (safe,) = fresh_nodes(1, extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    result = cli([no_aof.url, lazy.url, safe.url], "status", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    persistence = [(n["appendonly"], n["appendfsync"]) for n in report["nodes"]]
    assert persistence == [("no", "everysec"), ("yes", "everysec"), ("yes", "always")]
    warned = [w for w in report["warnings"] if "append" in w]
    assert len(warned) == 2, warned
    assert warned[0].startswith(f"{no_aof.host}:{no_aof.port} has appendonly no")
    assert warned[1].startswith(f"{lazy.host}:{lazy.port} has appendfsync everysec")


def test_status_json_reports_an_unreachable_node_and_a_refused_password(
    cli: Run, redis_urls: list[str], fresh_nodes: Callable[..., list[RedisServer]]
) -> None:
    (locked,) = fresh_nodes(1, password=PASSWORD)
    wrong = locked.url.replace(PASSWORD, "Wr0ng-Pa55word")
    result = cli([redis_urls[0], wrong, DEAD[0]], "status", "--json")
    assert result.exit_code == 2  # 1 of 3 reachable, quorum 2
    assert "Wr0ng-Pa55word" not in result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert (report["quorum"], report["reachable"]) == (2, 1)
    nodes = report["nodes"]
    assert [n["reachable"] for n in nodes] == [True, False, False]
    assert nodes[0]["version"]
    assert nodes[0]["rtt_ms"] is not None
    assert "WRONGPASS" in nodes[1]["error"] or "AUTH" in nodes[1]["error"].upper()
    assert nodes[2]["node"] == "127.0.0.1:1"
    assert any("127.0.0.1:1 is unreachable" in w for w in report["warnings"])


def test_status_exits_2_with_fewer_than_a_quorum_reachable(cli: Run, redis_urls: list[str]) -> None:
    result = cli([redis_urls[0], *DEAD], "status")
    assert result.exit_code == 2
    assert "NOT ENOUGH" in result.stdout
    assert [r[1] for r in rows(result)[:3]] == ["yes", "no", "no"]


def test_status_with_one_node_down_of_three_is_ok(cli: Run, redis_urls: list[str]) -> None:
    result = cli([*redis_urls[:2], DEAD[0]], "status")
    assert result.exit_code == 0
    assert "warning: 127.0.0.1:1 is unreachable" in result.stdout


def test_a_missing_redlock_servers_setting_is_named_and_exits_2(cli: Run) -> None:
    cli_app.app.conf.update(redlock_servers=None)
    result = CliRunner().invoke(celery, ["-A", APP, "redlock", "list"])
    assert result.exit_code == 2
    assert "redlock_servers is not set" in result.stderr
    assert "app.conf.redlock_servers" in result.stderr


# -- list -------------------------------------------------------------------------


def test_list_shows_task_locks_with_holder_task_ttl_nodes_and_quorum(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    manager.acquire("redlock:plain", 20, "plain-token")
    clients(urls)[0].set("redlock:minority", "lonely", px=10_000)  # one node only
    manager.acquire("redlock:beat:proj", 30, "host:123:abc")
    manager.acquire("elsewhere", 30)  # not under the prefix
    result = cli(urls, "list")
    assert result.exit_code == 0, result.output
    table = {r[0]: r for r in rows(result)}
    assert set(table) == {TASK_KEY, "redlock:plain", "redlock:minority", "redlock:beat:proj"}
    assert table[TASK_KEY][1:3] == ["task-id-1", "proj.tasks.add"]
    assert 28 <= float(table[TASK_KEY][3]) <= 30
    assert table[TASK_KEY][4:] == ["3/3", "yes"]
    assert table["redlock:plain"][2] == "-"  # not a task key
    assert table["redlock:minority"][4:] == ["1/3", "no"]
    assert table["redlock:beat:proj"][2:4] == ["(beat", "leader)"]


def test_list_json_and_a_narrower_prefix_keep_the_full_task_name(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    manager.acquire("redlock:other.job:" + "cd" * 32, 30, "task-id-2")
    result = cli(urls, "list", "--prefix", "redlock:proj.", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prefix"] == "redlock:proj."
    assert report["unreachable"] == []
    (lock,) = report["locks"]
    assert lock["key"] == TASK_KEY
    assert lock["task"] == "proj.tasks.add"
    assert (lock["holder"], lock["nodes"], lock["quorum"]) == ("task-id-1", "3/3", True)


def test_list_exits_1_when_nothing_matches(cli: Run, three: tuple[list[str], Redlock]) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    result = cli(urls, "list", "--prefix", "nothing-here:")
    assert result.exit_code == 1
    assert "no locks under 'nothing-here:'" in result.stdout
    assert json.loads(cli(urls, "list", "--prefix", "x:", "--json").stdout)["locks"] == []


def test_list_uses_scan_and_follows_the_cursor_past_many_other_keys(
    cli: Run, fresh_nodes: Callable[..., list[RedisServer]]
) -> None:
    """The nodes refuse KEYS; 3,000 unrelated keys spread the matches over many SCAN pages."""
    nodes = fresh_nodes(3, extra_args=["--rename-command", "KEYS", ""])
    urls = [n.url for n in nodes]
    for client in clients(urls):
        client.mset({f"filler:{i}": i for i in range(3000)})
    with Redlock(urls) as manager:
        wanted = {f"redlock:job{i}:" + f"{i:02x}" * 32 for i in range(5)}
        for key in wanted:
            manager.acquire(key, 30)
    result = cli(urls, "list", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unreachable"] == []
    assert {lock["key"] for lock in report["locks"]} == wanted


def test_list_with_one_node_down_warns_and_below_quorum_exits_2(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    result = cli([*urls[:2], DEAD[0]], "list")
    assert result.exit_code == 0
    assert rows(result)[0][4:] == ["2/3", "yes"]
    assert "127.0.0.1:1 is unreachable" in result.stderr
    result = cli([urls[0], *DEAD], "list")
    assert result.exit_code == 2
    assert "too few nodes reachable" in result.stderr


# -- release ------------------------------------------------------------------------


def test_release_without_force_explains_and_deletes_nothing(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    result = cli(urls, "release", TASK_KEY)
    assert result.exit_code == 2
    assert "--force" in result.stderr
    assert "another run may start beside it" in result.stderr
    assert manager.holder(TASK_KEY) == "task-id-1"


def test_release_force_deletes_the_key_on_every_node(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    result = cli(urls, "release", TASK_KEY, "--force")
    assert result.exit_code == 0, result.output
    assert f"released {TASK_KEY} on 3 node(s)" in result.stdout
    assert not any(c.exists(TASK_KEY) for c in clients(urls))
    again = cli(urls, "release", TASK_KEY, "--force", "--json")
    assert again.exit_code == 1
    assert json.loads(again.stdout) == {
        "ok": False,
        "key": TASK_KEY,
        "nodes": 0,
        "unreachable": [],
    }


def test_release_force_wakes_a_waiter_at_once(cli: Run, three: tuple[list[str], Redlock]) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    got: list[float] = []
    waiter = Redlock(urls, retry_delay=10)  # it polls every 10 s: only a wake-up is fast

    def wait() -> None:
        waiter.acquire(TASK_KEY, 30, "task-id-2", wait=15)
        got.append(time.monotonic())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(0.5)  # the waiter has tried once and is listening
    released = time.monotonic()
    assert cli(urls, "release", TASK_KEY, "--force").exit_code == 0
    thread.join(timeout=15)
    waiter.close()
    assert got, "the waiter never got the lock"
    assert got[0] - released < 2.0
    assert manager.holder(TASK_KEY) == "task-id-2"


def test_release_with_a_quorum_unreachable_exits_2(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    result = cli([urls[0], *DEAD], "release", TASK_KEY, "--force")
    assert result.exit_code == 2
    assert "may still be held" in result.stderr
    assert "127.0.0.1:1" in result.stderr


# -- clear ------------------------------------------------------------------------------


def test_clear_without_force_exits_2_and_deletes_nothing(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire("redlock:myapp.a:" + "0" * 64, 30)
    manager.acquire("redlock:myapp.b:" + "1" * 64, 30)
    result = cli(urls, "clear", "--prefix", "redlock:myapp.")
    assert result.exit_code == 2
    assert "not cleared: 2 lock(s) under 'redlock:myapp.'" in result.stderr
    assert all(c.dbsize() == 2 for c in clients(urls))


def test_clear_force_deletes_only_locks_under_the_prefix(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    under = {"redlock:myapp.a:" + "0" * 64, "redlock:myapp.b:" + "1" * 64}
    for key in under:
        manager.acquire(key, 30)
    manager.acquire("redlock:other.c:" + "2" * 64, 30)
    for client in clients(urls):
        client.hset("redlock:myapp.data", "not", "a lock")  # other data: left alone
    result = cli(urls, "clear", "--prefix", "redlock:myapp.", "--force", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["cleared"]) == under
    for client in clients(urls):
        assert sorted(client.keys()) == [b"redlock:myapp.data", b"redlock:other.c:" + b"2" * 64]
    again = cli(urls, "clear", "--prefix", "redlock:myapp.", "--force")
    assert again.exit_code == 1
    assert "cleared 0 lock(s)" in again.stdout


def test_clear_refuses_an_empty_prefix(cli: Run, three: tuple[list[str], Redlock]) -> None:
    urls, manager = three
    manager.acquire("anything", 30)
    result = cli(urls, "clear", "--prefix", "", "--force")
    assert result.exit_code == 2
    assert "empty prefix" in result.stderr
    assert manager.holder("anything") is not None


# -- the entry point ---------------------------------------------------------------------


def test_celery_finds_the_redlock_subcommand_through_its_entry_point(
    three: tuple[list[str], Redlock],
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    env = dict(os.environ, REDLOCK_TEST_SERVERS=",".join(urls), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "celery", "-A", APP, "redlock"]
    helped = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    for name in ("status", "list", "release", "clear"):
        assert name in helped.stdout
    listed = subprocess.run(
        [*command, "list", "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert [lock["holder"] for lock in json.loads(listed.stdout)["locks"]] == ["task-id-1"]


def test_release_force_leaves_a_key_that_is_not_a_lock(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    """A Celery queue (a list) on the broker's Redis, named by mistake: not a lock,
    not deleted."""
    urls, _ = three
    for client in clients(urls):
        client.rpush("celery", "a message")
    result = cli(urls, "release", "celery", "--force")
    assert result.exit_code == 1, result.output
    assert all(c.llen("celery") == 1 for c in clients(urls))


def test_a_command_run_without_an_app_says_the_app_is_missing(tmp_path: Path) -> None:
    """``celery redlock status`` with no ``-A``: Celery's default app has no lock
    servers, and the error says to name the app."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY", "REDLOCK"))}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "redlock", "status"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert "redlock_servers is not set" in done.stderr
    assert "no app was given: run it as celery -A proj redlock ..." in done.stderr


def test_list_shows_a_beat_lock_handed_over_as_such(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    from celery_redlock.beat import HANDOVER_PREFIX

    urls, manager = three
    manager.acquire("redlock:beat:proj", 30, HANDOVER_PREFIX + '{"from":"h:1:x","sent":{}}')
    result = cli(urls, "list", "--json")
    assert result.exit_code == 0, result.output
    (lock,) = json.loads(result.stdout)["locks"]
    assert (lock["task"], lock["holder"]) == (
        "(beat leader)",
        "(handed over by a beat that stopped)",
    )
