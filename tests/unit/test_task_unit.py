"""RedlockTask without a worker: eager runs (which lock as a worker's do),
registration checks, publish-time behaviour, over fakeredis nodes."""

from __future__ import annotations

import signal as signals_os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import celery.app.task
import celery.exceptions
import fakeredis
import pytest
from celery import Celery

from celery_redlock.config import forget_managers, get_redlock
from celery_redlock.exceptions import DuplicateTask, LockNotAcquired, RedlockConfigError
from celery_redlock.keys import task_id_of
from celery_redlock.redlock import Redlock
from celery_redlock.signals import lock_acquired, lock_lost, lock_released, lock_skipped
from celery_redlock.task import RedlockTask

OTHER = "another-task-id"

try:
    import pydantic
except ImportError:  # pragma: no cover - a test extra
    Account: Any = None
else:

    class Account(pydantic.BaseModel):  # type: ignore[no-redef]
        """A model argument of a ``pydantic=True`` task (module level: its annotation
        must resolve)."""

        id: int
        name: str


@pytest.fixture
def servers() -> list[fakeredis.FakeRedis]:
    return [fakeredis.FakeRedis(server=fakeredis.FakeServer()) for _ in range(3)]


@pytest.fixture
def app(servers: list[fakeredis.FakeRedis]) -> Iterator[Celery]:
    app = Celery("unit", set_as_current=False)
    app.conf.update(
        broker_url="memory://",
        task_always_eager=True,
        redlock_servers=servers,
        redlock_version_check=False,
        redlock_retry_delay=0.01,
    )
    yield app
    forget_managers()


def manager(task: Any) -> Redlock:
    return get_redlock(task.redlock_settings)


def take(task: Any, *args: Any, token: str = OTHER) -> str:
    """Hold ``task``'s lock for ``args`` as another run would; the key."""
    key = task.redlock_key_for(args, {})
    manager(task).acquire(key, 30, token)
    return str(key)


@pytest.fixture
def seen() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    found: list[tuple[str, dict[str, Any]]] = []

    def record(signal: Any, sender: Any = None, **kwargs: Any) -> None:
        found.append((signal.name, kwargs))

    for signal in (lock_acquired, lock_released, lock_skipped):
        signal.connect(record, weak=False, dispatch_uid=f"unit-{signal.name}")
    yield found
    for signal in (lock_acquired, lock_released, lock_skipped):
        signal.disconnect(record, dispatch_uid=f"unit-{signal.name}")


# ---------------------------------------------------------------------------
# Eager runs lock the same way


def test_an_eager_run_holds_the_lock_in_its_body_and_releases_it(
    app: Celery, seen: list[tuple[str, dict[str, Any]]]
) -> None:
    holders: list[str | None] = []

    @app.task(base=RedlockTask, bind=True, shared=False)
    def work(self: Any, n: int) -> str:
        holders.append(manager(self).holder(self.redlock_key_for((n,), {})))
        return str(self.request.id)

    result = work.delay(1)
    assert [task_id_of(h) for h in holders] == [result.id]
    # The run holds it under its own token, not the bare task id a second
    # delivery of the same message would also carry.
    assert holders[0] != result.id
    assert manager(work).holder(work.redlock_key_for((1,), {})) is None
    assert [name for name, _ in seen] == ["lock_acquired", "lock_released"]
    assert seen[1][1]["reason"] == "success"


def test_an_eager_duplicate_is_skipped_and_apply_locks_too(app: Celery) -> None:
    ran: list[int] = []

    @app.task(base=RedlockTask, shared=False)
    def work(n: int) -> int:
        ran.append(n)
        return n

    take(work, 1)
    assert work.delay(1).get() is None
    assert work.apply((1,)).get() is None
    assert work.delay(2).get() == 2
    assert ran == [2]


def test_calling_the_task_directly_takes_no_lock(app: Celery) -> None:
    @app.task(base=RedlockTask, bind=True, shared=False)
    def work(self: Any, n: int) -> int:
        return n * 10

    take(work, 1)
    assert work(1) == 10  # runs although another run holds the lock: documented


def test_raise_policy_eagerly_raises_duplicate_task_naming_the_holder(app: Celery) -> None:
    @app.task(base=RedlockTask, shared=False, redlock_on_duplicate="raise")
    def work(n: int) -> int:
        return n

    key = take(work, 1)
    with pytest.raises(DuplicateTask) as caught:
        work.apply((1,), throw=True)
    assert caught.value.holder == OTHER
    assert caught.value.resource == key
    assert caught.value.ttl_left is not None
    assert 0 < caught.value.ttl_left <= 30
    assert caught.value.task_name == work.name
    assert OTHER in str(caught.value)
    assert work.name in str(caught.value)


def test_retry_policy_retries_up_to_max_retries_then_fails_with_duplicate_task(
    app: Celery,
) -> None:
    @app.task(base=RedlockTask, shared=False, redlock_on_duplicate="retry", max_retries=2)
    def work(n: int) -> int:
        return n

    take(work, 1)
    result = work.apply((1,))
    assert result.state == "FAILURE"
    assert isinstance(result.result, DuplicateTask)


