"""Testing your own RedlockTask tasks with ``celery_redlock.testing``: no
Redis server, no broker, no worker.

Drop a file like this in your tests folder and run it with pytest::

    pip install pytest "fakeredis[lua]"
    pytest examples/testing_your_tasks.py -v

``fake_redlock(app)`` points the app's ``redlock_servers`` at three
in-memory fakeredis nodes for the block (each a server of its own, so the
quorum logic runs as in production) and yields their clients;
``lock_holder(task, *args)`` is the task id holding a call's lock, or None.
Runs made with ``.apply()``, or ``.delay()`` under ``task_always_eager``,
lock exactly as a worker's runs do. (Calling the task object directly,
``sync_account(42)``, runs the function with no lock.)

The app and tasks at the top stand in for your project's; in your tests you
would import them (``from proj.celery import app``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_redlock import DuplicateTask, LockNotAcquired, Redlock, RedlockTask
from celery_redlock.signals import lock_skipped
from celery_redlock.testing import fake_redlock, lock_holder

# -- your project (proj/celery.py, proj/accounts/tasks.py) ------------------------

app = Celery("proj")
app.conf.redlock_servers = ["redis://r1:6379/0", "redis://r2:6379/0", "redis://r3:6379/0"]


def fetch_and_store(account_id: int, full: bool) -> str:
    """The real work (a stand-in): the tests replace it to look inside a run."""
    return f"synced {account_id}"


@app.task(base=RedlockTask, name="proj.sync_account")
def sync_account(account_id: int, full: bool = False) -> str:
    return fetch_and_store(account_id, full)


@app.task(
    base=RedlockTask,
    name="proj.charge",
    redlock_key=("account_id",),
    redlock_on_duplicate="raise",
)
def charge(account_id: int, amount: int) -> str:
    return f"charged {amount} to {account_id}"


# -- fixtures (conftest.py) ---------------------------------------------------------


@pytest.fixture
def redlock_nodes() -> Iterator[list[Any]]:
    """Three in-memory Redis nodes behind the app's locks, for one test."""
    with fake_redlock(app) as nodes:
        yield nodes


@pytest.fixture
def skipped() -> Iterator[list[dict[str, Any]]]:
    """The duplicates skipped during the test: lock_skipped tells them from a None result."""
    seen: list[dict[str, Any]] = []

    def record(sender: Any, **info: Any) -> None:
        seen.append(info)

    lock_skipped.connect(record, weak=False)
    yield seen
    lock_skipped.disconnect(record)


def another_run_holds(nodes: list[Any], task: Any, *args: Any) -> str:
    """Play a run that holds ``task``'s lock for ``args``; returns its task id."""
    holder = "the-other-run"
    with Redlock(nodes, version_check=False) as rl:
        assert rl.lock(task.redlock_key_for(args), 30, value=holder) is not None
    return holder


# -- tests ----------------------------------------------------------------------------


def test_a_run_holds_its_lock_and_releases_it_when_done(
    redlock_nodes: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    during: list[str | None] = []

    def spy(account_id: int, full: bool) -> str:
        during.append(lock_holder(sync_account, account_id))
        return "done"

    # In your project: monkeypatch.setattr("proj.accounts.tasks.fetch_and_store", spy)
    monkeypatch.setattr(f"{__name__}.fetch_and_store", spy)
    result = sync_account.apply(args=(42,))
    assert result.get() == "done"
    assert during == [result.id]  # the lock's token is the task id
    assert lock_holder(sync_account, 42) is None


def test_a_duplicate_is_skipped_while_another_run_holds_the_lock(
    redlock_nodes: list[Any], skipped: list[dict[str, Any]]
) -> None:
    holder = another_run_holds(redlock_nodes, sync_account, 42)
    result = sync_account.apply(args=(42,))
    assert result.successful()
    assert result.get() is None  # the body did not run
    assert [s["holder"] for s in skipped] == [holder]
    assert lock_holder(sync_account, 42) == holder  # the duplicate left it alone


def test_other_arguments_run_alongside(
    redlock_nodes: list[Any], skipped: list[dict[str, Any]]
) -> None:
    another_run_holds(redlock_nodes, sync_account, 42)
    assert sync_account.apply(args=(7,)).get() == "synced 7"
    assert sync_account.apply(args=(42, True)).get() == "synced 42"  # full=True: another key
    assert skipped == []


def test_equivalent_calls_share_one_key() -> None:
    """Arguments are bound with defaults applied; no Redis is needed to compute keys."""
    key = sync_account.redlock_key_for((42,))
    assert sync_account.redlock_key_for((42, False)) == key
    assert sync_account.redlock_key_for((), {"account_id": 42}) == key
    assert sync_account.redlock_key_for((42, True)) != key
    assert charge.redlock_key_for((1, 10)) == charge.redlock_key_for((1, 99))


def test_the_lock_is_released_when_the_task_fails(
    redlock_nodes: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(account_id: int, full: bool) -> str:
        raise ConnectionError("upstream down")

    monkeypatch.setattr(f"{__name__}.fetch_and_store", broken)
    result = sync_account.apply(args=(42,))
    assert result.failed()
    assert lock_holder(sync_account, 42) is None


def test_a_duplicate_charge_raises_naming_the_holder(redlock_nodes: list[Any]) -> None:
    holder = another_run_holds(redlock_nodes, charge, 1, 10)
    result = charge.apply(args=(1, 25))  # same account_id: the same key
    with pytest.raises(DuplicateTask) as failure:
        result.get()
    assert failure.value.holder == holder
    assert charge.apply(args=(2, 25)).get() == "charged 25 to 2"


def test_delay_locks_too_in_eager_mode(redlock_nodes: list[Any]) -> None:
    holder = another_run_holds(redlock_nodes, sync_account, 42)
    app.conf.task_always_eager = True
    try:
        assert sync_account.delay(42).get() is None
        assert sync_account.delay(7).get() == "synced 7"
    finally:
        app.conf.task_always_eager = False
    assert lock_holder(sync_account, 42) == holder


def test_the_run_fails_when_most_redis_nodes_are_down(redlock_nodes: list[Any]) -> None:
    for node in redlock_nodes[:2]:  # two of three: no quorum
        node.connection_pool.connection_kwargs["server"].connected = False
    result = sync_account.apply(args=(42,))
    with pytest.raises(LockNotAcquired) as failure:
        result.get()
    assert failure.value.unavailable  # the nodes failed; nobody holds the lock
