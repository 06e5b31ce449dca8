"""Shared fixtures: real redis-server nodes (never the shared Redis on 6379)
and the local RabbitMQ, when there is one.

Deliberately imports nothing from celery_redlock, and defines none of the
fixture names pytest-celery's plugin owns (celery_app, celery_config,
celery_worker, ...).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.servers import RedisNodes, RedisServer, find_redis_server, reset_nodes

SESSION_NODES = 5
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
RABBITMQ_URL = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}//"

FreshNodes = Callable[..., list[RedisServer]]


@pytest.fixture(scope="session")
def redis_nodes() -> Iterator[list[RedisServer]]:
    """Five independent redis-server masters, shared by the whole session.

    Tests may kill, pause or stop them; ``redis_urls`` repairs them.
    """
    nodes = RedisNodes(SESSION_NODES).start()
    try:
        yield nodes.nodes
    finally:
        nodes.stop()


@pytest.fixture
def redis_urls(redis_nodes: list[RedisServer]) -> list[str]:
    """URLs of the five session nodes, each running, resumed and empty."""
    reset_nodes(redis_nodes)
    return [node.url for node in redis_nodes]


@pytest.fixture
def fresh_nodes() -> Iterator[FreshNodes]:
    """Factory: ``fresh_nodes(n, **RedisServer_kwargs)`` starts n new nodes,
    all stopped at teardown. For tests that kill, pause or restart nodes."""
    groups: list[RedisNodes] = []

    def start(count: int, **server_kwargs: Any) -> list[RedisServer]:
        group = RedisNodes(count, **server_kwargs)
        groups.append(group)
        return group.start().nodes

    try:
        yield start
    finally:
        for group in groups:
            group.stop()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The local RabbitMQ broker URL; skips the test when nothing listens."""
    try:
        with socket.create_connection((RABBITMQ_HOST, RABBITMQ_PORT), timeout=1.0):
            pass
    except OSError as exc:
        pytest.skip(f"no RabbitMQ on {RABBITMQ_HOST}:{RABBITMQ_PORT}: {exc}")
    return RABBITMQ_URL


def pytest_report_header() -> str:
    """Say which redis-server the nodes run, so a CI log shows the path taken."""
    try:
        binary = find_redis_server()
    except RuntimeError as exc:
        return f"redis-server: none ({exc})"
    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError as exc:
        version = f"cannot run: {exc}"
    return f"redis-server: {binary} ({version})"
