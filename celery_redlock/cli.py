"""``celery -A proj redlock ...``: see and clear locks.

Installed as a ``celery.commands`` entry point, so it is a celery
subcommand wherever celery_redlock is installed::

    celery -A proj redlock status            # each node: version, role, settings
    celery -A proj redlock list              # every lock under redlock_key_prefix
    celery -A proj redlock release KEY --force
    celery -A proj redlock clear --prefix redlock:myapp. --force

Every command takes ``--json`` for scripts. Exit codes: 0 done, 1 nothing
matched, 2 bad usage or too few nodes reachable.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import click
import redis

from ._wakeup import channel
from .beat import HANDOVER_PREFIX
from .config import resolve_settings
from .exceptions import RedlockError
from .keys import task_id_of
from .redlock import FENCE_SUFFIX, Redlock

__all__ = ["redlock"]

EXIT_OK, EXIT_NO_MATCH, EXIT_USAGE = 0, 1, 2
#: seconds the command waits for one node
ADMIN_TIMEOUT = 2.0
#: the columns of ``status``'s table
_STATUS_COLUMNS = (
    "node", "reachable", "version", "role", "rtt_ms",
    "maxmemory_policy", "appendonly", "appendfsync",
)  # fmt: skip
_TASK_KEY = re.compile(r"^(?P<task>.+):(?P<digest>[0-9a-f]{64})$")


class _Out:
    """Writes either an aligned table for a person or JSON for a script."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
        if not rows:
            return
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
        for row in cells:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _fail(out: _Out, message: str, code: int = EXIT_USAGE, **extra: Any) -> NoReturn:
    if out.as_json:
        click.echo(json.dumps({"ok": False, "error": message, **extra}))
    else:
        click.echo(f"error: {message}", err=True)
    click.get_current_context().exit(code)
    raise AssertionError("unreachable")  # pragma: no cover - Context.exit raises


def _manager(ctx: click.Context, out: _Out) -> tuple[Redlock, Any]:
    app = ctx.obj.app
    try:
        settings = resolve_settings(app)
        manager = Redlock(
            list(settings.servers),
            version_check=False,
            node_timeout=max(settings.node_timeout, ADMIN_TIMEOUT),
            logger=None,
        )
    except RedlockError as exc:
        message = str(exc)
        if ctx.find_root().params.get("app") is None:
            message += "; no app was given: run it as celery -A proj redlock ..."
        _fail(out, message)
    return manager, settings


def _task_of(key: str, prefix: str) -> str | None:
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest.startswith("beat:"):
        return "(beat leader)"
    match = _TASK_KEY.match(rest)
    return match["task"] if match else None


#: Deletes KEYS[1] only when it is a string (what a lock is); 1 when deleted.
_DELETE_STRING = (
    "if redis.call('type', KEYS[1]).ok == 'string' then "
    "return redis.call('del', KEYS[1]) end return 0"
)


def _delete(manager: Redlock, key: str) -> tuple[int, list[str]]:
    """Delete ``key`` on every node whoever holds it: how many had it, and the unreachable nodes.

    Waiters for the lock are woken as by a release.
    """
    count = 0
    down: list[str] = []
    for node in manager.nodes:
        client = node.client(ADMIN_TIMEOUT)
        try:
            # A lock is a string; a list, hash or set of that name (a Celery queue on
            # the broker's Redis) is not one, and is left alone.
            if client.eval(_DELETE_STRING, 1, key):
                count += 1
                with contextlib.suppress(redis.ResponseError):  # an ACL denying the channel
                    client.publish(channel(key.encode()), key)
        except Exception:
            down.append(node.name)
        finally:
            client.close()
    return count, down


def _too_few(manager: Redlock, down: Sequence[str]) -> bool:
    return len(manager.nodes) - len(down) < manager.quorum


def _scan(manager: Redlock, prefix: str) -> tuple[list[str], list[str]]:
    """Keys under ``prefix`` on any node (SCAN, never KEYS), and the unreachable nodes."""
    keys: set[str] = set()
    down: list[str] = []
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    for node in manager.nodes:
        client = node.client(ADMIN_TIMEOUT)
        try:
            for raw in client.scan_iter(match=pattern, count=1000):
                key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                if not key.endswith(FENCE_SUFFIX):
                    keys.add(key)
        except Exception:
            down.append(node.name)
        finally:
            client.close()
    return sorted(keys), down


