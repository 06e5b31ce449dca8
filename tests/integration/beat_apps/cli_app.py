"""The app ``celery -A tests.integration.beat_apps.cli_app redlock ...`` loads.

In-process tests (click's CliRunner) set ``app.conf.redlock_servers`` and
friends before each call; a subprocess configures it from
``REDLOCK_TEST_SERVERS`` (comma-separated) and ``REDLOCK_TEST_PREFIX``.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cli_test", broker="memory://", set_as_current=False)
_servers = [s for s in os.environ.get("REDLOCK_TEST_SERVERS", "").split(",") if s]
if _servers:
    app.conf.redlock_servers = _servers
if os.environ.get("REDLOCK_TEST_PREFIX") is not None:
    app.conf.redlock_key_prefix = os.environ["REDLOCK_TEST_PREFIX"]
