"""celery_redlock.testing: fake nodes taken down and brought back, and the
pytest fixture factory, with RedlockTask runs under ``task_always_eager``."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_redlock.config import get_redlock
from celery_redlock.exceptions import LockExtendError, LockNotAcquired
from celery_redlock.redlock import Redlock, Vote
from celery_redlock.task import RedlockTask
from celery_redlock.testing import (
    fake_redlock,
    fake_redlock_fixture,
    lock_holder,
    node_down,
    node_name,
    start_node,
    stop_node,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGURED = "redis://configured.invalid:6379/0"


def new_app(**conf: Any) -> Celery:
    app = Celery("helpers", set_as_current=False)
    app.conf.update(
        broker_url="memory://", task_always_eager=True, redlock_retry_delay=0.01, **conf
    )
    return app


@pytest.fixture
def app() -> Celery:
    return new_app()


@pytest.fixture
def nodes(app: Celery) -> Iterator[list[Any]]:
    with fake_redlock(app) as fakes:
        yield fakes


def counting_task(app: Celery, **options: Any) -> tuple[Any, list[str | None]]:
    """A RedlockTask recording, per run, the task id holding its lock (read on the nodes)."""
    holders: list[str | None] = []

    @app.task(base=RedlockTask, bind=True, shared=False, **options)
    def work(self: Any, n: int) -> int:
        holders.append(lock_holder(work, n))
        return n

    return work, holders


# ---------------------------------------------------------------------------
# Nodes down


def test_two_of_three_nodes_down_fail_a_run_with_lock_not_acquired_naming_them(
    app: Celery, nodes: list[Any]
) -> None:
    work, holders = counting_task(app)
    with node_down(*nodes[:2]), pytest.raises(LockNotAcquired) as caught:
        work.apply((1,), throw=True)
    assert holders == []  # the body never ran
    error = caught.value
    assert error.unavailable
    votes = {vote.node: vote.vote for vote in error.votes}
    assert votes == {
        node_name(nodes[0]): Vote.ERROR,
        node_name(nodes[1]): Vote.ERROR,
        node_name(nodes[2]): Vote.YES,
    }
    assert node_name(nodes[0]) in str(error)
    assert node_name(nodes[1]) in str(error)
    assert "ConnectionError" in str(error)
    key = work.redlock_key_for((1,), {})
    assert nodes[2].get(key) is None  # the minority's grant was given back


def test_one_of_three_nodes_down_still_locks(app: Celery, nodes: list[Any]) -> None:
    work, holders = counting_task(app)
    seen: list[list[bytes | None]] = []
    key = work.redlock_key_for((1,), {})

    @app.task(base=RedlockTask, bind=True, shared=False)
    def look(self: Any, n: int) -> None:
        seen.append([node.get(look.redlock_key_for((n,), {})) for node in nodes[1:]])

    with node_down(nodes[0]):
        result = work.delay(1)
        look.delay(1)
    assert result.get() == 1
    assert holders == [result.id]
    assert all(value is not None for value in seen[0])  # held on the two live nodes
    assert [node.get(key) for node in nodes] == [None, None, None]  # released afterwards


def test_on_unavailable_run_runs_the_body_unlocked_with_a_warning(
    app: Celery, nodes: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[list[bytes | None]] = []

    @app.task(base=RedlockTask, shared=False, redlock_on_unavailable="run")
    def lenient(n: int) -> int:
        ran.append([nodes[2].get(lenient.redlock_key_for((n,), {}))])
        return n

    with caplog.at_level(logging.WARNING), node_down(*nodes[:2]):
        assert lenient.delay(7).get() == 7
    assert ran == [[None]]  # ran, and no node held its key
    assert "runs WITHOUT its lock" in caplog.text


def test_a_stopped_node_refuses_commands_and_keeps_its_data() -> None:
    app = new_app()
    with fake_redlock(app) as nodes:
        nodes[0].set("kept", "1")
        stop_node(nodes[0])
        with pytest.raises(redis.ConnectionError):
            nodes[0].get("kept")
        start_node(nodes[0])
        assert nodes[0].get("kept") == b"1"


def test_nodes_brought_back_are_used_at_once_despite_the_cool_down(
    app: Celery, nodes: list[Any]
) -> None:
    work, holders = counting_task(app)
    on_all: list[int] = []

    @app.task(base=RedlockTask, shared=False)
    def count(n: int) -> None:
        on_all.append(sum(1 for node in nodes if node.get(count.redlock_key_for((n,), {}))))

    with node_down(*nodes[:2]):
        # managers made while the nodes are down put them in their cool-down
        own = Redlock(nodes, version_check=False, retry_count=0)
        with pytest.raises(LockNotAcquired):
            own.acquire("own", 10)
        with pytest.raises(LockNotAcquired):
            work.apply((1,), throw=True)
        with pytest.raises(LockNotAcquired):
            count.apply((1,), throw=True)
    started = time.monotonic()
    result = work.delay(1)
    count.delay(1)
    lock = own.acquire("own", 10)
    assert time.monotonic() - started < 0.5  # well within the one-second cool-down
    assert holders == [result.id]
    assert on_all == [3]  # locked on every node again, the two brought back too
    assert [node.get("own") for node in nodes] == [lock.value.encode()] * 3
    own.close()


def test_a_node_already_down_stays_down_after_the_block(nodes: list[Any]) -> None:
    stop_node(nodes[0])
    with node_down(nodes[0], nodes[1]):
        for node in nodes[:2]:
            with pytest.raises(redis.ConnectionError):
                node.ping()
        assert nodes[2].ping()
    with pytest.raises(redis.ConnectionError):
        nodes[0].ping()
    assert nodes[1].ping()
    start_node(nodes[0])
    assert nodes[0].ping()


def test_node_down_with_no_nodes_changes_nothing(app: Celery, nodes: list[Any]) -> None:
    work, holders = counting_task(app)
    with node_down():
        result = work.delay(3)
    assert holders == [result.id]


def test_node_down_refuses_what_is_not_a_fake_node(nodes: list[Any]) -> None:
    real = redis.Redis(host="127.0.0.1", port=1)  # never connected
    for wrong in (real, "redis://127.0.0.1:6379/0", None):
        with pytest.raises(TypeError, match="is not a fake node"):
            stop_node(wrong)
    with pytest.raises(TypeError), node_down(nodes[0], real):
        pass
    assert nodes[0].ping()  # checked before any node was taken down


def test_the_lock_manager_sees_a_node_down_as_failing(app: Celery, nodes: list[Any]) -> None:
    work, _ = counting_task(app)
    manager = get_redlock(work.redlock_settings)
    with node_down(nodes[1]):
        lock = manager.acquire("resource", 10, retry_count=0)  # two of three: a quorum
        assert manager.inspect("resource").per_node == (
            (node_name(nodes[0]), lock.value, pytest.approx(10_000, abs=500)),
            (node_name(nodes[1]), None, None),  # no reply
            (node_name(nodes[2]), lock.value, pytest.approx(10_000, abs=500)),
        )
        assert manager.extend(lock, 10)  # still a quorum
        with node_down(nodes[2]), pytest.raises(LockExtendError) as caught:
            manager.extend(lock, 10, strict=True)  # one of three left
    assert [vote.vote for vote in caught.value.votes] == [Vote.YES, Vote.ERROR, Vote.ERROR]


# ---------------------------------------------------------------------------
# The fixture factory

USERS_APP = new_app(redlock_servers=CONFIGURED)
module_nodes = fake_redlock_fixture(USERS_APP)
named_nodes = fake_redlock_fixture("users_app", count=5)


@USERS_APP.task(base=RedlockTask, bind=True, shared=False)
def sync_account(self: Any, account_id: int) -> str | None:
    return lock_holder(sync_account, account_id)


@pytest.fixture
def users_app() -> Celery:
    return new_app(redlock_servers=CONFIGURED, redlock_version_check=True)


@pytest.fixture
def restored_module_app() -> Iterator[None]:
    """Asked for before ``module_nodes``: checks, after its teardown, the conf is back."""
    yield
    assert USERS_APP.conf.get("redlock_servers") == CONFIGURED
    assert USERS_APP.conf.get("redlock_version_check") is None
    assert sync_account.redlock_settings.servers == (CONFIGURED,)


@pytest.fixture
def restored_users_app(users_app: Celery) -> Iterator[None]:
    """Asked for before ``named_nodes``: checks, after its teardown, the conf is back."""
    yield
    assert users_app.conf.get("redlock_servers") == CONFIGURED
    assert users_app.conf.get("redlock_version_check") is True


def test_the_fixture_yields_working_nodes_for_an_app_object(
    restored_module_app: None, module_nodes: list[Any]
) -> None:
    assert len(module_nodes) == 3
    assert USERS_APP.conf.get("redlock_servers") == module_nodes
    result = sync_account.delay(42)
    assert result.get() == result.id  # the run held its lock on the fake nodes
    with node_down(*module_nodes[:2]), pytest.raises(LockNotAcquired):
        sync_account.apply((42,), throw=True)


def test_the_fixture_takes_the_app_from_a_fixture_by_name(
    restored_users_app: None, users_app: Celery, named_nodes: list[Any]
) -> None:
    assert len(named_nodes) == 5
    assert users_app.conf.get("redlock_servers") == named_nodes
    work, holders = counting_task(users_app)
    with node_down(*named_nodes[:2]):  # 3 of 5 left: a quorum
        result = work.delay(5)
    assert holders == [result.id]


# ---------------------------------------------------------------------------
# pytest stays optional

WITHOUT_PYTEST = """
import sys
sys.modules["pytest"] = None  # any "import pytest" now raises ImportError
from celery import Celery
from celery_redlock.testing import fake_redlock, fake_redlock_fixture, node_down
app = Celery("nopytest", set_as_current=False)
with fake_redlock(app) as nodes, node_down(nodes[0]):
    pass
