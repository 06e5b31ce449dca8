"""Same wire format as the other Redlock clients: a lock taken here blocks
redlock-py and pottery, and theirs block ours.

redlock-py writes ``SET <resource> <token> NX PX`` as we do; pottery prefixes
its keys with ``redlock:`` (``pottery.base.Primitive.key``), so its key "x" is
our resource "redlock:x".
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_redlock import Redlock
from tests.servers import RedisServer


@pytest.fixture
def ours(redis_urls: list[str]) -> Iterator[Redlock]:
    rl = Redlock(redis_urls, retry_count=0)
    yield rl
    rl.close()


@pytest.fixture
def clients(redis_urls: list[str], redis_nodes: list[RedisServer]) -> Iterator[list[redis.Redis]]:
    made = [node.client() for node in redis_nodes]
    yield made
    for client in made:
        client.close()


# --------------------------------------------------------------------------
# redlock-py


@pytest.fixture
def redlock_py(redis_urls: list[str], redis_nodes: list[RedisServer]) -> Any:
    module = pytest.importorskip("redlock")
    if not hasattr(module, "Redlock"):
        pytest.skip("the installed 'redlock' module is not redlock-py")
    return module.Redlock(
        [{"host": node.host, "port": node.port} for node in redis_nodes],
        retry_count=1,
        retry_delay=0.01,
    )


def test_our_lock_blocks_redlock_py(ours: Redlock, redlock_py: Any) -> None:
    lock = ours.lock("x", 10)
    assert lock is not None
    assert redlock_py.lock("x", 10_000) is False
    assert ours.release(lock) is True
    theirs = redlock_py.lock("x", 10_000)
    assert theirs
    redlock_py.unlock(theirs)


def test_redlock_py_lock_blocks_ours(
    ours: Redlock, redlock_py: Any, clients: list[redis.Redis]
) -> None:
    theirs = redlock_py.lock("x", 10_000)
    assert theirs
    token = theirs.key.decode()
    assert [c.get("x") for c in clients] == [theirs.key] * len(clients)  # key "x", no prefix
    assert ours.lock("x", 10) is None
    assert ours.holder("x") == token
    redlock_py.unlock(theirs)
    lock = ours.lock("x", 10)
    assert lock is not None
    assert ours.release(lock) is True


def test_we_can_release_and_extend_a_redlock_py_lock_by_its_token(
    ours: Redlock, redlock_py: Any, clients: list[redis.Redis]
) -> None:
    theirs = redlock_py.lock("x", 1_000)
    assert theirs
    assert ours.extend("x", 30, theirs.key.decode()) is True
    assert all(c.pttl("x") > 20_000 for c in clients)
    assert ours.release("x", theirs.key.decode()) is True
    assert [c.get("x") for c in clients] == [None] * len(clients)


# --------------------------------------------------------------------------
# pottery


@pytest.fixture
def pottery(redis_urls: list[str]) -> Any:
    return pytest.importorskip("pottery")


def pottery_lock(pottery: Any, clients: list[redis.Redis], key: str) -> Any:
    return pottery.Redlock(key=key, masters=set(clients), auto_release_time=10)


def test_our_lock_blocks_pottery(ours: Redlock, pottery: Any, clients: list[redis.Redis]) -> None:
    theirs = pottery_lock(pottery, clients, "x")
    assert theirs.key == "redlock:x"
    lock = ours.lock("redlock:x", 10)
    assert lock is not None
    assert theirs.acquire(blocking=False) is False
    assert ours.release(lock) is True
    assert theirs.acquire(blocking=False) is True
    theirs.release()


def test_pottery_lock_blocks_ours(ours: Redlock, pottery: Any, clients: list[redis.Redis]) -> None:
    theirs = pottery_lock(pottery, clients, "x")
    assert theirs.acquire(blocking=False) is True
    assert ours.lock("redlock:x", 10) is None
    info = ours.inspect("redlock:x")
    assert info.nodes_holding == len(clients)
    assert info.holder is not None
    assert ours.lock("x", 10) is not None  # an unprefixed "x" is another key
    theirs.release()
    lock = ours.lock("redlock:x", 10)
    assert lock is not None
    assert ours.release(lock) is True
