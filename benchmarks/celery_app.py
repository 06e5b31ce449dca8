"""The Celery app of the Celery benchmark (item 4): one trivial task, plain and locked.

The ``celery worker`` subprocess imports this module (``-A benchmarks.celery_app``)
and builds the app from the environment the benchmark sets; the benchmark
process builds the same app with :func:`make_app` to publish and read results.

- ``bench.plain``: ``return i`` (a plain ``Task``);
- ``bench.locked``: the same body with ``base=RedlockTask`` and every default
  (key: the task name and all arguments, TTL 30 s, renewed while it runs,
  released when the body ends), on the lock nodes;
- ``bench.locked_broker``: the same, its locks on the broker's own Redis
  server (one node): what ``base=RedlockTask`` does with a Redis broker and
  ``redlock_servers`` unset.

Environment: :data:`BROKER_ENV` (broker URL), :data:`BACKEND_ENV` (result
backend URL), :data:`LOCKS_ENV` (lock nodes, comma-separated),
:data:`QUEUE_ENV` (the queue to consume) and, for profiling,
:data:`LOCKED_OPTIONS_ENV`: a JSON object of extra options for ``bench.locked``
(``{"redlock_auto_extend": false}``: what the renewal costs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery

from celery_redlock import RedlockTask

__all__ = [
    "BACKEND_ENV",
    "BROKER_ENV",
    "LOCKED",
    "LOCKED_BROKER",
    "LOCKED_OPTIONS_ENV",
    "LOCKS_ENV",
    "PLAIN",
    "QUEUE_ENV",
    "app",
    "make_app",
]

BROKER_ENV = "BENCH_CELERY_BROKER"
BACKEND_ENV = "BENCH_CELERY_BACKEND"
LOCKS_ENV = "BENCH_CELERY_LOCKS"
QUEUE_ENV = "BENCH_CELERY_QUEUE"
LOCKED_OPTIONS_ENV = "BENCH_CELERY_LOCKED_OPTIONS"

PLAIN = "bench.plain"
LOCKED = "bench.locked"
LOCKED_BROKER = "bench.locked_broker"


def _body(i: int) -> int:
    return i


def make_app(
    broker: str | None,
    backend: str | None,
    locks: Sequence[str],
    queue: str,
    locked_options: Mapping[str, Any] | None = None,
) -> Any:
    """The benchmark's app: the three tasks, JSON, results in ``backend``.

    ``locked_options``: extra task options (``redlock_*``) for both locked tasks.
    """
    app = Celery("bench_celery", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        result_backend=backend,
        redlock_servers=list(locks) or None,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        result_expires=600,
    )
    app.task(name=PLAIN, shared=False)(_body)
    options = dict(locked_options or {})
    app.task(name=LOCKED, base=RedlockTask, shared=False, **options)(_body)
    if broker is not None and broker.startswith(("redis://", "rediss://")):
        # What redlock_servers unset gives (the app sets it, for bench.locked): the broker.
        options["redlock_servers"] = broker
        app.task(name=LOCKED_BROKER, base=RedlockTask, shared=False, **options)(_body)
    return app


app = make_app(
    os.environ.get(BROKER_ENV),
    os.environ.get(BACKEND_ENV),
    [s for s in os.environ.get(LOCKS_ENV, "").split(",") if s],
    os.environ.get(QUEUE_ENV, "bench-celery"),
    json.loads(os.environ.get(LOCKED_OPTIONS_ENV) or "{}"),
)