def _locks(manager: Redlock, keys: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    """One row per key that holds a lock token (a string value) on some node.

    ``prefix`` is the configured ``redlock_key_prefix``: a task's name is what
    follows it in a task lock key (``{prefix}{task}:{64 hex}``).
    """
    rows = []
    for key in keys:
        info = manager.inspect(key)
        tokens = {tok for _, tok, _ in info.per_node if tok is not None}
        if not tokens:
            continue  # expired since the scan
        task = _task_of(key, prefix)
        shown = info.holder
        if shown is None:
            shown = next(iter(tokens)) if len(tokens) == 1 else f"({len(tokens)} tokens)"
        elif shown.startswith(HANDOVER_PREFIX):
            shown = "(handed over by a beat that stopped)"
        elif task is not None:
            shown = task_id_of(shown)  # a running task's token is its id and a run mark
        rows.append(
            {
                "key": key,
                "holder": shown,
                "task": task,
                "ttl": info.ttl_left,
                "nodes": f"{info.nodes_holding}/{len(manager.nodes)}",
                "quorum": info.holder is not None,
            }
        )
    return rows


@click.group(name="redlock")
@click.pass_context
def redlock(ctx: click.Context) -> None:
    """See and clear celery_redlock locks on the lock nodes."""
    if ctx.obj is None or not hasattr(ctx.obj, "app"):
        raise click.UsageError("run it as a celery subcommand: celery -A proj redlock ...")


@redlock.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Each node: reachable, version, role, round trip, persistence; and the quorum."""
    out = _Out(as_json)
    manager, _ = _manager(ctx, out)
    facts = manager.server_facts(ADMIN_TIMEOUT)
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for node, fact in zip(manager.nodes, facts):
        rtt = None
        if fact["reachable"] == "yes":
            client = node.client(ADMIN_TIMEOUT)
            try:
                client.ping()  # connects (and authenticates): not part of the round trip
                start = time.perf_counter()
                client.ping()
                rtt = round((time.perf_counter() - start) * 1000, 2)
            except Exception:
                rtt = None
            finally:
                client.close()
        row = {
            "node": node.name,
            "reachable": fact["reachable"] == "yes",
            "version": fact.get("redis_version"),
            "role": fact.get("role"),
            "rtt_ms": rtt,
            "maxmemory_policy": fact.get("maxmemory-policy") or None,
            "appendonly": fact.get("appendonly") or None,
            "appendfsync": fact.get("appendfsync") or None,
            "error": fact.get("error"),
        }
        rows.append(row)
        if not row["reachable"]:
            warnings.append(f"{node.name} is unreachable: {fact.get('error')}")
            continue
        if row["role"] not in (None, "master"):
            warnings.append(f"{node.name} is a {row['role']}: use independent masters")
        if row["maxmemory_policy"] not in (None, "noeviction"):
            warnings.append(
                f"{node.name} has maxmemory-policy {row['maxmemory_policy']}: lock keys can "
                "be evicted; use noeviction"
            )
        if row["appendonly"] == "no":
            warnings.append(
                f"{node.name} has appendonly no: a restart loses every lock on it; use "
                "appendonly yes with appendfsync always, or keep a crashed node down longer "
                "than the longest TTL"
            )
        elif row["appendfsync"] not in (None, "always"):
            warnings.append(
                f"{node.name} has appendfsync {row['appendfsync']}: after a crash it may lose "
                "locks; use appendfsync always, or keep a crashed node down longer than the "
                "longest TTL"
            )
    reachable = sum(1 for r in rows if r["reachable"])
    n = len(rows)
    if n < 3 or n % 2 == 0:
        warnings.append(f"{n} node(s): an odd count of 3 or more (3 or 5) is usual")
    ok = reachable >= manager.quorum
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": ok,
                    "nodes": rows,
                    "quorum": manager.quorum,
                    "reachable": reachable,
                    "warnings": warnings,
                }
            )
        )
    else:
        _Out(False).table(
            rows,
            _STATUS_COLUMNS,
        )
        click.echo(
            f"\nquorum: {manager.quorum} of {n}; reachable: {reachable} "
            f"({'ok' if ok else 'NOT ENOUGH: locks cannot be taken'})"
        )
        for warning in warnings:
            click.echo(f"warning: {warning}")
    manager.close()
    ctx.exit(EXIT_OK if ok else EXIT_USAGE)


@redlock.command(name="list")
@click.option("--prefix", default=None, help="Key prefix (default: redlock_key_prefix).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def list_(ctx: click.Context, prefix: str | None, as_json: bool) -> None:
    """Every lock under the prefix: holder (task id), task, TTL left, nodes holding it."""
    out = _Out(as_json)
    manager, settings = _manager(ctx, out)
    prefix = settings.key_prefix if prefix is None else prefix
    keys, down = _scan(manager, prefix)
    if _too_few(manager, down):
        manager.close()
        _fail(
            out,
            f"too few nodes reachable to list locks ({len(manager.nodes) - len(down)} of "
            f"{len(manager.nodes)}, quorum {manager.quorum}); unreachable: {', '.join(down)}; "
            "see `celery redlock status`",
            unreachable=down,
        )
    rows = _locks(manager, keys, settings.key_prefix)
    manager.close()
    if as_json:
        click.echo(json.dumps({"ok": True, "prefix": prefix, "locks": rows, "unreachable": down}))
    elif rows:
        out.table(rows, ["key", "holder", "task", "ttl", "nodes", "quorum"])
    else:
        click.echo(f"no locks under {prefix!r}")
    for name in down if not as_json else ():
        click.echo(f"warning: {name} is unreachable; its keys are not shown", err=True)
    ctx.exit(EXIT_OK if rows else EXIT_NO_MATCH)


_FORCE_HELP = (
    "Deleting a lock frees it whoever holds it: a task still running under it goes on "
    "unlocked, and another run may start beside it. Check with `celery redlock list`, "
    "then pass --force."
)


@redlock.command()
@click.argument("key")
@click.option("--force", is_flag=True, help="Really delete it (required).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def release(ctx: click.Context, key: str, force: bool, as_json: bool) -> None:
    """Delete the lock KEY on every node, whoever holds it (needs --force).

    Only a string key (a lock) is deleted: a list, hash or set of that name is not
    a lock and is left alone.
    """
    out = _Out(as_json)
    if not force:
        _fail(out, f"not released: {key!r}. {_FORCE_HELP}")
    manager, _ = _manager(ctx, out)
    try:
        count, down = _delete(manager, key)
    finally:
        manager.close()
    if _too_few(manager, down):
        _fail(
            out,
            f"{key!r} deleted on {count} node(s), but {len(down)} of {len(manager.nodes)} "
            f"are unreachable ({', '.join(down)}): it may still be held there until its TTL "
            "runs out; run it again when they are back (`celery redlock status`)",
            key=key,
            nodes=count,
            unreachable=down,
        )
    if as_json:
        click.echo(json.dumps({"ok": count > 0, "key": key, "nodes": count, "unreachable": down}))
    else:
        click.echo(f"released {key} on {count} node(s)" if count else f"no lock {key!r}")
        for name in down:
            click.echo(f"warning: {name} is unreachable; the key may remain there", err=True)
    ctx.exit(EXIT_OK if count else EXIT_NO_MATCH)


@redlock.command()
@click.option("--prefix", default=None, help="Key prefix (default: redlock_key_prefix).")
@click.option("--force", is_flag=True, help="Really delete them (required).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def clear(ctx: click.Context, prefix: str | None, force: bool, as_json: bool) -> None:
    """Delete every lock under the prefix on every node (needs --force)."""
    out = _Out(as_json)
    manager, settings = _manager(ctx, out)
    prefix = settings.key_prefix if prefix is None else prefix
    if not prefix:
        manager.close()
        _fail(out, "refusing to clear with an empty prefix; name the prefix of your locks")
    keys, down = _scan(manager, prefix)
    # Only lock keys (a string token): other data under the prefix is left alone.
    locks = [row["key"] for row in _locks(manager, keys, settings.key_prefix)]
    if not force:
        manager.close()
        _fail(out, f"not cleared: {len(locks)} lock(s) under {prefix!r}. {_FORCE_HELP}")
    cleared = []
    for key in locks:
        count, gone = _delete(manager, key)
        down.extend(name for name in gone if name not in down)
        if count:
            cleared.append(key)
    manager.close()
    if as_json:
        click.echo(
            json.dumps(
                {"ok": bool(cleared), "prefix": prefix, "cleared": cleared, "unreachable": down}
            )
        )
    else:
        click.echo(f"cleared {len(cleared)} lock(s) under {prefix!r}")
        for name in down:
            click.echo(f"warning: {name} is unreachable; its keys remain", err=True)
    if _too_few(manager, down):
        ctx.exit(EXIT_USAGE)
    ctx.exit(EXIT_OK if cleared else EXIT_NO_MATCH)
