"""celery_redlock: Redlock distributed locks over several Redis masters, and Celery
tasks that never run twice at once."""

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

__version__ = "0.1.0.dev0"

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
    "ServerVersionError",
    "Vote",
    "__version__",
]
