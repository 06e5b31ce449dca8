"""This process's pid and its machine's host name, without a system call per use.

The pid is kept and reset in a forked child: for the per-task paths that
check they are not running in a fork of the process that made their state
(one ``getpid()`` each would be a system call).
"""

from __future__ import annotations

import functools
import os
import socket

__all__ = ["hostname", "pid"]

_pid = os.getpid()


def _reset() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset)

    def pid() -> int:
        """This process's id (``os.getpid()``)."""
        return _pid

else:  # pragma: no cover - every POSIX Python has register_at_fork
    pid = os.getpid


@functools.lru_cache(maxsize=1)
def hostname() -> str:
    """This machine's host name (``socket.gethostname()``, read once)."""
    return socket.gethostname()