def test_an_eager_retry_takes_its_own_lock_over(app: Celery) -> None:
    @app.task(base=RedlockTask, bind=True, shared=False)
    def work(self: Any, n: int) -> int:
        if self.request.retries < 2:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    assert work.delay(1).get() == 2
    assert manager(work).holder(work.redlock_key_for((1,), {})) is None


def test_an_eager_retry_of_a_task_whose_call_skips_super_runs_under_its_own_lock(
    app: Celery,
) -> None:
    """Only the task_postrun net sees such a run end: on an eager RETRY it releases
    the lock (apply() runs the retry at once), and the retried run takes the key."""

    class NoSuperCall(RedlockTask):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self.run(*args, **kwargs)

    holders: list[str | None] = []

    @app.task(base=NoSuperCall, bind=True, shared=False)
    def work(self: Any, n: int) -> int:
        holders.append(manager(self).holder(self.redlock_key_for((n,), {})))
        if self.request.retries < 1:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    result = work.delay(1)
    assert result.get() == 1
    assert len(holders) == 2
    assert [task_id_of(h) for h in holders] == [result.id, result.id]
    assert holders[0] != holders[1]  # each run under its own token
    assert manager(work).holder(work.redlock_key_for((1,), {})) is None


def test_hold_leaves_the_key_to_expire_after_a_quick_run(app: Celery) -> None:
    @app.task(base=RedlockTask, bind=True, shared=False, redlock_hold=20)
    def work(self: Any, n: int) -> str:
        return str(self.request.id)

    result = work.delay(1)
    info = manager(work).inspect(work.redlock_key_for((1,), {}))
    assert task_id_of(info.holder) == result.get()
    assert work.redlock_info((1,)).holder == result.get()
    assert info.ttl_left is not None
    assert 19 < info.ttl_left <= 20
    assert work.delay(1).get() is None  # within the hold: a duplicate


def test_redlock_lost_is_false_outside_a_run(app: Celery) -> None:
    @app.task(base=RedlockTask, shared=False)
    def work() -> None: ...

    assert work.redlock_lost is False


def test_unreachable_nodes_fail_the_run_or_run_it_unlocked(app: Celery) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    common = {"redlock_servers": [dead], "redlock_node_timeout": 0.05, "redlock_retry_count": 1}

    @app.task(base=RedlockTask, shared=False, **common)
    def strict(n: int) -> int:
        return n

    @app.task(base=RedlockTask, shared=False, redlock_on_unavailable="run", **common)
    def lenient(n: int) -> int:
        return n

    with pytest.raises(LockNotAcquired) as caught:
        strict.apply((1,), throw=True)
    assert "127.0.0.1" in str(caught.value)  # lists the nodes
    assert lenient.delay(1).get() == 1


# ---------------------------------------------------------------------------
# Publishing


def test_apply_async_fails_at_once_for_an_argument_the_key_cannot_encode(app: Celery) -> None:
    @app.task(base=RedlockTask, shared=False, name="unit.tags")
    def tags(account: int, labels: Any) -> None: ...

    app.conf.task_always_eager = False
    with pytest.raises(RedlockConfigError, match=r"task unit.tags: argument 'labels' \(set\)"):
        tags.delay(1, {"a", "b"})


def test_publish_lock_hands_a_duplicate_publisher_the_holders_result(app: Celery) -> None:
    app.conf.task_always_eager = False
    sent: list[str] = []

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    def fake_send(*args: Any, **kwargs: Any) -> Any:
        sent.append(kwargs["task_id"])
        return work.AsyncResult(kwargs["task_id"])

    mp = pytest.MonkeyPatch()  # Celery's apply_async, below ours, "sends"
    mp.setattr(celery.app.task.Task, "apply_async", lambda self, *a, **k: fake_send(*a, **k))
    try:
        first = work.delay(1)
        second = work.delay(1)
        again = work.apply_async((1,), task_id=first.id)  # a retry: same id, not a duplicate
    finally:
        mp.undo()
    assert second.id == first.id
    assert again.id == first.id
    assert sent == [first.id, first.id]
    assert manager(work).holder(work.redlock_key_for((1,), {})) == first.id


def test_a_publish_lock_is_released_when_sending_fails(app: Celery) -> None:
    app.conf.task_always_eager = False

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    def broken(self: Any, *a: Any, **k: Any) -> Any:
        raise ConnectionError("broker down")

    mp = pytest.MonkeyPatch()
    mp.setattr(celery.app.task.Task, "apply_async", broken)
    try:
        with pytest.raises(ConnectionError):
            work.delay(1)
    finally:
        mp.undo()
    assert manager(work).holder(work.redlock_key_for((1,), {})) is None


# ---------------------------------------------------------------------------
# Registration checks


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"redlock_ttl": -1}, "attribute redlock_ttl of task unit.bad must be a finite number > 0"),
        (
            {"redlock_tll": 5},
            "task unit.bad: redlock_tll is not a celery_redlock setting; did you ",
        ),
        ({"redlock_key": ("acount",)}, "'acount', which is not a parameter of the task"),
        ({"redlock_lock_on": "queue"}, "redlock_lock_on of task unit.bad must be one of"),
    ],
)
def test_a_bad_task_attribute_fails_when_the_task_is_registered(
    app: Celery, options: dict[str, Any], message: str
) -> None:
    app.finalize()
    with pytest.raises(RedlockConfigError) as caught:

        @app.task(base=RedlockTask, bind=True, shared=False, name="unit.bad", **options)
        def bad(self: Any, account: int) -> None: ...

    assert message in str(caught.value)


