"""The exceptions celery_redlock raises.

Every exception derives from one root, so ``except RedlockError`` catches them
all::

    RedlockError
    ├── RedlockConfigError (also ValueError)   bad settings or arguments
    │   └── ServerVersionError                 a node runs Redis < 2.6.12
    ├── QuorumUnavailable                      fewer than a quorum of nodes answer
    ├── LockNotAcquired                        the lock could not be taken
    │   └── DuplicateTask                      (celery) another run holds the task's lock
    ├── LockNotOwned                           release of a lock held by someone else
    └── LockExtendError                        extend failed where it had to succeed

``LockNotAcquired`` carries each node's vote (:class:`NodeVote`), so a caller
can tell "held by another" from "Redis is down".
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DuplicateTask",
    "LockExtendError",
    "LockNotAcquired",
    "LockNotOwned",
    "NodeVote",
    "QuorumUnavailable",
    "RedlockConfigError",
    "RedlockError",
    "ServerVersionError",
    "Vote",
]


class Vote(str, enum.Enum):
    """What one node answered to one request."""

    YES = "yes"  #: the node granted (or re-armed) the lock
    HELD = "held"  #: the key holds another owner's token
    ERROR = "error"  #: the node answered with an error, or could not be reached
    TIMEOUT = "timeout"  #: no answer within the per-node timeout

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NodeVote:
    """One node's answer: its address (never with a password), the vote and a detail."""

    node: str
    vote: Vote
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.node}={self.vote}" + (f" ({self.detail})" if self.detail else "")


class RedlockError(Exception):
    """Root of every exception raised by celery_redlock."""


class RedlockConfigError(RedlockError, ValueError):
    """A setting or an argument is wrong; the message names it and says how to fix it."""


class ServerVersionError(RedlockConfigError):
    """A Redis node runs a version older than 2.6.12 (no ``SET ... NX PX``)."""


class QuorumUnavailable(RedlockError):
    """Fewer than a quorum of nodes could be reached."""

    def __init__(self, message: str, votes: Sequence[NodeVote] = ()) -> None:
        super().__init__(message)
        self.votes: tuple[NodeVote, ...] = tuple(votes)


class LockNotAcquired(RedlockError):
    """The lock on ``resource`` could not be acquired.

    ``votes`` holds each node's answer to the last attempt, ``attempts`` how
    many attempts were made, ``holder`` the token seen on the nodes that said
    "held" (when it was read), and ``unavailable`` is true when the failure
    came from nodes that errored or timed out rather than from another holder.
    """

    def __init__(
        self,
        resource: str,
        votes: Sequence[NodeVote] = (),
        attempts: int = 0,
        message: str | None = None,
    ) -> None:
        self.resource = resource
        self.votes: tuple[NodeVote, ...] = tuple(votes)
        self.attempts = attempts
        if message is None:
            listed = ", ".join(str(v) for v in self.votes) or "no nodes answered"
            message = (
                f"could not acquire lock {resource!r} on a quorum after {attempts} "
                f"attempt(s): {listed}"
            )
        super().__init__(message)

    @property
    def unavailable(self) -> bool:
        """True when the quorum failed because nodes erred or timed out, not because held."""
        held = sum(1 for v in self.votes if v.vote is Vote.HELD)
        yes = sum(1 for v in self.votes if v.vote is Vote.YES)
        quorum = len(self.votes) // 2 + 1
        return bool(self.votes) and held + yes < quorum

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.resource, self.votes, self.attempts, str(self)))


class DuplicateTask(LockNotAcquired):
    """A Celery task's lock is held by another run of the same key.

    ``holder`` is the task id holding the lock and ``ttl_left`` the seconds
    left on its lock (None when unknown).
    """

    def __init__(
        self,
        resource: str,
        holder: str | None = None,
        ttl_left: float | None = None,
        task_name: str | None = None,
        message: str | None = None,
    ) -> None:
        self.holder = holder
        self.ttl_left = ttl_left
        self.task_name = task_name
        if message is None:
            left = f"{ttl_left:.1f}s" if ttl_left is not None else "an unknown time"
            message = (
                f"task {task_name or '?'} is already running or queued under lock "
                f"{resource!r}: held by task {holder or '?'} for {left} more"
            )
        super().__init__(resource, (), 0, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.resource, self.holder, self.ttl_left, self.task_name, str(self)),
        )


class LockNotOwned(RedlockError):
    """A release or extend named a lock that this token does not hold on a quorum."""

    def __init__(self, resource: str, message: str | None = None) -> None:
        self.resource = resource
        super().__init__(
            message
            or f"lock {resource!r} is not held by this token (expired, released or taken over)"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.resource, str(self)))


class LockExtendError(RedlockError):
    """Extending a lock failed where the caller required it to succeed."""

    def __init__(
        self, resource: str, votes: Sequence[NodeVote] = (), message: str | None = None
    ) -> None:
        self.resource = resource
        self.votes: tuple[NodeVote, ...] = tuple(votes)
        listed = ", ".join(str(v) for v in self.votes)
        super().__init__(
            message
            or f"could not extend lock {resource!r} on a quorum within its validity"
            + (f": {listed}" if listed else "")
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.resource, self.votes, str(self)))
