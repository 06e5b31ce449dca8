"""Fixtures for the Celery integration tests: a Redis broker of their own
(never a lock node, never the shared 6379), and helpers to watch lock keys.

The lock nodes are the session's redis-server nodes (``redis_nodes`` in
tests/conftest.py); a test that needs them clean asks for ``redis_urls``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import RedisServer

#: How many of the session's nodes hold the Celery tests' locks.
LOCK_NODES = 3


@pytest.fixture(scope="session")
def broker_server() -> Iterator[RedisServer]:
    """One redis-server for the Celery brokers and result backends (db 1-15)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def lock_servers(redis_nodes: list[RedisServer]) -> list[str]:
    """URLs of the lock nodes the Celery tests use (three of the session's nodes)."""
    return [node.url for node in redis_nodes[:LOCK_NODES]]
