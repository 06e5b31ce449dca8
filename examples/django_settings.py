"""Configuring celery_redlock from Django settings.

With ``namespace="CELERY"``, every setting is the upper-case name with the
``CELERY_`` prefix: ``redlock_servers`` is ``CELERY_REDLOCK_SERVERS``,
``redlock_ttl`` is ``CELERY_REDLOCK_TTL``, and so on. In a project the two
files are::

    # proj/settings.py
    CELERY_BROKER_URL = "redis://broker:6379/0"
    CELERY_REDLOCK_SERVERS = [                # independent masters, not replicas
        "redis://r1:6379/0",
        "redis://r2:6379/0",
        "redis://r3:6379/0",
    ]
    CELERY_REDLOCK_TTL = 60.0                 # seconds; renewed while a task runs
    CELERY_REDLOCK_ON_DUPLICATE = "skip"      # or "raise", "retry", "wait"
    CELERY_REDLOCK_KEY_PREFIX = "proj:lock:"
    CELERY_REDLOCK_BEAT_TTL = 30.0            # with -S celery_redlock.beat:RedlockScheduler

    # proj/celery.py
    import os
    from celery import Celery

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.autodiscover_tasks()

A task attribute of the same name (``redlock_ttl=...`` in ``@app.task``) wins
over the setting for that task. A misspelt ``CELERY_REDLOCK_*`` setting stops
the worker at start-up with a message naming it.

This program needs no Django: it builds a plain object with the same names
as ``proj/settings.py`` and loads it the same way, then shows what the app
and a task read from it. Lock nodes come from ``REDLOCK_SERVERS``::

    REDLOCK_SERVERS=redis://r1:6379/0,redis://r2:6379/0,redis://r3:6379/0 \\
        python examples/django_settings.py

It prints, e.g.::

    app.conf.get('redlock_servers') -> ['redis://r1:6379/0', ...]
    app.conf.get('redlock_ttl') -> 60.0
    app.conf.get('redlock_beat_ttl') -> 30.0
    refresh_feed's settings: ttl 60.0, on_duplicate 'skip', key_prefix 'proj:lock:', servers 3
    nightly_export's settings: ttl 600.0 (its own attribute wins)
    refresh_feed(3) ran holding its lock proj:lock:proj.refresh_feed:... -> True
    a worker with CELERY_REDLOCK_TTL_SECONDS refuses to start: ... did you mean CELERY_REDLOCK_TTL?
"""

from __future__ import annotations

import os
import types

from celery import Celery

from celery_redlock import RedlockConfigError, RedlockTask
from celery_redlock.config import validate_app

# -- proj/settings.py (here a plain object with the same names) ---------------
settings = types.SimpleNamespace(
    DEBUG=False,  # Django's own settings sit alongside and are ignored
    CELERY_BROKER_URL="memory://",  # this program runs its task eagerly
    CELERY_REDLOCK_SERVERS=os.environ.get("REDLOCK_SERVERS", "redis://127.0.0.1:6379/0").split(","),
    CELERY_REDLOCK_TTL=60.0,
    CELERY_REDLOCK_ON_DUPLICATE="skip",
    CELERY_REDLOCK_KEY_PREFIX="proj:lock:",
    CELERY_REDLOCK_BEAT_TTL=30.0,
)

# -- proj/celery.py -------------------------------------------------------------
app = Celery("proj")
# In Django: app.config_from_object("django.conf:settings", namespace="CELERY")
app.config_from_object(settings, namespace="CELERY")


# -- proj/feeds/tasks.py ----------------------------------------------------------
@app.task(base=RedlockTask, bind=True, name="proj.refresh_feed")
def refresh_feed(self: RedlockTask, feed_id: int) -> str:
    key = self.redlock_key_for((feed_id,))
    mine = self.redlock_info((feed_id,)).holder == self.request.id
    return f"refresh_feed({feed_id}) ran holding its lock {key} -> {mine}"


@app.task(base=RedlockTask, name="proj.nightly_export", redlock_ttl=600.0, redlock_key="")
def nightly_export() -> None: ...


def main() -> None:
    print(f"app.conf.get('redlock_servers') -> {app.conf.get('redlock_servers')}")
    print(f"app.conf.get('redlock_ttl') -> {app.conf.get('redlock_ttl')}")
    print(f"app.conf.get('redlock_beat_ttl') -> {app.conf.get('redlock_beat_ttl')}")

    feed = refresh_feed.redlock_settings  # what the task resolved: attribute, setting, default
    print(
        f"refresh_feed's settings: ttl {feed.ttl}, on_duplicate {feed.on_duplicate!r}, "
        f"key_prefix {feed.key_prefix!r}, servers {len(feed.servers)}"
    )
    export = nightly_export.redlock_settings
    print(f"nightly_export's settings: ttl {export.ttl} (its own attribute wins)")

    # The lock really uses those servers: run the task eagerly (it locks as on a worker).
    print(refresh_feed.apply(args=(3,)).get())

    # A typo in a CELERY_REDLOCK_* name is refused when a worker starts.
    typo = types.SimpleNamespace(CELERY_REDLOCK_TTL_SECONDS=60)
    bad = Celery("typo")
    bad.config_from_object(typo, namespace="CELERY")
    try:
        validate_app(bad)  # what the worker runs at start-up
    except RedlockConfigError as exc:
        reason = str(exc).split(" (")[0]  # the message goes on to list every setting
        print(f"a worker with CELERY_REDLOCK_TTL_SECONDS refuses to start: {reason}")


if __name__ == "__main__":
    main()
