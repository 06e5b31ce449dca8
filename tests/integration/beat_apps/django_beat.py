"""Two django-celery-beat ``DatabaseScheduler`` beats with the mixin, one database.

Run by test_beat.py in a subprocess of its own (Django is set up once per
process)::

    python -m tests.integration.beat_apps.django_beat SERVERS DB MODE

``SERVERS``: the lock nodes, comma-separated; ``DB``: the SQLite file to
create; ``MODE``: ``handover`` (the mixin as shipped), ``record-only`` (the
new leader goes on from the record of sends beside the lock alone, as after
a leader that died without a hand-over) or ``no-handover`` (it goes on from
neither: what a scheduler caching its entries does without them).

The README's class, ``HADatabaseScheduler(RedlockSchedulerMixin,
DatabaseScheduler)`` with ``redlock_standby_ticks = False``, for an
every-second ``PeriodicTask``. Beat ``a`` leads and sends; ``b`` starts at
the same moment and stands by (its entries as it read them; DatabaseScheduler
re-reads them only every 5 minutes or on a change). Just after one of ``a``'s sends, ``a`` closes,
and ``b`` leads. Prints one JSON object: the sends of each (seconds from the
start, on the monotonic clock), when ``a`` closed, and the gap between
``a``'s last send and ``b``'s first.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import django
from django.conf import settings

#: The periodic task's name.
TASK = "beat_django.tick"


def _setup(db: str) -> None:
    settings.configure(
        INSTALLED_APPS=["django_celery_beat"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db}},
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _beats(servers: list[str], db: str, name: str, ttl: float) -> tuple[Any, Any]:
    """Set Django up on ``db``; the README's HADatabaseScheduler class, and an app
    (the current one: ModelEntry reads current_app) whose leader lock has ``ttl``."""
    _setup(db)
    from celery import Celery
    from django_celery_beat.schedulers import DatabaseScheduler

    from celery_redlock.beat import RedlockSchedulerMixin

    class HADatabaseScheduler(RedlockSchedulerMixin, DatabaseScheduler):  # type: ignore[misc]
        redlock_standby_ticks = False  # the schedule lives in the shared database

    app = Celery(f"beat_django_{name}", broker="memory://")
    app.conf.update(
        redlock_servers=servers,
        redlock_beat_ttl=ttl,
        redlock_beat_poll=0.1,
        redlock_beat_lock_key=f"redlock:beat:django-{name}",
        timezone="UTC",
        beat_schedule={},
    )
    return HADatabaseScheduler, app


def main(servers: list[str], db: str, mode: str) -> dict[str, Any]:
    # (30 s: only a hand-over, or going on from the noted sends, can be quick)
    HADatabaseScheduler, app = _beats(servers, db, mode, 30.0)
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    if mode in ("no-handover", "record-only"):
        HADatabaseScheduler._go_on_from = lambda self, token: None
    if mode == "no-handover":
        HADatabaseScheduler._catch_up = lambda self: None
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="tick", task=TASK, interval=every)

    start = time.monotonic()
    sends: dict[str, list[float]] = {"a": [], "b": []}

    def spy(name: str, scheduler: Any) -> Any:
        real = scheduler.apply_async

        def apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
            if entry.name == "tick":
                sends[name].append(time.monotonic() - start)
            return real(entry, *args, **kwargs)

        scheduler.apply_async = apply_async
        return scheduler

    a = spy("a", HADatabaseScheduler(app=app, lazy=False))
    b = spy("b", HADatabaseScheduler(app=app, lazy=False))

    def drive(beats: list[Any], until: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            for beat in beats:
                beat.tick()
            time.sleep(0.01)

    drive([a, b], lambda: len(sends["a"]) >= 3, 10.0)
    leader_before = (a.is_leader, b.is_leader)
    sent_by_b_before = len(sends["b"])
    a.close()  # just after a send
    closed = time.monotonic() - start
    drive([b], lambda: bool(sends["b"]), 10.0)
    drive([b], lambda: False, 1.2)
    b.close()
    return {
        "leaders_before": leader_before,
        "b_sent_while_a_led": sent_by_b_before,
        "a": sends["a"],
        "b": sends["b"],
        "closed": closed,
        "gap": sends["b"][0] - sends["a"][-1] if sends["b"] and sends["a"] else None,
    }


def killed(servers: list[str], db: str) -> dict[str, Any]:
    """Beat ``a`` sends an hourly task (last run two hours ago in the database) and
    dies before writing that to the database (no close, no sync); ``b`` takes over
    when the lock runs out, then re-reads its entries from the database (as
    DatabaseScheduler does every 5 minutes, and on any change). Prints the sends
    of the hourly task by each."""
    HADatabaseScheduler, app = _beats(servers, db, "killed", 2.0)
    import datetime

    from django.utils import timezone
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    hourly = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.HOURS)
    PeriodicTask.objects.create(
        name="hourly", task=TASK, interval=hourly,
        last_run_at=timezone.now() - datetime.timedelta(hours=2),
    )  # fmt: skip
    sends: dict[str, int] = {"a": 0, "b": 0}

    def spy(name: str, scheduler: Any) -> Any:
        real = scheduler.apply_async

        def apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
            if entry.name == "hourly":
                sends[name] += 1
            return real(entry, *args, **kwargs)

        scheduler.apply_async = apply_async
        return scheduler

    a = spy("a", HADatabaseScheduler(app=app, lazy=False))
    b = spy("b", HADatabaseScheduler(app=app, lazy=False))
    a._last_sync = time.monotonic()  # a's next write to the database is minutes away
    deadline = time.monotonic() + 10
    while not sends["a"] and time.monotonic() < deadline:
        a.tick()
        b.tick()
        time.sleep(0.01)
    a._watch.cancel()  # a dies: no renewal, no close, no sync
    deadline = time.monotonic() + 10
    while not b.is_leader and time.monotonic() < deadline:
        b.tick()
        time.sleep(0.02)
    led = b.is_leader
    b._last_full_sync = datetime.datetime.now() - datetime.timedelta(seconds=400)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # b re-reads the database at its next tick
        b.tick()
        time.sleep(0.02)
    b.close()
    return {"a": sends["a"], "b": sends["b"], "b_led": led}


def refused(servers: list[str], db: str) -> dict[str, Any]:
    """One beat leads; a minutely task (last run 59.4 s ago in the database) comes
    due just after the leader lock's validity has run out: the send is refused and
    the beat steps down, then leads again at its next poll. Prints when it sent
    the task (seconds from the start), when it stepped down, and when it was seen
    leading again."""
    HADatabaseScheduler, app = _beats(servers, db, "refused", 5.0)
    import datetime

    from django.utils import timezone
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    minutely = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.MINUTES)
    start = time.monotonic()
    PeriodicTask.objects.create(
        name="minutely", task=TASK, interval=minutely,
        last_run_at=timezone.now() - datetime.timedelta(seconds=59.4),
    )  # fmt: skip
    sends: list[float] = []
    a = HADatabaseScheduler(app=app, lazy=False)
    real = a.apply_async

    def apply_async(entry: Any, *args: Any, **kwargs: Any) -> Any:
        if entry.name == "minutely":
            sends.append(time.monotonic() - start)
        return real(entry, *args, **kwargs)

    a.apply_async = apply_async
    while not a.is_leader and time.monotonic() - start < 5:
        a.tick()
        time.sleep(0.01)
    a._watch.cancel()
    a._leader.expires_at = time.monotonic()  # its validity has run out
    stepped_down = led_again = None
    while time.monotonic() - start < 2.0:
        a.tick()
        if stepped_down is None and a._leader is None:
            stepped_down = time.monotonic() - start
        elif stepped_down is not None and led_again is None and a.is_leader:
            led_again = time.monotonic() - start  # (after the tick that led and sent)
        time.sleep(0.01)
    a.close()
    return {"sends": sends, "stepped_down": stepped_down, "led_again": led_again}


if __name__ == "__main__":
    servers_arg, db_arg, mode_arg = sys.argv[1:4]
    if mode_arg == "killed":
        print(json.dumps(killed(servers_arg.split(","), db_arg)))
    elif mode_arg == "refused":
        print(json.dumps(refused(servers_arg.split(","), db_arg)))
    else:
        print(json.dumps(main(servers_arg.split(","), db_arg, mode_arg)))
