"""Highly available ``celery beat``: run as many beat instances as you like;
one of them, the leader, holds a Redlock and sends the periodic tasks.

The app below sets ``beat_scheduler`` to the Redlock scheduler, so a plain
``celery beat`` uses it. From the examples folder, on two hosts (or in two
terminals), plus a worker::

    export REDLOCK_SERVERS=redis://r1:6379/0,redis://r2:6379/0,redis://r3:6379/0
    export CELERY_BROKER_URL=redis://broker:6379/0
    celery -A ha_beat beat -s /tmp/beat-a.db     # terminal 1: becomes the leader
    celery -A ha_beat beat -s /tmp/beat-b.db     # terminal 2: waits as a standby
    celery -A ha_beat worker

``report`` is sent every 10 s by the leader only. Kill the leader (even with
SIGKILL) and the standby takes over within ``redlock_beat_ttl`` (plus one
``redlock_beat_poll``); stop it cleanly (Ctrl-C) and the standby takes over
at its next poll, as the leader hands its lock over on the way out. Either
way the new leader goes on from the sends the leader noted beside the lock:
a send already made is not made again, and one that came due while no beat
led is made at once. Without ``beat_scheduler`` in the config, pass
``-S celery_redlock.beat:RedlockScheduler``.

With django-celery-beat, use ``HADatabaseScheduler`` below instead, in a
Django project (``DJANGO_SETTINGS_MODULE`` set, ``"django_celery_beat"`` in
``INSTALLED_APPS``)::

    celery -A ha_beat beat -S ha_beat:HADatabaseScheduler

The class is built when beat looks it up, after Celery's Django fixup has
run ``django.setup()``: not when the module is imported (Celery imports the
``-A`` module first, before Django is set up).

``python examples/ha_beat.py`` (lock nodes from ``REDLOCK_SERVERS``) builds
two schedulers in one process and shows the election: one leads, the other
waits, and it takes over once the leader closes. It prints, e.g.::

    beat a: leader
    beat b: standby
    leader lock redlock:beat:ha_beat held by beat a -> True
    beat a: closed (handed the leader lock over)
    beat b: leader after 0.9 s
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from celery_redlock.beat import RedlockScheduler, RedlockSchedulerMixin

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")

app = Celery("ha_beat", broker=BROKER)
app.conf.update(
    redlock_servers=os.environ.get("REDLOCK_SERVERS", "redis://127.0.0.1:6379/0").split(","),
    beat_scheduler="celery_redlock.beat:RedlockScheduler",
    redlock_beat_ttl=30.0,  # a dead leader is replaced within this (default 30)
    redlock_beat_poll=1.0,  # a standby tries to lead this often (default 1)
    # redlock_beat_lock_key defaults to "redlock:beat:ha_beat" ({prefix}beat:{app.main})
    # The leader notes each send beside the lock ("redlock:beat:ha_beat:sent"). A new
    # leader goes on from those sends, after a clean hand-over or a dead leader's lock
    # running out: a send made is not made again or early (at a hand-over this interval
    # keeps the old leader's phase), and a due time no beat sent is sent at once. A send
    # whose leader died before noting it (or noted it on too few nodes) may be made
    # again: for "at most once per period", make the task a RedlockTask with
    # redlock_hold (the period, or a little less); a second send inside the hold does
    # not run.
    beat_schedule={
        "report-every-10-s": {"task": "ha_beat.report", "schedule": 10.0},
    },
)


@app.task(name="ha_beat.report")
def report() -> str:
    return "report written"


# django-celery-beat's DatabaseScheduler (schedules kept in the Django database)
# with leader election: the mixin goes first in the bases. Built on first access
# (the module's __getattr__ below), not at import: `celery -A ha_beat beat -S
# ha_beat:HADatabaseScheduler` imports this module before Django is set up (Celery's
# Django fixup runs django.setup() as beat starts, then beat looks -S up), and
# django-celery-beat's models cannot be imported before that. So this module also
# runs anywhere, without Django.


def _database_scheduler() -> type[RedlockSchedulerMixin]:
    """``HADatabaseScheduler``: built once Django is set up; ImportError saying why not."""
    try:
        import django_celery_beat  # noqa: F401  (its package alone touches no settings)
        from django.apps import apps
        from django.conf import settings
    except ImportError as exc:
        raise ImportError(
            f"HADatabaseScheduler needs Django and django-celery-beat ({exc}): "
            "pip install django-celery-beat"
        ) from exc
    if not apps.ready:
        if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
            raise ImportError(
                "HADatabaseScheduler needs a Django project: set DJANGO_SETTINGS_MODULE "
                "before the Celery app is created, so that Celery's Django fixup runs "
                "django.setup() when beat starts"
            )
        raise ImportError(
            "HADatabaseScheduler needs Django set up (django.setup() has not run yet): "
            "`celery beat -S ha_beat:HADatabaseScheduler` looks it up after Celery's Django "
            "fixup has set Django up; elsewhere, call django.setup() before using it"
        )
    if not apps.is_installed("django_celery_beat"):
        raise ImportError(
            "HADatabaseScheduler needs 'django_celery_beat' in the Django project's "
            "INSTALLED_APPS (it keeps the schedule in its models)"
        )
    from django_celery_beat.schedulers import DatabaseScheduler

    class HADatabaseScheduler(RedlockSchedulerMixin, DatabaseScheduler):  # type: ignore[misc]
        """django-celery-beat's DatabaseScheduler; only the leader sends.

        The schedule's state lives in the database all beats share, so a
        standby must not tick it (it would advance entries the leader sends);
        a new leader goes on from the sends noted beside the lock.
        """

        redlock_standby_ticks = False

    HADatabaseScheduler.__qualname__ = "HADatabaseScheduler"  # ha_beat.HADatabaseScheduler
    return HADatabaseScheduler


def __getattr__(name: str) -> Any:
    """``HADatabaseScheduler``, built on first access and kept (see above)."""
    if name == "HADatabaseScheduler":
        cls = globals()[name] = _database_scheduler()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def state(scheduler: RedlockScheduler) -> str:
    return "leader" if scheduler.is_leader else "standby"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        # What `celery beat` does on each host: build the scheduler, then tick it.
        a = RedlockScheduler(app=app, schedule_filename=str(Path(folder, "a.db")))
        b = RedlockScheduler(app=app, schedule_filename=str(Path(folder, "b.db")))
        try:
            a.tick()
            print(f"beat a: {state(a)}")
            b.tick()
            print(f"beat b: {state(b)}")
            key = a.redlock_beat_lock_key
            holder = a.redlock.holder(key)  # the token: host:pid:random
            print(f"leader lock {key} held by beat a -> {holder == a.redlock_beat_token}")
        finally:
            a.close()
        print("beat a: closed (handed the leader lock over)")
        started = time.monotonic()
        try:
            while not b.is_leader and time.monotonic() - started < 10:
                time.sleep(min(b.tick(), 0.1))
            print(f"beat b: {state(b)} after {time.monotonic() - started:.1f} s")
        finally:
            b.close()


if __name__ == "__main__":
    main()
