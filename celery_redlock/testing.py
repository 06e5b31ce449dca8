"""Helpers for your own tests: RedlockTask over in-memory Redis nodes.

Needs ``fakeredis`` with Lua (``pip install "fakeredis[lua]"``)::

    from celery_redlock.testing import fake_redlock, lock_holder

    def test_sync_is_skipped_while_running(app):
        app.conf.task_always_eager = True
        with fake_redlock(app):
            assert lock_holder(sync_account, 42) is None
            sync_account.delay(42)

Each fake node is a separate in-memory server, so quorum logic runs as in
production; nothing leaves the process. Eager runs (``task_always_eager`` or
``.apply()``) lock exactly as a worker's runs do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .config import forget_managers, get_redlock
from .exceptions import RedlockConfigError

__all__ = ["fake_redlock", "fake_servers", "lock_holder", "reset_settings"]


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


@contextmanager
def fake_redlock(app: Any, count: int = 3) -> Iterator[list[Any]]:
    """Point ``app``'s ``redlock_servers`` at ``count`` fakeredis nodes for the block.

    Yields the fake clients (inspect them, or pre-set a key to play another
    holder). The previous configuration is restored afterwards.
    """
    servers = fake_servers(count)
    saved = {name: app.conf.get(name) for name in ("redlock_servers", "redlock_version_check")}
    app.conf.update(redlock_servers=servers, redlock_version_check=False)
    reset_settings(app)
    try:
        yield servers
    finally:
        app.conf.update(saved)
        reset_settings(app)
        forget_managers()


def lock_holder(task: Any, *args: Any, **kwargs: Any) -> str | None:
    """The task id holding ``task``'s lock for these arguments, or None."""
    key = task.redlock_key_for(args, kwargs)
    holder: str | None = get_redlock(task.redlock_settings).holder(key)
    return holder
