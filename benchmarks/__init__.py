"""Side-by-side measurements of celery_redlock against raw redis-py and its peers.

Run from the repository root: ``python -m benchmarks`` (``make bench``), or
``python -m benchmarks --quick`` for a 30-second smoke run; ``--help`` lists
the options (``--cycles``, ``--rounds``, ``--json PATH``, ``--markdown PATH``
for the README table, ``--suite NAME`` to run only some suites).

Each suite is a module exposing ``SUITE`` (a :class:`benchmarks.core.Suite`);
the runner starts enough throwaway redis-server nodes for the suites chosen,
runs them in the order below and renders their tables and target checks.
Issue 6, item by item:

1. and 2. ``benchmarks.cycles``: uncontended cycles/s on 1-7 nodes, peers,
   scaling with the node count;
3. ``benchmarks.handoff``: hand-off under contention, 8 waiter processes,
   woken by the release vs polling, against pottery and python-redis-lock;
4. ``benchmarks.celery_tasks``: trivial tasks through a real prefork worker,
   with and without RedlockTask (tasks/s, added latency per task);
5. ``benchmarks.memory``: a long run leaves no keys and holds flat memory.

A new suite is added by writing its module and listing it here.
"""

from __future__ import annotations

#: Suite modules, in run order.
SUITE_MODULES: tuple[str, ...] = (
    "benchmarks.cycles",
    "benchmarks.memory",
    "benchmarks.handoff",
    "benchmarks.celery_tasks",
)