def test_key_names_of_a_bound_task_are_checked_against_its_arguments_without_self(
    app: Celery,
) -> None:
    app.finalize()

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_key=("account",))
    def good(self: Any, account: int, amount: int) -> None: ...

    assert good.redlock_key_for((1, 5), {}) == good.redlock_key_for((1, 6), {})
    with pytest.raises(RedlockConfigError, match="'self', which is not a parameter"):

        @app.task(base=RedlockTask, bind=True, shared=False, redlock_key=("self",))
        def bad(self: Any, account: int) -> None: ...


def test_settings_resolve_task_attribute_then_conf_then_default(app: Celery) -> None:
    app.conf.redlock_ttl = 9

    @app.task(base=RedlockTask, shared=False, redlock_on_duplicate="wait")
    def work(n: int) -> None: ...

    settings = work.redlock_settings
    assert (settings.ttl, settings.on_duplicate, settings.hold) == (9.0, "wait", 0.0)


# ---------------------------------------------------------------------------
# celery_redlock.testing


def test_fake_redlock_runs_tasks_over_in_memory_nodes_and_restores_the_conf() -> None:
    from celery_redlock.testing import fake_redlock, lock_holder

    app = Celery("users", set_as_current=False)
    app.conf.update(broker_url="memory://", task_always_eager=True)
    holders: list[str | None] = []

    @app.task(base=RedlockTask, bind=True, shared=False)
    def sync_account(self: Any, account_id: int) -> str:
        holders.append(lock_holder(sync_account, account_id))
        return str(self.request.id)

    with fake_redlock(app) as servers:
        assert len(servers) == 3
        result = sync_account.delay(42)
        assert holders == [result.id]
        assert lock_holder(sync_account, 42) is None
        key = sync_account.redlock_key_for((42,), {})
        for server in servers[:2]:  # another run holds it on a quorum
            server.set(key, "someone-else", px=10_000)
        assert lock_holder(sync_account, account_id=42) == "someone-else"
        assert sync_account.delay(42).get() is None
    assert app.conf.get("redlock_servers") is None


def test_a_function_given_as_the_redlock_key_option_is_called_with_the_arguments_only(
    app: Celery,
) -> None:
    """``@app.task(redlock_key=f)`` stores f on the task class; the instance must not
    bind it (f would get the task as an extra first argument)."""

    def by_email(email: str, amount: int = 0) -> str:
        return email.strip().lower()

    @app.task(base=RedlockTask, redlock_key=by_email, shared=False)
    def notify(email: str, amount: int = 0) -> str:
        return email

    same = notify.redlock_key_for((" ADA@example.org",), {})
    assert same == notify.redlock_key_for(("ada@example.org", 5), {})
    assert same != notify.redlock_key_for(("bob@example.org",), {})
    assert notify.apply(("ada@example.org",)).get() == "ada@example.org"


def test_redlock_info_names_the_task_holding_a_calls_lock(app: Celery) -> None:
    @app.task(base=RedlockTask, shared=False)
    def job(n: int) -> int:
        return n

    assert job.redlock_info((1,)).holder is None
    take(job, 1)
    info = job.redlock_info((1,))
    assert info.holder == OTHER
    assert info.ttl_left is not None
    assert 25 < info.ttl_left <= 30
    assert job.redlock_info((2,)).holder is None


def test_an_eager_run_finding_its_own_task_id_in_the_lock_fails_not_silently(
    app: Celery,
) -> None:
    """Another run of this very task id holds the key (a dead delivery's lock): an
    eager run has no broker to send itself again with, so it fails with DuplicateTask
    naming that holder rather than ending without a trace."""
    ran: list[int] = []

    @app.task(base=RedlockTask, shared=False)
    def work(n: int) -> int:
        ran.append(n)
        return n

    take(work, 1, token="tid-1|0123456789ab")
    result = work.apply((1,), task_id="tid-1")
    assert result.state == "FAILURE"
    assert isinstance(result.result, DuplicateTask)
    assert result.result.holder == "tid-1"
    assert ran == []


