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


def test_list_shows_a_runs_token_as_its_task_id_also_for_a_key_without_digest(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    """``redlock_key=""`` locks ``{prefix}{task}`` (no digest): a run's token
    ``"<task id>|<12 hex>"`` is still shown as the task id, in the table and in
    --json, as is a task key's run token held on fewer than a quorum."""
    from celery_redlock.keys import run_token

    urls, manager = three
    whole = run_token("task-id-7")
    assert whole.startswith("task-id-7|")
    manager.acquire("redlock:proj.tasks.nightly", 30, whole)  # redlock_key=""
    clients(urls)[0].set(TASK_KEY, run_token("task-id-8", "abcdef"), px=30_000)  # 1 of 3
    manager.acquire("redlock:plain", 30, "not|a-run-token")  # not a run's token: as it is
    result = cli(urls, "list")
    assert result.exit_code == 0, result.output
    assert "|" not in result.stdout.replace("not|a-run-token", "")
    table = {r[0]: r for r in rows(result)}
    assert table["redlock:proj.tasks.nightly"][1:3] == ["task-id-7", "proj.tasks.nightly"]
    assert table[TASK_KEY][1:3] == ["task-id-8", "proj.tasks.add"]
    assert table[TASK_KEY][4:] == ["1/3", "no"]
    assert table["redlock:plain"][1:3] == ["not|a-run-token", "-"]
    result = cli(urls, "list", "--json")
    assert result.exit_code == 0, result.output
    locks = {lock["key"]: lock for lock in json.loads(result.stdout)["locks"]}
    nightly = locks["redlock:proj.tasks.nightly"]
    assert (nightly["holder"], nightly["task"], nightly["quorum"]) == (
        "task-id-7",
        "proj.tasks.nightly",
        True,
    )
    assert (locks[TASK_KEY]["holder"], locks[TASK_KEY]["quorum"]) == ("task-id-8", False)
    assert locks["redlock:plain"]["holder"] == "not|a-run-token"


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
        "errors": {},
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


# -- failing nodes: reported once, with their own error ---------------------------------


def test_status_names_a_refused_connection_itself_not_a_cool_down(
    cli: Run, redis_urls: list[str]
) -> None:
    result = cli([*redis_urls[:2], DEAD[0]], "status", "--json")
    assert result.exit_code == 0, result.output
    error = json.loads(result.stdout)["nodes"][2]["error"]
    assert "Connection refused" in error, error
    assert "skipped" not in error, error


def lock_keys(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i:03d}:" + f"{i:02x}" * 32 for i in range(count)]


def test_clear_skips_a_hung_node_after_its_first_timeout_and_names_the_timeout(
    cli: Run, fresh_nodes: Callable[..., list[RedisServer]]
) -> None:
    """One node of three stops answering: it costs one admin timeout (2 s), not one
    per key; it is reported once, with the timeout; the others are cleared."""
    nodes = fresh_nodes(3)
    urls = [n.url for n in nodes]
    keys = lock_keys("redlock:job.", 8)
    for client in clients(urls):
        for key in keys:
            client.set(key, "token", px=60_000)
    nodes[2].pause()
    try:
        started = time.monotonic()
        result = cli(urls, "clear", "--force", "--json")
        took = time.monotonic() - started
    finally:
        nodes[2].resume()
    assert took < 12.0, took  # one 2 s timeout; one per key would be 8 x 2 s more
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sorted(report["cleared"]) == keys
    hung = f"{nodes[2].host}:{nodes[2].port}"
    assert report["unreachable"] == [hung]
    assert "Timeout" in report["errors"][hung], report["errors"]
    assert [c.dbsize() for c in clients(urls)] == [0, 0, len(keys)]


def test_clear_reports_a_node_refusing_eval_with_its_noperm_error_once(
    cli: Run, redis_urls: list[str], fresh_nodes: Callable[..., list[RedisServer]]
) -> None:
    (limited,) = fresh_nodes(1)
    with limited.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-@scripting",
        )  # fmt: skip  (a category Redis 6 knows too: EVAL_RO is Redis 7's)
    urls = [*redis_urls[:2], f"redis://limited:pw@{limited.host}:{limited.port}/0"]
    keys = lock_keys("redlock:job.", 3)
    for client in [*clients(redis_urls[:2]), limited.client()]:
        for key in keys:
            client.set(key, "token", px=60_000)
    result = cli(urls, "clear", "--force")
    assert result.exit_code == 0, result.output
    assert "cleared 3 lock(s)" in result.stdout
    name = f"{limited.host}:{limited.port}"
    assert result.stderr.count(name) == 1, result.stderr  # once, not once per key
    assert f"warning: {name} failed (NoPermissionError: " in result.stderr
    assert "no permissions to run the 'eval' command" in result.stderr
    assert "unreachable" not in result.stderr
    assert "pw@" not in result.output


