"""celery_redlock: Redlock distributed locks over several Redis masters, and Celery
tasks that never run twice at once.

The core (``Redlock``, ``Lock``, the exceptions) imports no celery. The Celery
names (``RedlockTask``, ``RedlockSettings``, the signals) are imported on first
use, so ``from celery_redlock import Redlock`` works without celery loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .exceptions import (
    DuplicateTask,
    LockExtendError,
    LockNotAcquired,
    LockNotOwned,
    NodeVote,
    QuorumUnavailable,
    RedlockConfigError,
    RedlockError,
    ServerVersionError,
    Vote,
)
from .redlock import Lock, LockInfo, Redlock

if TYPE_CHECKING:
    from .config import RedlockSettings
    from .signals import lock_acquired, lock_lost, lock_released, lock_skipped
    from .task import RedlockTask

__version__ = "0.1.0.dev0"

#: name -> submodule, for the names imported on first use
_LAZY = {
    "RedlockTask": "task",
    "RedlockSettings": "config",
    "lock_acquired": "signals",
    "lock_skipped": "signals",
    "lock_released": "signals",
    "lock_lost": "signals",
}

__all__ = [
    "DuplicateTask",
    "Lock",
    "LockExtendError",
    "LockInfo",
    "LockNotAcquired",
    "LockNotOwned",
    "NodeVote",
    "QuorumUnavailable",
    "Redlock",
    "RedlockConfigError",
    "RedlockError",
    "RedlockSettings",
    "RedlockTask",
    "ServerVersionError",
    "Vote",
    "__version__",
    "lock_acquired",
    "lock_lost",
    "lock_released",
    "lock_skipped",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'celery_redlock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