def test_a_retry_whose_hand_over_fails_frees_the_lock_so_the_retried_run_runs(
    app: Celery, servers: list[fakeredis.FakeRedis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-over to the task id fails (2 of 3 nodes down at that moment): what is
    left of the lock is released, and the retried run takes the key like any other."""
    from celery_redlock.testing import node_down

    reassign = Redlock.reassign

    def with_nodes_down(self: Redlock, lock: Any, value: str, ttl: float) -> bool:
        with node_down(*servers[:2]):
            return reassign(self, lock, value, ttl)

    monkeypatch.setattr(Redlock, "reassign", with_nodes_down)
    runs: list[int] = []

    @app.task(base=RedlockTask, bind=True, shared=False)
    def work(self: Any, n: int) -> int:
        runs.append(int(self.request.retries))
        if not self.request.retries:
            raise self.retry(countdown=0)
        return 7

    result = work.delay(1)
    assert result.get() == 7
    assert runs == [0, 1]
    key = work.redlock_key_for((1,), {})
    assert [s.get(key) for s in servers] == [None, None, None]


# ---------------------------------------------------------------------------
# Eager retries and replacements, publish-time duplicates that must be sent


def test_an_eager_retry_raised_to_the_caller_leaves_the_key_free(app: Celery) -> None:
    """task_eager_propagates: apply() raises the Retry and no retried run follows,
    so the lock is not kept for one (it would block the key for TTL + countdown)."""
    app.conf.task_eager_propagates = True

    @app.task(base=RedlockTask, bind=True, shared=False)
    def work(self: Any, n: int) -> int:
        raise self.retry(countdown=180)

    with pytest.raises(celery.exceptions.Retry):
        work.apply((1,))
    assert manager(work).holder(work.redlock_key_for((1,), {})) is None


def test_an_eager_replacement_with_the_same_key_takes_the_lock_over(app: Celery) -> None:
    """Paging through an account: each page replaces itself with the next, same key."""
    holders: list[str | None] = []

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_key=("account",))
    def page(self: Any, account: int, number: int) -> int:
        holders.append(task_id_of(manager(self).holder(self.redlock_key_for((account, 0), {}))))
        if number < 3:
            return int(self.replace(page.si(account, number + 1)))
        return number

    result = page.apply((7, 1))
    assert result.get() == 3
    assert holders == [result.id] * 3
    assert manager(page).holder(page.redlock_key_for((7, 0), {})) is None


def test_a_run_replaced_by_a_chain_ends_its_hold_so_a_same_key_step_runs(app: Celery) -> None:
    """With redlock_hold, a run replacing itself by a chain whose first step has its
    key: that step runs (it is the replaced run's work going on, not a duplicate)."""
    ran: list[str] = []

    @app.task(shared=False)
    def then(value: int) -> int:
        ran.append("then")
        return value

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_key=("x",), redlock_hold=60)
    def step(self: Any, x: str, n: int = 0) -> int:
        ran.append(f"step {n}")
        if n == 0:
            return int(self.replace(celery.chain(step.si(x, 1), then.s())))
        return n

    result = step.apply(("k",))
    assert result.get() == 1
    assert ran == ["step 0", "step 1", "then"]


@pytest.fixture
def sent(app: Celery) -> Iterator[list[str]]:
    """Publishing without a worker: Celery's apply_async, below ours, records the ids."""
    app.conf.task_always_eager = False
    ids: list[str] = []

    def fake_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        ids.append(kwargs["task_id"])
        return self.AsyncResult(kwargs["task_id"])

    mp = pytest.MonkeyPatch()
    mp.setattr(celery.app.task.Task, "apply_async", fake_send)
    yield ids
    mp.undo()


def test_a_publish_duplicate_whose_task_id_was_given_is_sent_not_dropped(
    app: Celery, sent: list[str]
) -> None:
    """A group, chord or chain member (its id frozen before the call), a retry sent
    by the main worker process, a caller waiting on an id it chose: the message is
    sent though its key is held, and its run meets the lock."""

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    take(work, 1)
    result = work.apply_async((1,), task_id="frozen-member")
    assert result.id == "frozen-member"
    assert sent == ["frozen-member"]
    assert work.delay(1).id == OTHER  # not given: the holder's result, nothing sent
    assert sent == ["frozen-member"]


def test_a_publish_duplicate_with_raise_or_wait_and_a_given_id_is_sent_at_once(
    app: Celery, sent: list[str]
) -> None:
    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
              redlock_on_duplicate="wait", redlock_wait=30)  # fmt: skip
    def waits(n: int) -> None: ...

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
              redlock_on_duplicate="raise")  # fmt: skip
    def raises(n: int) -> None: ...

    take(waits, 1)
    take(raises, 1)
    started = time.monotonic()
    waits.apply_async((1,), task_id="w-given")
    assert time.monotonic() - started < 5  # not redlock_wait
    raises.apply_async((1,), task_id="r-given")
    assert sent == ["w-given", "r-given"]
    with pytest.raises(DuplicateTask):
        raises.delay(1)


def test_publish_lock_under_task_always_eager_runs_the_call_and_locks_the_run(
    app: Celery,
) -> None:
    """Eager: apply_async runs the task at once; the run locks (a duplicate is
    skipped with an EagerResult whose get() answers), no publish lock is taken."""
    ran: list[int] = []

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> int:
        ran.append(n)
        return n

    assert work.delay(2).get() == 2
    take(work, 1)
    assert work.delay(1).get() is None
    assert ran == [2]


def test_a_failed_hand_over_frees_only_this_run_s_token_and_the_task_id(app: Celery) -> None:
    """The run's lock was lost and another delivery of the same task id took the key
    under its own token: the failed hand-over to the task id leaves that run's lock."""
    from celery_redlock.task import _Run

    @app.task(base=RedlockTask, shared=False)
    def work(n: int) -> None: ...

    settings = work.redlock_settings
    rl = manager(work)
    key = work.redlock_key_for((1,), {})
    mine = rl.acquire(key, 30, "tid-1|aaaaaa000001")
    rl.force_release(key)  # lost (Redis restarted empty, a long pause)
    rl.acquire(key, 30, "tid-1|bbbbbb000001")  # another delivery's run
    run = _Run(key, "tid-1", mine.value, settings, manager=rl, lock=mine)
    work._redlock_hand_over(run, 0.0)
    assert rl.holder(key) == "tid-1|bbbbbb000001"