class DropOnPublish:
    """A TCP proxy to ``port`` that closes a connection when it carries a PUBLISH
    command: a node whose connection breaks between a delete and its wake-up."""

    def __init__(self, port: int) -> None:
        import socket

        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: Any, dst: Any, check: bool) -> None:
        try:
            while data := src.recv(65536):
                if check and b"\r\nPUBLISH\r\n" in data.upper():
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            sock.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.socks:
            sock.close()


def test_release_counts_a_node_whose_wake_up_fails_after_the_delete_as_released_only(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    proxy = DropOnPublish(int(urls[0].rsplit(":", 1)[1].split("/")[0]))
    try:
        result = cli(
            [f"redis://127.0.0.1:{proxy.port}/0", *urls[1:]],
            "release",
            TASK_KEY,
            "--force",
            "--json",
        )
    finally:
        proxy.close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["nodes"], report["unreachable"]) == (3, [])
    assert report["errors"] == {}
    assert not any(c.exists(TASK_KEY) for c in clients(urls))


def test_a_command_closes_every_connection_it_opens(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    import gc

    urls, manager = three
    for key in lock_keys("redlock:job.", 5):
        manager.acquire(key, 30)
    watcher = clients(urls[:1])[0]

    def connected() -> int:
        return len(watcher.client_list())

    def settled(count: int) -> int:
        """The connections, once the server has seen closed ones go (up to 2 s)."""
        deadline = time.monotonic() + 2.0
        while (now := connected()) != count and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    before = connected()
    gc.disable()  # not left to the garbage collector
    try:
        for args in (["status"], ["list"], ["clear"], ["clear", "--force"]):
            cli(urls, *args)
            assert settled(before) == before, args
    finally:
        gc.enable()


# -- clear: the prefix and the dry run ------------------------------------------------------


def test_clear_refuses_a_prefix_outside_the_lock_prefix_unless_told(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    """Celery's results (strings, like locks) under another prefix: not cleared by a
    --prefix naming them unless --any-prefix says so."""
    urls, manager = three
    manager.acquire(TASK_KEY, 30, "task-id-1")
    meta = "celery-task-meta-0d5c6a"
    for client in clients(urls):
        client.set(meta, '{"status": "SUCCESS"}')
    result = cli(urls, "clear", "--prefix", "celery-task-meta-", "--force")
    assert result.exit_code == 2
    assert "does not start with the lock key prefix 'redlock:'" in result.stderr
    assert "--any-prefix" in result.stderr
    assert all(c.exists(meta) for c in clients(urls))
    dry = cli(urls, "clear", "--prefix", "celery-task-meta-", "--any-prefix")
    assert dry.exit_code == 2
    assert meta in dry.stdout
    assert all(c.exists(meta) for c in clients(urls))
    done = cli(urls, "clear", "--prefix", "celery-task-meta-", "--any-prefix", "--force")
    assert done.exit_code == 0, done.output
    assert not any(c.exists(meta) for c in clients(urls))
    assert manager.holder(TASK_KEY) == "task-id-1"  # under the prefix, not asked for
    narrower = cli(urls, "clear", "--prefix", "redlock:proj.", "--force")
    assert narrower.exit_code == 0, narrower.output  # under the lock prefix: no flag needed
    assert manager.holder(TASK_KEY) is None


def test_clear_without_force_names_the_locks_then_counts_the_rest(
    cli: Run, three: tuple[list[str], Redlock]
) -> None:
    from celery_redlock.cli import SHOWN_KEYS

    urls, _ = three
    keys = lock_keys("redlock:myapp.", SHOWN_KEYS + 7)
    for client in clients(urls):
        client.mset(dict.fromkeys(keys, "token"))
    result = cli(urls, "clear", "--prefix", "redlock:myapp.")
    assert result.exit_code == 2
    listed = [line.strip() for line in result.stdout.splitlines()]
    assert listed[0] == f"would clear {len(keys)} lock(s) under 'redlock:myapp.':"
    assert listed[1 : 1 + SHOWN_KEYS] == keys[:SHOWN_KEYS]
    assert listed[1 + SHOWN_KEYS] == "... and 7 more"
    assert f"not cleared: {len(keys)} lock(s) under 'redlock:myapp.'" in result.stderr
    report = json.loads(cli(urls, "clear", "--prefix", "redlock:myapp.", "--json").stdout)
    assert (report["ok"], report["count"], report["locks"]) == (False, len(keys), keys[:SHOWN_KEYS])
    assert all(c.dbsize() == len(keys) for c in clients(urls))
