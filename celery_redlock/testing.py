"""Helpers for your own tests: RedlockTask over in-memory Redis nodes.

Needs ``fakeredis`` with Lua (``pip install "fakeredis[lua]"``)::

    from celery_redlock.testing import fake_redlock, lock_holder, node_down

    def test_sync_is_skipped_while_running(app):
        app.conf.task_always_eager = True
        with fake_redlock(app) as nodes:
            assert lock_holder(sync_account, 42) is None
            sync_account.delay(42)
            with node_down(*nodes[:2]):  # no quorum: LockNotAcquired
                ...

Each fake node is a separate in-memory server, so quorum logic runs as in
production; nothing leaves the process. Eager runs (``task_always_eager`` or
``.apply()``) lock exactly as a worker's runs do.

A node taken down (:func:`node_down`, :func:`stop_node`) refuses every
connection and command with ``redis.ConnectionError``, as a stopped server
does, and keeps its data. A node brought back is used again at once: the
cool-down during which a lock manager skips a failed node is ended for it.

With pytest, :func:`fake_redlock_fixture` makes a fixture of
:func:`fake_redlock` for your conftest. pytest is imported only then.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._nodes import _FANOUTS, parse_server
from .config import _set_on_task, forget_managers, get_redlock
from .exceptions import RedlockConfigError
from .keys import task_id_of

__all__ = [
    "fake_redlock",
    "fake_redlock_fixture",
    "fake_servers",
    "lock_holder",
    "node_down",
    "node_name",
    "reset_settings",
    "start_node",
    "stop_node",
]


def fake_servers(count: int = 3) -> list[Any]:
    """``count`` fakeredis clients, each on a server of its own: Redlock nodes."""
    try:
        import fakeredis
    except ImportError:  # pragma: no cover - depends on the environment
        raise RedlockConfigError(
            'celery_redlock.testing needs fakeredis with Lua: pip install "fakeredis[lua]"'
        ) from None
    return [fakeredis.FakeRedis(server=fakeredis.FakeServer()) for _ in range(count)]


def reset_settings(app: Any) -> None:
    """Forget the settings the app's RedlockTasks resolved (after changing ``app.conf``)."""
    for task in app.tasks.values():
        if getattr(task, "__redlock_task__", False):
            type(task)._redlock_resolved = None


_ABSENT = object()


@contextmanager
def fake_redlock(app: Any, count: int = 3) -> Iterator[list[Any]]:
    """Point ``app``'s ``redlock_servers`` at ``count`` fakeredis nodes for the block.

    Yields the fake clients (inspect them, or pre-set a key to play another
    holder). A task whose class sets its own ``redlock_servers`` (or
    ``redlock_version_check``), also to None (the broker), uses the fakes too.
    Every ``redlock_*`` setting of ``app.conf`` is restored afterwards, also
    those the block changed: a setting the app did not have is removed again,
    not left set to None.
    """
    servers = fake_servers(count)
    fake = {"redlock_servers": servers, "redlock_version_check": False}
    app.conf.get("redlock_servers")  # loads a configuration still pending
    changes = app.conf.changes
    saved = {
        name: value
        for name, value in changes.items()
        if isinstance(name, str) and name.lower().startswith("redlock_")
    }
    overridden: list[tuple[type, str, Any]] = []  # (class, name, its own value or _ABSENT)
    for task in app.tasks.values():
        if getattr(task, "__redlock_task__", False):
            cls = type(task)
            for name, value in fake.items():
                # A task's attribute (its own or a base's) wins over app.conf.
                if (
                    getattr(cls, name, None) is not None or _set_on_task(task, name)
                ) and (cls, name) not in {
                    (c, n) for c, n, _ in overridden
                }:
                    overridden.append((cls, name, vars(cls).get(name, _ABSENT)))
                    setattr(cls, name, value)
    app.conf.update(fake)
    reset_settings(app)
    try:
        yield servers
    finally:
        changes = app.conf.changes
        for name in [n for n in changes if isinstance(n, str) and n.lower().startswith("redlock_")]:
            if name not in saved:
                changes.pop(name, None)
        changes.update(saved)
        for cls, name, value in reversed(overridden):
            if value is _ABSENT:
                delattr(cls, name)  # inherited again from its base
            else:
                setattr(cls, name, value)
        reset_settings(app)
        forget_managers()


def lock_holder(task: Any, *args: Any, **kwargs: Any) -> str | None:
    """The task id holding ``task``'s lock for these arguments, or None."""
    key = task.redlock_key_for(args, kwargs)
    return task_id_of(get_redlock(task.redlock_settings).holder(key))


# -- nodes that go down ---------------------------------------------------------


def _fake_server(node: Any) -> Any:
    """The fakeredis server behind the client ``node``; TypeError for anything else."""
    kwargs = getattr(getattr(node, "connection_pool", None), "connection_kwargs", None)
    server = kwargs.get("server") if isinstance(kwargs, dict) else None
    if server is None or not hasattr(server, "connected"):
        raise TypeError(
            f"{node!r} is not a fake node; give a client fake_redlock() or fake_servers() made"
        )
    return server


def node_name(node: Any) -> str:
    """The name lock managers give ``node`` in votes, errors and logs."""
    return parse_server(node).name


def stop_node(node: Any) -> None:
    """Take the fake node ``node`` down until :func:`start_node`.

    Every connection and command to it then fails with
    ``redis.ConnectionError``, as with a stopped server; its data is kept.
    """
    _fake_server(node).connected = False


def start_node(node: Any) -> None:
    """Bring the fake node ``node`` back, with the data it had.

    A lock manager skips a node that failed for a cool-down (up to a second);
    this ends it for ``node`` in every manager of the process, so the next
    call uses the node again.
    """
    server = _fake_server(node)
    server.connected = True
    for fanout in list(_FANOUTS):
        for known, health in zip(fanout.nodes, fanout._health):
            if dict(known.connection_kwargs).get("server") is server:
                health.down_until = 0.0


@contextmanager
def node_down(*nodes: Any) -> Iterator[None]:
    """Take the fake ``nodes`` down for the block, then bring them back.

    ``with node_down(*nodes[:2]):`` leaves one node of three: no quorum, so a
    RedlockTask run fails with LockNotAcquired (``redlock_on_unavailable=
    "fail"``) or runs unlocked (``"run"``). A node already down when the
    block starts stays down after it. No nodes: nothing changes.
    """
    servers = [_fake_server(node) for node in nodes]
    stopped = [node for node, server in zip(nodes, servers) if server.connected]
    for node in stopped:
        stop_node(node)
    try:
        yield
    finally:
        for node in stopped:
            start_node(node)


def fake_redlock_fixture(app: Any, count: int = 3) -> Any:
    """A pytest fixture running each test that asks for it inside :func:`fake_redlock`.

    ``app`` is the Celery app, or the name of the fixture that gives it. The
    fixture yields the fake nodes and restores the app's configuration after
    the test. Its name is the one you assign it to, in a conftest.py::

        from celery_redlock.testing import fake_redlock_fixture

        redlock_nodes = fake_redlock_fixture("celery_app")

        def test_sync(celery_app, redlock_nodes): ...
    """
    import pytest

    def fixture(request: Any) -> Iterator[list[Any]]:
        target = request.getfixturevalue(app) if isinstance(app, str) else app
        with fake_redlock(target, count) as nodes:
            yield nodes

    return pytest.fixture(fixture)