def test_a_pydantic_task_locks_on_the_arguments_as_the_worker_receives_them(
    app: Celery, sent: list[str]
) -> None:
    """pydantic=True: a model argument is dumped before it is sent; the publish
    lock's key is the key of the dumped arguments, the one the run computes."""
    if Account is None:
        pytest.skip("pydantic is not installed")

    @app.task(base=RedlockTask, shared=False, pydantic=True, redlock_lock_on="publish")
    def sync(account: Account) -> int:
        return account.id

    result = sync.delay(Account(id=3, name="ada"))
    run_key = sync.redlock_key_for(({"id": 3, "name": "ada"},), {})
    assert manager(sync).holder(run_key) == result.id


def test_an_eager_retry_within_redlock_hold_runs_the_retry(app: Celery) -> None:
    """redlock_hold keeps a finished run's key; an eager retry, run at once under the
    same task id, is not that: its lock is released and the retried run takes it."""

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_hold=30)
    def work(self: Any, n: int) -> int:
        if not self.request.retries:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    assert work.apply((1,)).get() == 1


def test_an_eager_replacement_whose_hand_over_fails_still_runs(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-over to the task id fails (nodes down, the lock lost): what is left
    is released and the replacement takes the key like any other."""
    monkeypatch.setattr(Redlock, "reassign", lambda self, lock, value, ttl: False)

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_key=("account",))
    def page(self: Any, account: int, number: int) -> int:
        if number < 2:
            return int(self.replace(page.si(account, number + 1)))
        return number

    assert page.apply((7, 1), throw=True).get() == 2
    assert manager(page).holder(page.redlock_key_for((7, 0), {})) is None


def test_a_release_interrupted_by_a_signal_handler_is_tried_again(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soft time limit fires inside the release at the end of the body: the
    release is tried once more, so the key is not left to its TTL, and the
    exception still ends the run."""

    class Interrupted(Exception):
        pass

    release = Redlock.release
    calls: list[int] = []

    def interrupted_once(self: Redlock, *args: Any, **kwargs: Any) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise Interrupted
        return release(self, *args, **kwargs)

    monkeypatch.setattr(Redlock, "release", interrupted_once)

    @app.task(base=RedlockTask, shared=False)
    def work(n: int) -> int:
        return n

    with pytest.raises(Interrupted):
        work.apply((1,), throw=True)
    assert manager(work).holder(work.redlock_key_for((1,), {})) is None


def test_a_given_task_id_is_sent_also_when_the_nodes_are_down(app: Celery, sent: list[str]) -> None:
    """No quorum at publish time: a call whose id was given (a chain step the worker
    sends, a group member) is sent, and its run meets the lock; a plain call fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
              redlock_servers=[dead], redlock_node_timeout=0.05, redlock_retry_count=1)  # fmt: skip
    def work(n: int) -> None: ...

    assert work.apply_async((1,), task_id="chain-step").id == "chain-step"
    assert sent == ["chain-step"]
    with pytest.raises(LockNotAcquired):
        work.delay(1)


def test_a_pydantic_task_sent_with_pickle_keys_on_the_models_it_sends(
    app: Celery, sent: list[str]
) -> None:
    """With the pickle serializer Celery sends the models themselves, so the key is
    built from them, as the run will: one the key cannot encode fails at .delay()."""
    if Account is None:
        pytest.skip("pydantic is not installed")
    app.conf.task_serializer = "pickle"

    @app.task(base=RedlockTask, shared=False, pydantic=True, redlock_lock_on="publish")
    def sync(account: Account) -> int:
        return account.id

    with pytest.raises(RedlockConfigError, match="argument 'account' \\(Account\\)"):
        sync.delay(Account(id=3, name="ada"))
    assert sent == []


def test_a_key_function_sees_the_arguments_as_the_worker_receives_them(
    app: Celery, sent: list[str]
) -> None:
    """kombu's JSON turns a tuple into a list: the publish lock is taken under the
    key the run will compute from what it receives."""

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
              redlock_key=lambda ids, opts: f"{ids!r}:{sorted(opts)!r}")  # fmt: skip
    def work(ids: Any, opts: Any) -> None: ...

    result = work.delay((1, 2), {1: "a"})
    run_key = work.redlock_key_for(([1, 2], {"1": "a"}), {})
    assert manager(work).holder(run_key) == result.id


def test_a_publish_lock_for_a_call_due_in_decades_is_capped_not_refused(
    app: Celery, sent: list[str]
) -> None:
    """A countdown longer than the longest TTL Redis can keep: the call is sent, its
    publish lock held for that longest TTL (10 years)."""

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    result = work.apply_async((1,), countdown=40 * 365 * 24 * 3600)
    assert sent == [result.id]
    info = manager(work).inspect(work.redlock_key_for((1,), {}))
    assert info.holder == result.id
    left = info.ttl_left
    assert left is not None
    assert 9.9 * 365 * 24 * 3600 < left <= 10 * 365 * 24 * 3600


@pytest.fixture
def tokyo_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The host's local time 9 hours ahead of UTC."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_naive_eta_is_utc_as_celery_reads_it_not_the_host_s_local_time(
    app: Celery, sent: list[str], tokyo_time: None
) -> None:
    """The publish lock of a call due in 10 minutes (a naive UTC ETA, as
    ``datetime.utcnow()`` gives) covers those 10 minutes on a host whose local
    time is not UTC."""

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    naive_utc = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(minutes=10)
    work.apply_async((1,), eta=naive_utc)
    left = manager(work).inspect(work.redlock_key_for((1,), {})).ttl_left
    assert left is not None
    assert 600 + 30 - 5 < left <= 600 + 30


def test_a_soft_time_limit_landing_in_the_run_s_end_stops_renewals_and_frees_the_key(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SoftTimeLimitExceeded raised (by a signal handler, as in a prefork child)
    while the run's end waits for a renewal in flight: the key is freed and never
    renewed again, not kept alive by the renewer after the task ended."""
    real_extend = Redlock.extend

    def slow_extend(self: Redlock, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "celery-redlock-renewer":
            time.sleep(0.3)  # a renewal in flight (a slow node)
        return real_extend(self, *args, **kwargs)

    def on_alarm(signum: int, frame: Any) -> None:
        raise celery.exceptions.SoftTimeLimitExceeded()

    monkeypatch.setattr(Redlock, "extend", slow_extend)
    lost: list[dict[str, Any]] = []

    def record_lost(sender: Any = None, **kwargs: Any) -> None:
        lost.append(kwargs)

    lock_lost.connect(record_lost, weak=False, dispatch_uid="soft-end")
    previous = signals_os.signal(signals_os.SIGALRM, on_alarm)

    @app.task(base=RedlockTask, shared=False, redlock_ttl=0.9)
    def soft(x: str) -> str:
        time.sleep(0.4)  # the renewal due at 0.3 s is in flight until about 0.6 s
        signals_os.setitimer(signals_os.ITIMER_REAL, 0.05)  # fires in the run's end
        return "ok"

    try:
        result = soft.apply(("k",))
    finally:
        signals_os.setitimer(signals_os.ITIMER_REAL, 0)
        signals_os.signal(signals_os.SIGALRM, previous)
    assert isinstance(result.result, celery.exceptions.SoftTimeLimitExceeded)
    key = soft.redlock_key_for(("k",), {})
    try:
        time.sleep(0.5)  # the renewal in flight has ended
        assert manager(soft).holder(key) is None
        time.sleep(1.2)  # more than the TTL: a renewer still at work would have kept it
        assert manager(soft).holder(key) is None
    finally:
        lock_lost.disconnect(dispatch_uid="soft-end")
    assert lost == []  # the renewal in flight found the key freed: not a lost lock


@pytest.mark.parametrize("celery_call", ["5.3-5.5", "5.6+"])
def test_a_running_task_cancelled_by_the_worker_frees_its_child_s_run_once_it_is_gone(
    app: Celery, monkeypatch: pytest.MonkeyPatch, celery_call: str
) -> None:
    """Request.cancel (cold shutdown, broker connection lost): the child is signalled
    and its run's release is scheduled by its pid, whichever way Celery calls it."""
    from celery.contrib.testing.mocks import TaskMessage

    from celery_redlock import signals

    @app.task(base=RedlockTask, shared=False)
    def work(n: int) -> int:
        return n

    signalled: list[tuple[int, int]] = []
    scheduled: list[tuple[Any, ...]] = []

    class Pool:
        def terminate_job(self, pid: int, signum: int) -> None:
            signalled.append((pid, signum))

    monkeypatch.setattr(signals, "_release_later", lambda *args: scheduled.append(args))
    monkeypatch.setattr(signals.RedlockRequest, "_announce_cancelled", lambda self, **kw: None)
    request = signals.RedlockRequest(TaskMessage(work.name, "tid-1", args=(3,)), app=app, task=work)
    request.on_accepted(4242, time.monotonic())
    if celery_call == "5.3-5.5":  # Request.cancel(self, pool, signal=None): no emit_retry
        from celery.worker.request import Request

        newer = Request.cancel

        def older(self: Any, pool: Any, signal: Any = None) -> Any:
            return newer(self, pool, signal)

        monkeypatch.setattr(Request, "cancel", older)
        request.cancel(Pool())
    else:
        request.cancel(Pool(), emit_retry=False)
    assert signalled == [(4242, signals_os.SIGTERM)]
    assert scheduled == [(work, "tid-1", (3,), {}, "cancelled", 4242)]


# ---------------------------------------------------------------------------
# Calls that are no duplicates, and runs that must not be skipped


def _split(servers: list[fakeredis.FakeRedis], key: str) -> None:
    """Two other tokens on one node each, the third node free: no one holds the key
    on a quorum, and no acquire can win it."""
    servers[0].set(key, "one-contender", px=30_000)
    servers[1].set(key, "another-contender", px=30_000)


@pytest.mark.parametrize("on_unavailable", ["fail", "run"])
def test_a_run_that_meets_a_split_vote_is_sent_again_not_skipped_nor_run_unlocked(
    app: Celery,
    servers: list[fakeredis.FakeRedis],
    sent: list[str],
    seen: list[tuple[str, dict[str, Any]]],
    on_unavailable: str,
) -> None:
    """No one holds the key on a quorum (votes split between contenders, or a
    holder's nodes down): the run is no proven duplicate. It is neither skipped
    (ending as a success with no run behind the key) nor run unlocked (beside a
    holder whose nodes are down), also under redlock_on_unavailable="run": it is
    sent again, same task id, to run later. Eager (no broker), it fails."""
    from celery.app.trace import build_tracer

    ran: list[int] = []

    @app.task(base=RedlockTask, shared=False, redlock_retry_count=2,
              redlock_on_unavailable=on_unavailable)  # fmt: skip
    def work(n: int) -> int:
        ran.append(n)
        return n

    _split(servers, work.redlock_key_for((1,), {}))
    trace = build_tracer(work.name, work, app=app, eager=False, hostname="h")
    outcome = trace("split-run", (1,), {}, {"id": "split-run", "delivery_info": {}})
    assert outcome.info.state == "IGNORED", (outcome.info.state, outcome.info.retval)
    assert sent == ["split-run"]  # the same message, sent again
    assert ran == []
    assert [name for name, _ in seen if name == "lock_skipped"] == []
    app.conf.task_always_eager = True
    result = work.apply((1,))
    assert result.state == "FAILURE"
    assert isinstance(result.result, LockNotAcquired)
    assert ran == []


def test_a_callback_the_worker_sends_for_a_finished_task_never_fails_that_task(
    app: Celery, sent: list[str]
) -> None:
    """A ``link=`` callback with a publish lock whose key is held: the worker sends
    it for the task that has just run (parent_id: that task's id). It is sent (its
    run meets the lock), not raised as the parent's failure after the parent's
    body succeeded."""
    from celery.app.trace import build_tracer

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
              redlock_on_duplicate="raise")  # fmt: skip
    def refresh(n: int) -> None: ...

    @app.task(shared=False)
    def parent(n: int) -> int:
        return n

    take(refresh, 5)
    trace = build_tracer(parent.name, parent, app=app, eager=False, hostname="h")
    outcome = trace(
        "parent-id", (5,), {}, {"id": "parent-id", "callbacks": [refresh.s()]}
    )
    assert outcome.info is None, outcome.info  # no failure (TraceInfo) for the parent
    assert outcome.retval == 5
    assert len(sent) == 1  # the callback went out
    # A call of its own (no parent_id of a running task) is still a duplicate.
    with pytest.raises(DuplicateTask):
        refresh.delay(5)


def test_a_publish_duplicate_due_after_the_holder_s_time_left_is_sent(
    app: Celery, sent: list[str]
) -> None:
    """A call scheduled past the lock's time left is a later round of the work, not
    a duplicate of the run holding it now: sent (its run meets the lock). One due
    within the time left is still dropped."""

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    take(work, 1)  # 30 s left
    assert work.apply_async((1,), countdown=10).id == OTHER  # a duplicate: not sent
    assert sent == []
    later = work.apply_async((1,), countdown=3600)
    assert sent == [later.id]
    later_eta = work.apply_async((1,), eta=datetime.now(timezone.utc) + timedelta(hours=6))
    assert sent == [later.id, later_eta.id]


def test_a_retried_publish_duplicate_never_runs_before_the_caller_asked(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redlock_on_duplicate="retry" at publish time: the call is sent to run after
    the holder's time left, and never before its own countdown."""
    app.conf.task_always_eager = False
    countdowns: list[float] = []

    def fake_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        countdowns.append(kwargs["countdown"])
        return self.AsyncResult(kwargs["task_id"])

    monkeypatch.setattr(celery.app.task.Task, "apply_async", fake_send)
    monkeypatch.setattr("celery_redlock.task.random.uniform", lambda a, b: a)  # least jitter

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
              redlock_on_duplicate="retry")  # fmt: skip
    def work(n: int) -> None: ...

    take(work, 1)  # 30 s left: sent again after 0.75 x 30 s at the least
    work.apply_async((1,), countdown=29)
    work.apply_async((1,))
    assert countdowns[0] == 29
    assert 22 < countdowns[1] <= 22.5


def test_a_run_scheduling_its_next_round_under_a_publish_lock_sends_it(
    app: Celery, sent: list[str]
) -> None:
    """The run holding a key calls ``apply_async`` with the same arguments (a task
    that reschedules itself): the call is sent, not answered with the run's own
    result (which would end the chain of rounds)."""
    from celery.app.trace import build_tracer

    calls: list[str] = []

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def poll(feed: str) -> None:
        calls.append(poll.apply_async((feed,), countdown=5).id)

    trace = build_tracer(poll.name, poll, app=app, eager=False, hostname="h")
    outcome = trace("round-1", ("f",), {}, {"id": "round-1"})
    assert outcome.info is None, outcome.info
    assert len(calls) == 1
    assert calls[0] != "round-1"
    assert sent == calls


def test_a_key_held_for_a_revoked_queued_task_is_taken_over(app: Celery) -> None:
    """A publish lock (or a retry's) held under a task id whose message was revoked:
    that message will not run, so a run of the same key takes the key over rather
    than being skipped for an hour-long countdown."""
    from celery.worker import state as worker_state

    ran: list[int] = []

    @app.task(base=RedlockTask, shared=False)
    def work(n: int) -> int:
        ran.append(n)
        return n

    key = take(work, 1, token="queued-and-revoked")
    assert work.apply((1,)).state == "SUCCESS"
    assert ran == []  # not revoked: a duplicate, skipped
    worker_state.revoked.add("queued-and-revoked")
    try:
        assert work.apply((1,)).state == "SUCCESS"
    finally:
        worker_state.revoked.discard("queued-and-revoked")
    assert ran == [1]
    assert manager(work).holder(key) is None
    # A revoked run (a token with its run mark) that runs on keeps its lock.
    take(work, 2, token="revoked-run|0123456789ab")
    worker_state.revoked.add("revoked-run")
    try:
        work.apply((2,))
    finally:
        worker_state.revoked.discard("revoked-run")
    assert ran == [1]


def test_an_eager_duplicate_under_the_retry_policy_fails_at_once(app: Celery) -> None:
    """apply() runs a retry at once: retrying a duplicate would spin (and recurse
    without end under max_retries=None); it fails with DuplicateTask instead."""

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_on_duplicate="retry",
              max_retries=None)  # fmt: skip
    def work(self: Any, n: int) -> int:
        return n

    take(work, 1)
    started = time.monotonic()
    result = work.apply((1,))
    assert isinstance(result.result, DuplicateTask)
    assert time.monotonic() - started < 2


