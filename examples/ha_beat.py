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
at its next poll, as the leader hands its lock over on the way out (with
its last sends, which the new leader goes on from). Without
``beat_scheduler`` in the config, pass ``-S celery_redlock.beat:RedlockScheduler``.

With django-celery-beat, use ``HADatabaseScheduler`` below instead::

    celery -A ha_beat beat -S ha_beat:HADatabaseScheduler

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
    # An interval schedule: at a clean hand-over the new leader may send it a little
    # early (each beat counts intervals from its own start). For "at most once per
    # period" use a crontab schedule, or a RedlockTask with redlock_hold.
    beat_schedule={
        "report-every-10-s": {"task": "ha_beat.report", "schedule": 10.0},
    },
)


@app.task(name="ha_beat.report")
def report() -> str:
    return "report written"


# django-celery-beat's DatabaseScheduler (schedules kept in the Django database)
# with leader election: the mixin goes first in the bases. Defined only in a
# Django project with django-celery-beat installed, so this module runs anywhere.
try:
    from django.conf import settings as django_settings

    if not django_settings.configured:  # its models cannot load outside a project
        raise ImportError("no Django project here (DJANGO_SETTINGS_MODULE is not set)")
    from django_celery_beat.schedulers import DatabaseScheduler
except ImportError:  # no Django project, or django-celery-beat is not installed
    HADatabaseScheduler = None
else:

    class HADatabaseScheduler(RedlockSchedulerMixin, DatabaseScheduler):  # type: ignore[no-redef,misc]
        """django-celery-beat's DatabaseScheduler; only the leader sends.

        The schedule's state lives in the database all beats share, so a
        standby must not tick it (it would advance entries the leader sends).
        """

        redlock_standby_ticks = False


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
