"""The machine a run measured: printed with every table, since numbers mean
nothing without it."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from .core import NodeAddr

__all__ = ["describe", "summary"]

PEERS = ("redlock-py", "pottery", "python-redis-lock")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _redis_server(nodes: Sequence[NodeAddr]) -> str:
    if not nodes:
        return "unknown"
    with redis.Redis(host=nodes[0].host, port=nodes[0].port, socket_timeout=2) as client:
        info = client.info("server")
    return str(info.get("redis_version", "unknown"))


def describe(nodes: Sequence[NodeAddr]) -> dict[str, Any]:
    """Facts about this machine and the software measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    try:
        from redis.utils import HIREDIS_AVAILABLE as hiredis
    except ImportError:  # pragma: no cover
        hiredis = False
    try:
        import celery_redlock

        ours = celery_redlock.__version__
    except ImportError:  # pragma: no cover
        ours = "not importable"
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis_server": _redis_server(nodes),
        "redis_py": redis.__version__,
        "redis_py_protocol": redis.Connection().protocol,  # type: ignore[no-untyped-call]
        "hiredis": bool(hiredis),
        "celery_redlock": ours,
        "git": _git_revision(),
        "peers": {name: _version(name) for name in PEERS},
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def summary(info: dict[str, Any]) -> str:
    """One line: the machine as the README shows it."""
    peers = ", ".join(f"{name} {ver}" for name, ver in info["peers"].items() if ver) or "no peers"
    load, end = info.get("loadavg"), info.get("loadavg_end")
    load_text = f"; load {load[0]:.2f} at start" if load else ""
    if load and end:
        load_text += f", {end[0]:.2f} at end"
    rev = f" ({info['git']})" if info.get("git") else ""
    return (
        f"{info['nproc']} CPUs ({info['cpu_model']}), {info['system']}, {info['python']}, "
        f"redis-server {info['redis_server']} on loopback, redis-py {info['redis_py']} "
        f"(RESP{info['redis_py_protocol']}, {'hiredis' if info['hiredis'] else 'no hiredis'}), "
        f"celery_redlock {info['celery_redlock']}{rev}, {peers}{load_text}"
    )
