"""The exception tree: one root, context carried, pickle round trips."""

from __future__ import annotations

import pickle

import pytest

from celery_redlock import (
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

VOTES = (
    NodeVote("127.0.0.1:7001", Vote.YES),
    NodeVote("127.0.0.1:7002", Vote.HELD),
    NodeVote("127.0.0.1:7003", Vote.ERROR, "ConnectionError: refused"),
    NodeVote("127.0.0.1:7004", Vote.TIMEOUT, "no reply within the per-node timeout"),
    NodeVote("127.0.0.1:7005", Vote.YES),
)


@pytest.mark.parametrize(
    ("cls", "parents"),
    [
        (RedlockConfigError, (RedlockError, ValueError)),
        (ServerVersionError, (RedlockConfigError, ValueError, RedlockError)),
        (QuorumUnavailable, (RedlockError,)),
        (LockNotAcquired, (RedlockError,)),
        (DuplicateTask, (LockNotAcquired, RedlockError)),
        (LockNotOwned, (RedlockError,)),
        (LockExtendError, (RedlockError,)),
    ],
)
def test_every_exception_hangs_off_the_one_root(
    cls: type[Exception], parents: tuple[type[Exception], ...]
) -> None:
    """Each exception is a subclass of the documented parents (config errors are ValueErrors)."""
    for parent in parents:
        assert issubclass(cls, parent)
    assert issubclass(RedlockError, Exception)


def test_vote_and_node_vote_print_as_node_equals_vote() -> None:
    assert str(Vote.TIMEOUT) == "timeout"
    assert str(VOTES[0]) == "127.0.0.1:7001=yes"
    assert str(VOTES[2]) == "127.0.0.1:7003=error (ConnectionError: refused)"


def test_lock_not_acquired_message_lists_resource_attempts_and_every_vote() -> None:
    error = LockNotAcquired("jobs:42", VOTES, attempts=3)
    text = str(error)
    assert "'jobs:42'" in text
    assert "3 attempt" in text
    for vote in VOTES:
        assert str(vote) in text
    assert error.resource == "jobs:42"
    assert error.attempts == 3
    assert error.votes == VOTES


def test_lock_not_acquired_without_votes_says_no_node_answered() -> None:
    assert "no nodes answered" in str(LockNotAcquired("r"))


@pytest.mark.parametrize(
    ("votes", "unavailable"),
    [
        # 2 yes + 1 held = 3 nodes answered about the key: a holder, not an outage
        ([Vote.YES, Vote.YES, Vote.HELD, Vote.ERROR, Vote.TIMEOUT], False),
        ([Vote.HELD] * 5, False),
        ([Vote.HELD, Vote.HELD, Vote.HELD, Vote.ERROR, Vote.ERROR], False),
        # only 2 of 5 answered: the quorum failed because of the nodes
        ([Vote.YES, Vote.HELD, Vote.ERROR, Vote.TIMEOUT, Vote.TIMEOUT], True),
        ([Vote.ERROR] * 5, True),
        ([Vote.TIMEOUT] * 3, True),
        ([Vote.YES, Vote.TIMEOUT, Vote.TIMEOUT], True),
    ],
)
def test_unavailable_is_true_only_when_errors_and_timeouts_broke_the_quorum(
    votes: list[Vote], unavailable: bool
) -> None:
    node_votes = [NodeVote(f"n{i}:1", vote) for i, vote in enumerate(votes)]
    assert LockNotAcquired("r", node_votes, 1).unavailable is unavailable


def test_unavailable_is_false_when_there_are_no_votes() -> None:
    assert LockNotAcquired("r").unavailable is False


def test_lock_not_owned_and_extend_error_name_the_resource() -> None:
    assert "'r1'" in str(LockNotOwned("r1"))
    error = LockExtendError("r2", VOTES[:2])
    assert "'r2'" in str(error)
    assert "127.0.0.1:7002=held" in str(error)
    assert str(LockExtendError("r3", message="custom")) == "custom"


def test_duplicate_task_names_task_holder_and_time_left() -> None:
    error = DuplicateTask("k", holder="task-1", ttl_left=12.34, task_name="app.add")
    text = str(error)
    assert "app.add" in text
    assert "task-1" in text
    assert "12.3s" in text
    assert (error.holder, error.ttl_left, error.task_name) == ("task-1", 12.34, "app.add")
    assert "unknown time" in str(DuplicateTask("k"))


def _state(error: BaseException) -> tuple[object, ...]:
    return (type(error), str(error), dict(vars(error).items()))


@pytest.mark.parametrize(
    "error",
    [
        RedlockError("plain"),
        RedlockConfigError("ttl must be a number"),
        ServerVersionError("node runs 2.6.0"),
        QuorumUnavailable("only 1 of 5 answered", VOTES),
        LockNotAcquired("res", VOTES, 4),
        LockNotAcquired("res", VOTES, 2, message="custom text"),
        DuplicateTask("res", holder="task-9", ttl_left=3.5, task_name="t.name"),
        DuplicateTask("res"),
        LockNotOwned("res"),
        LockNotOwned("res", "custom text"),
        LockExtendError("res", VOTES),
        LockExtendError("res", message="expired"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_exceptions_survive_a_pickle_round_trip(error: RedlockError) -> None:
    """Type, message and every attribute (votes, resource, holder...) come back equal."""
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert _state(copy) == _state(error)


@pytest.mark.parametrize(
    "error",
    [
        LockNotAcquired("r", VOTES, 3),
        DuplicateTask("redlock:t:ab", "task-1", 4.5, "proj.t"),
        LockNotOwned("r"),
        LockExtendError("r", VOTES[:2]),
        QuorumUnavailable("only 1 of 3", VOTES),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_rebuilds_from_its_args_as_celery_json_results_do(error: Exception) -> None:
    """Celery's JSON result encoding keeps ``exc.args`` (plain data) and rebuilds
    ``cls(*args)``: the message and the fields must survive."""
    import json

    args = json.loads(json.dumps(list(error.args)))
    rebuilt = type(error)(*args)
    assert str(rebuilt) == str(error)
    for field in ("resource", "votes", "attempts", "holder", "ttl_left", "task_name"):
        if hasattr(error, field):
            assert getattr(rebuilt, field) == getattr(error, field), field