def test_a_run_s_end_cut_short_before_it_stops_renewals_still_frees_the_key(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soft time limit landing at the very start of the run's end, before the
    renewals are stopped: the postrun net stops them and frees the key, not a
    renewer keeping it held for as long as the process lives."""
    import celery_redlock.task as task_module

    armed = threading.Event()

    class CutShortRun(task_module._Run):
        """A run whose end is interrupted the first time it reads the start time."""

        @property
        def acquired_at(self) -> float:
            if armed.is_set():
                armed.clear()
                raise celery.exceptions.SoftTimeLimitExceeded()
            return float(self.__dict__.get("_at", 0.0))

        @acquired_at.setter
        def acquired_at(self, value: float) -> None:
            self.__dict__["_at"] = value

    monkeypatch.setattr(task_module, "_Run", CutShortRun)

    @app.task(base=RedlockTask, shared=False, redlock_ttl=0.9)
    def work(x: str) -> str:
        armed.set()
        return "ok"

    result = work.apply(("k",))
    assert isinstance(result.result, celery.exceptions.SoftTimeLimitExceeded)
    key = work.redlock_key_for(("k",), {})
    assert manager(work).holder(key) is None
    time.sleep(1.3)  # past the TTL: still free (no renewal set it again)
    assert manager(work).holder(key) is None


def test_a_key_function_sees_the_arguments_as_any_serializer_delivers_them(
    app: Celery, sent: list[str]
) -> None:
    """Not only kombu's JSON: a serializer of the registry (yaml and msgpack turn
    tuples into lists too) delivers what the key function is given at publish time,
    so the publish lock is under the key the run computes."""
    import json

    from kombu.serialization import register, unregister

    register("lists-only", json.dumps, json.loads, "application/x-lists-only", "utf-8")
    try:

        @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish",
                  serializer="lists-only", redlock_key=lambda ids: repr(ids))  # fmt: skip
        def work(ids: Any) -> None: ...

        result = work.delay((1, 2))
        assert manager(work).holder(work.redlock_key_for(([1, 2],), {})) == result.id
    finally:
        unregister("lists-only")


def test_a_publish_takes_over_a_hold_whose_task_the_result_backend_says_was_revoked(
    app: Celery, sent: list[str]
) -> None:
    """Celery stores REVOKED for a queued task when a revoke reaches a worker: a
    publisher (not told of the revoke itself) asks the task's result backend about
    a bare task id's hold, and takes the key over instead of dropping its call."""
    app.conf.result_backend = "cache+memory://"

    @app.task(base=RedlockTask, shared=False, redlock_lock_on="publish")
    def work(n: int) -> None: ...

    key = take(work, 1, token="queued-x")
    assert work.delay(1).id == "queued-x"  # a duplicate of the queued call
    assert sent == []
    work.backend.mark_as_revoked("queued-x", reason="revoked")
    result = work.delay(1)
    assert sent == [result.id]
    assert manager(work).holder(key) == result.id


def test_a_lock_granted_too_slowly_fails_the_run_not_sent_again(
    app: Celery, sent: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every node said yes, but too late for any validity (a TTL close to the nodes'
    latency): no one else holds the key, so this is no contention to wait out; the
    run fails with LockNotAcquired (and its advice), not sent again and again."""
    from celery.app.trace import build_tracer

    from celery_redlock.exceptions import NodeVote, Vote

    ran: list[int] = []

    @app.task(base=RedlockTask, shared=False, redlock_retry_count=1)
    def work(n: int) -> int:
        ran.append(n)
        return n

    def too_slow(self: Redlock, resource: str, *args: Any, **kwargs: Any) -> Any:
        votes = [NodeVote(node.name, Vote.YES) for node in self.nodes]
        raise LockNotAcquired(resource, votes, 1)

    monkeypatch.setattr(Redlock, "acquire", too_slow)
    trace = build_tracer(work.name, work, app=app, eager=False, hostname="h")
    outcome = trace("slow-run", (1,), {}, {"id": "slow-run", "delivery_info": {}})
    assert outcome.info.state == "FAILURE", outcome.info.state
    assert isinstance(outcome.info.retval, LockNotAcquired)
    assert sent == []
    assert ran == []
