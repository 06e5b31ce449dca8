"""``celery -A proj redlock ...``: see and clear locks.

Installed as a ``celery.commands`` entry point, so it is a celery
subcommand wherever celery_redlock is installed::

    celery -A proj redlock status            # each node: version, role, settings
    celery -A proj redlock list              # every lock under redlock_key_prefix
    celery -A proj redlock release KEY --force
    celery -A proj redlock clear --prefix redlock:myapp. --force

Every command takes ``--json`` for scripts. Exit codes: 0 done, 1 nothing
matched, 2 bad usage or too few nodes reachable.

A node that fails (unreachable, timed out, or answering an error such as
NOPERM or READONLY) is reported once with its error and skipped for the rest
of the command; in ``--json`` output it is among ``unreachable`` and its error
is in ``errors``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
import redis

from ._nodes import Node, _scrub
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
#: keys a dry run of ``clear`` names before it only counts the rest
SHOWN_KEYS = 50
#: the columns of ``status``'s table
_STATUS_COLUMNS = (
    "node", "reachable", "version", "role", "rtt_ms",
    "maxmemory_policy", "appendonly", "appendfsync",
)  # fmt: skip
_TASK_KEY = re.compile(r"^(?P<task>.+):(?P<digest>[0-9a-f]{64})$")
#: the task column of the beat leader lock
_BEAT = "(beat leader)"


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
        return _BEAT
    match = _TASK_KEY.match(rest)
    return match["task"] if match else None


_T = TypeVar("_T")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_scrub(str(exc))}"


class _Admin:
    """One administrative client per node for a whole command, opened on first use
    and closed at the end; a node that fails once (unreachable, timed out, or an
    error such as NOPERM or READONLY) is skipped after, its error kept to report."""

    def __init__(self, manager: Redlock) -> None:
        self.nodes: tuple[Node, ...] = manager.nodes
        self.quorum = manager.quorum
        self.errors: dict[str, BaseException] = {}
        self._clients: dict[str, redis.Redis] = {}

    def on(self, node: Node, action: Callable[[redis.Redis], _T]) -> _T | None:
        """``action(client)`` on ``node``; None when the node failed, now or before."""
        if node.name in self.errors:
            return None
        client = self._clients.get(node.name)
        if client is None:
            client = self._clients[node.name] = node.client(ADMIN_TIMEOUT)
        try:
            return action(client)
        except Exception as exc:  # kept, with its reason, and the node skipped after
            self.errors[node.name] = exc
            return None

    @property
    def down(self) -> list[str]:
        """The nodes that failed, in the configured order."""
        return [node.name for node in self.nodes if node.name in self.errors]

    def too_few(self) -> bool:
        return len(self.nodes) - len(self.errors) < self.quorum

    def report(self) -> dict[str, Any]:
        """The failed nodes for ``--json``: ``unreachable`` (names) and ``errors``."""
        return {
            "unreachable": self.down,
            "errors": {name: _reason(self.errors[name]) for name in self.down},
        }

    def warn(self, then: str) -> None:
        """One warning per failed node, with its error, then ``then``."""
        for name in self.down:
            exc = self.errors[name]
            unreachable = isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))
            if unreachable and not isinstance(exc, redis.AuthenticationError):
                what = "is unreachable"
            else:
                what = "failed"
            click.echo(f"warning: {name} {what} ({_reason(exc)}); {then}", err=True)

    def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            _close(client)


def _close(client: redis.Redis) -> None:
    """Close ``client`` and its connections (close() leaves a pool it was given open)."""
    try:
        client.close()
    finally:
        client.connection_pool.disconnect()


#: Deletes KEYS[1] only when it is a string (what a lock is), then wakes its waiters
#: (ARGV[1] the channel, ARGV[2] the message); 1 when deleted. The announcement is
#: pcall'd: an ACL denying the channel does not undo or hide the delete.
_DELETE_LOCK = (
    "if redis.call('type', KEYS[1]).ok ~= 'string' then return 0 end "
    "redis.call('del', KEYS[1]) "
    "redis.pcall('publish', ARGV[1], ARGV[2]) "
    "return 1"
)


def _delete(admin: _Admin, key: bytes) -> int:
    """Delete the lock ``key`` on every node that has not failed, whoever holds it;
    how many had it. Waiters for the lock are woken as by a release.

    A lock is a string; a list, hash or set of that name (a Celery queue on the
    broker's Redis) is not one, and is left alone.
    """
    count = 0
    for node in admin.nodes:
        deleted = admin.on(node, lambda c: c.eval(_DELETE_LOCK, 1, key, channel(key), key))
        if deleted:
            count += 1
    return count


def _scan(admin: _Admin, prefix: str, strings: bool = False) -> dict[str, bytes]:
    """Keys under ``prefix`` on any node that answers (SCAN, never KEYS), by their
    text: their bytes. ``strings``: only string keys (locks; TYPE, batched)."""
    keys: dict[str, bytes] = {}
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"

    def scan(client: redis.Redis) -> None:
        found: list[bytes] = []
        for raw in client.scan_iter(match=pattern, count=1000):
            raw = raw if isinstance(raw, bytes) else str(raw).encode()
            if not raw.endswith(FENCE_SUFFIX.encode()):
                found.append(raw)
        if strings:
            kept: list[bytes] = []
            for start in range(0, len(found), 1000):
                batch = found[start : start + 1000]
                pipe = client.pipeline(transaction=False)
                for raw in batch:
                    pipe.type(raw)
                kept.extend(raw for raw, kind in zip(batch, pipe.execute()) if kind == b"string")
            found = kept
        for raw in found:
            keys[raw.decode("utf-8", "replace")] = raw

    for node in admin.nodes:
        admin.on(node, scan)
    return dict(sorted(keys.items()))


def _locks(manager: Redlock, keys: Sequence[str], prefix: str) -> list[dict[str, Any]]:
    """One row per key that holds a lock token (a string value) on some node.

    ``prefix`` is the configured ``redlock_key_prefix``: a task's name is what
    follows it in a task lock key (``{prefix}{task}:{64 hex}``, or
    ``{prefix}{task}`` for ``redlock_key=""``). A holder is shown as a task id
    when its token is a run's (``"<task id>|<12 hex digits>"``) or the key is a
    task's, whatever the key looks like under the prefix.
    """
    rows = []
    for key in keys:
        info = manager.inspect(key)
        tokens = {tok for _, tok, _ in info.per_node if tok is not None}
        if not tokens:
            continue  # expired since the scan
        task = _task_of(key, prefix)
        token = info.holder
        if token is None and len(tokens) == 1:
            token = next(iter(tokens))  # held on fewer than a quorum: still one holder
        if token is None:
            shown = f"({len(tokens)} tokens)"
        elif token.startswith(HANDOVER_PREFIX):
            shown = "(handed over by a beat that stopped)"
        else:
            shown = token
            task_id = task_id_of(token)
            run = task_id != token  # a run's token: its task id and a run mark
            if key.startswith(prefix) and task != _BEAT and (run or task is not None):
                shown = task_id or token
                if task is None:  # redlock_key="": the key is the prefix and the task name
                    task = key[len(prefix) :]
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
                _close(client)
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
    admin = _Admin(manager)
    try:
        keys = list(_scan(admin, prefix))
        if admin.too_few():
            _fail(
                out,
                f"too few nodes reachable to list locks ({len(manager.nodes) - len(admin.down)} "
                f"of {len(manager.nodes)}, quorum {manager.quorum}); {_failures(admin)}; "
                "see `celery redlock status`",
                **admin.report(),
            )
        rows = _locks(manager, keys, settings.key_prefix)
    finally:
        admin.close()
        manager.close()
    if as_json:
        click.echo(json.dumps({"ok": True, "prefix": prefix, "locks": rows, **admin.report()}))
    else:
        if rows:
            out.table(rows, ["key", "holder", "task", "ttl", "nodes", "quorum"])
        else:
            click.echo(f"no locks under {prefix!r}")
        admin.warn("its keys are not shown")
    ctx.exit(EXIT_OK if rows else EXIT_NO_MATCH)


def _failures(admin: _Admin) -> str:
    """The failed nodes and their errors, for an error message."""
    return "failed: " + "; ".join(f"{name} ({_reason(admin.errors[name])})" for name in admin.down)


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
    admin = _Admin(manager)
    try:
        count = _delete(admin, key.encode())
    finally:
        admin.close()
        manager.close()
    if admin.too_few():
        _fail(
            out,
            f"{key!r} deleted on {count} node(s), but {len(admin.down)} of "
            f"{len(manager.nodes)} failed ({_failures(admin)}): it may still be held there "
            "until its TTL runs out; run it again when they are back (`celery redlock status`)",
            key=key,
            nodes=count,
            **admin.report(),
        )
    if as_json:
        click.echo(json.dumps({"ok": count > 0, "key": key, "nodes": count, **admin.report()}))
    else:
        click.echo(f"released {key} on {count} node(s)" if count else f"no lock {key!r}")
        admin.warn("the key may remain there")
    ctx.exit(EXIT_OK if count else EXIT_NO_MATCH)


@redlock.command()
@click.option("--prefix", default=None, help="Key prefix (default: redlock_key_prefix).")
@click.option("--force", is_flag=True, help="Really delete them (required).")
@click.option(
    "--any-prefix",
    is_flag=True,
    help="Allow a --prefix outside redlock_key_prefix (it may match other data).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def clear(
    ctx: click.Context, prefix: str | None, force: bool, any_prefix: bool, as_json: bool
) -> None:
    """Delete every lock under the prefix on every node (needs --force).

    Without --force, names the locks it would delete. A --prefix that does not
    start with redlock_key_prefix needs --any-prefix: under it, any string key
    (a Celery result, another app's data) counts as a lock.
    """
    out = _Out(as_json)
    manager, settings = _manager(ctx, out)
    prefix = settings.key_prefix if prefix is None else prefix
    if not prefix:
        manager.close()
        _fail(out, "refusing to clear with an empty prefix; name the prefix of your locks")
    if not prefix.startswith(settings.key_prefix) and not any_prefix:
        manager.close()
        _fail(
            out,
            f"refusing to clear under {prefix!r}: it does not start with the lock key prefix "
            f"{settings.key_prefix!r} (redlock_key_prefix), so it may match other data "
            "(Celery results, another app's keys); to clear it all the same, pass "
            "--any-prefix (without --force first, to see the keys)",
        )
    admin = _Admin(manager)
    try:
        # Only lock keys (a string token): other data under the prefix is left alone.
        locks = _scan(admin, prefix, strings=True)
        if not force:
            _dry_run(out, admin, prefix, list(locks))
        cleared = [key for key, raw in locks.items() if _delete(admin, raw)]
    finally:
        admin.close()
        manager.close()
    if as_json:
        click.echo(
            json.dumps(
                {"ok": bool(cleared), "prefix": prefix, "cleared": cleared, **admin.report()}
            )
        )
    else:
        click.echo(f"cleared {len(cleared)} lock(s) under {prefix!r}")
        admin.warn("its keys remain")
    if admin.too_few():
        ctx.exit(EXIT_USAGE)
    ctx.exit(EXIT_OK if cleared else EXIT_NO_MATCH)


def _dry_run(out: _Out, admin: _Admin, prefix: str, locks: list[str]) -> NoReturn:
    """Name the locks ``clear`` would delete (the first :data:`SHOWN_KEYS`), then exit 2."""
    shown = locks[:SHOWN_KEYS]
    more = len(locks) - len(shown)
    if not out.as_json:
        if locks:
            click.echo(f"would clear {len(locks)} lock(s) under {prefix!r}:")
        for key in shown:
            click.echo(f"  {key}")
        if more:
            click.echo(f"  ... and {more} more")
        admin.warn("its keys are not counted")
    _fail(
        out,
        f"not cleared: {len(locks)} lock(s) under {prefix!r}. {_FORCE_HELP}",
        prefix=prefix,
        count=len(locks),
        locks=shown,
        **admin.report(),
    )