try:
    fake_redlock_fixture(app)
except ImportError:
    print("ok")
"""


def test_the_helpers_import_and_work_without_pytest() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYTEST],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_fake_redlock_covers_a_task_with_its_own_servers_and_restores_exactly() -> None:
    """A task naming its own redlock_servers locks on the fakes inside the block
    too; afterwards its attribute is back, and a setting the app did not have is
    gone again (not left set to None, which would shadow a later source)."""
    app = new_app()
    work, holders = counting_task(app, redlock_servers=CONFIGURED)
    assert "redlock_servers" not in app.conf.changes
    with fake_redlock(app) as fakes:
        assert work.apply((1,)).get() == 1
        assert len(holders) == 1
        assert holders[0] is not None  # held on the fakes while the body ran
        assert work.redlock_settings.servers == tuple(fakes)
    assert type(app.tasks[work.name]).redlock_servers == CONFIGURED
    assert "redlock_servers" not in app.conf.changes
    assert "redlock_version_check" not in app.conf.changes


def test_fake_redlock_covers_servers_a_task_inherits_from_its_base() -> None:
    """``base=MyLocked`` where MyLocked sets redlock_servers: the task uses the fakes
    in the block, and inherits its base's servers again after it."""
    app = new_app()

    class MyLocked(RedlockTask):  # type: ignore[misc]
        redlock_servers = CONFIGURED

    @app.task(base=MyLocked, shared=False)
    def work(n: int) -> int:
        return n

    cls = type(app.tasks[work.name])
    with fake_redlock(app) as fakes:
        assert work.apply((1,)).get() == 1
        assert work.redlock_settings.servers == tuple(fakes)
    assert "redlock_servers" not in vars(cls)
    assert cls.redlock_servers == CONFIGURED
    assert MyLocked.redlock_servers == CONFIGURED


def test_fake_redlock_covers_a_task_set_to_the_broker_by_none() -> None:
    """``redlock_servers=None`` on a task means the broker (over the app's servers):
    inside the block it locks on the fakes, never on the real broker."""
    app = new_app()
    work, _ = counting_task(app, redlock_servers=None)
    with fake_redlock(app) as fakes:
        assert work.redlock_settings.servers == tuple(fakes)
        assert work.apply((1,)).get() == 1
    assert type(app.tasks[work.name]).redlock_servers is None


def test_fake_redlock_restores_every_redlock_setting_the_block_changed() -> None:
    """A test that changes another redlock_* setting inside the block does not leak
    it to the next test."""
    app = new_app(redlock_ttl=12.0)
    with fake_redlock(app):
        app.conf.redlock_on_duplicate = "raise"
        app.conf.redlock_ttl = 3.0
    assert app.conf.get("redlock_ttl") == 12.0
    assert "redlock_on_duplicate" not in app.conf.changes
