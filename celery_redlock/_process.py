"""This process's pid and its machine's host name, without a system call per use,
and objects made once per process.

The pid is kept and reset in a forked child: for the per-task paths that
check they are not running in a fork of the process that made their state
(one ``getpid()`` each would be a system call). :class:`PerProcess` holds an
object (a renewer, a resender, each with a thread) that a forked child
resets rather than shares.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["PerProcess", "hostname", "pid"]

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


class _Resettable(Protocol):
    def _reset(self) -> None: ...


T = TypeVar("T", bound=_Resettable)


class PerProcess(Generic[T]):
    """One object per process, made by ``make`` on first use; in a forked child the
    parent's is ``_reset()`` (its threads and state are the parent's)."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None
        self._guard = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def get(self) -> T:
        """The object, made now if this is its first use."""
        value = self._value
        if value is None:
            with self._guard:
                if self._value is None:
                    self._value = self._make()
                value = self._value
        return value

    def peek(self) -> T | None:
        """The object if it was made, else None (nothing is made)."""
        return self._value

    def _after_fork_in_child(self) -> None:
        self._guard = threading.Lock()
        if self._value is not None:
            self._value._reset()
