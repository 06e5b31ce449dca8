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
from collections.abc import Iterable, Sequence
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


def _votes(votes: Iterable[object]) -> tuple[NodeVote, ...]:
    """Votes as :class:`NodeVote`, also from ``[node, vote, detail]`` lists (JSON)."""
    out = []
    for item in votes:
        if isinstance(item, NodeVote):
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item) >= 2:
            out.append(NodeVote(str(item[0]), Vote(item[1]), str(item[2]) if item[2:] else ""))
    return tuple(out)


def _plain(votes: Sequence[NodeVote]) -> list[list[str]]:
    return [[v.node, v.vote.value, v.detail] for v in votes]


class RedlockError(Exception):
    """Root of every exception raised by celery_redlock.

    Each keeps its constructor's arguments in ``args`` as plain data, so it
    is rebuilt as ``cls(*args)`` by pickle and by Celery's JSON result
    encoding alike; ``str()`` is the message.
    """

    message = ""

    def __str__(self) -> str:
        return self.message or super().__str__()


class RedlockConfigError(RedlockError, ValueError):
    """A setting or an argument is wrong; the message names it and says how to fix it."""


class ServerVersionError(RedlockConfigError):
    """A Redis node runs a version older than 2.6.12 (no ``SET ... NX PX``)."""


class QuorumUnavailable(RedlockError):
    """Fewer than a quorum of nodes could be reached."""

    def __init__(self, message: str, votes: Iterable[object] = ()) -> None:
        self.votes = _votes(votes)
        self.message = message
        super().__init__(message, _plain(self.votes))


class LockNotAcquired(RedlockError):
    """The lock on ``resource`` could not be acquired.

    ``votes`` holds each node's answer to the last attempt, ``attempts`` how
    many attempts were made, and ``unavailable`` is true when the failure
    came from nodes that errored or timed out rather than from another holder.
    """

    def __init__(
        self,
        resource: str,
        votes: Iterable[object] = (),
        attempts: int = 0,
        message: str | None = None,
    ) -> None:
        self.resource = resource
        self.votes = _votes(votes)
        self.attempts = attempts
        if message is None:
            listed = ", ".join(str(v) for v in self.votes) or "no nodes answered"
            message = (
                f"could not acquire lock {resource!r} on a quorum after {attempts} "
                f"attempt(s): {listed}"
            )
        self.message = message
        super().__init__(resource, _plain(self.votes), attempts, message)

    @property
    def unavailable(self) -> bool:
        """True when the quorum failed because nodes erred or timed out, not because held."""
        held = sum(1 for v in self.votes if v.vote is Vote.HELD)
        yes = sum(1 for v in self.votes if v.vote is Vote.YES)
        quorum = len(self.votes) // 2 + 1
        return bool(self.votes) and held + yes < quorum


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
        self.args = (resource, holder, ttl_left, task_name, message)


class LockNotOwned(RedlockError):
    """A release or extend named a lock that this token does not hold on a quorum."""

    def __init__(self, resource: str, message: str | None = None) -> None:
        self.resource = resource
        self.message = (
            message
            or f"lock {resource!r} is not held by this token (expired, released or taken over)"
        )
        super().__init__(resource, self.message)


class LockExtendError(RedlockError):
    """Extending a lock failed where the caller required it to succeed."""

    def __init__(
        self, resource: str, votes: Iterable[object] = (), message: str | None = None
    ) -> None:
        self.resource = resource
        self.votes = _votes(votes)
        listed = ", ".join(str(v) for v in self.votes)
        self.message = message or (
            f"could not extend lock {resource!r} on a quorum within its validity"
            + (f": {listed}" if listed else "")
        )
        super().__init__(resource, _plain(self.votes), self.message)
