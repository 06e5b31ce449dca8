"""Lock keys for Celery tasks: task name + bound arguments -> canonical bytes -> key.

A task's key is ``{prefix}{task name}:{sha256 of the canonical arguments}``:

- The call's arguments are bound to the task's signature with the defaults
  applied, so ``f(1)``, ``f(1, False)`` and ``f(account_id=1)`` give one key.
  For a ``bind=True`` task the signature is that of the bound method (no
  ``self``).
- The canonical form is the arguments as kombu's JSON serializer sends them,
  keys sorted: a tuple and a list are the same, so are ``{1: "a"}`` and
  ``{"1": "a"}``, because that is what reaches the worker. A dict with two
  keys JSON writes alike (``{1: "a", "1": "b"}``: the worker would get one
  of them) cannot be encoded. UUID, datetime, date, time, Decimal and bytes
  are encoded as kombu encodes them (and any type registered with
  ``kombu.utils.json.register_type``, or with a ``__json__`` method, whose
  output is canonicalised in turn). So the key computed when the task is
  sent equals the key computed when it runs.
- Values Python compares equal may differ in what the message carries, and
  so in their keys: ``1``, ``1.0`` and ``True``; ``0.0`` and ``-0.0``;
  ``Decimal("1.0")`` and ``Decimal("1")``; one instant as aware datetimes
  with different UTC offsets (and a naive datetime differs from every aware
  one).
- Only a digest goes into the key: no argument value appears in Redis.

``redlock_key`` narrows or replaces the arguments: a sequence of argument
names (only those count), a callable taking the task's arguments and
returning a string (whose digest is used), or ``""`` for the task name alone.
A callable is called as ``spec(*bound.args, **bound.kwargs)``, the arguments
bound to the task's signature with defaults applied: it must take the task's
parameters (checked when the task is registered), and an exception it raises
is a :class:`RedlockConfigError` naming the task.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import os
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Union

from kombu.utils.json import JSONEncoder

from . import _process
from .exceptions import RedlockConfigError

__all__ = [
    "KeySpec",
    "bind_arguments",
    "build_key",
    "canonical",
    "check_key_spec",
    "digest",
    "run_mark",
    "run_token",
    "task_id_of",
]

#: What ``redlock_key`` may be: None (all arguments), names, a callable, or "".
KeySpec = Union[None, str, Sequence[str], Callable[..., str]]  # noqa: UP007


class _KeyEncoder(JSONEncoder):
    """kombu's JSON encoder (UUID, datetime, Decimal, bytes, registered types), its
    output canonicalised like the arguments (a ``__json__`` returning ``{2: .., 10: ..}``
    is keyed as the worker receives it: str keys, sorted as str)."""

    def default(self, o: Any) -> Any:
        return _normalise(super().default(o))  # type: ignore[no-untyped-call]


#: One encoder for every key (``encode`` keeps no state between calls).
_ENCODER = _KeyEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _json_key(key: object) -> str:
    """A dict key as ``json.dumps`` writes it (and as the worker receives it)."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, (int, float)):
        return json.dumps(key)
    raise TypeError(f"a dict key of type {type(key).__name__} ({key!r}) is not JSON-encodable")


def _normalise(value: object) -> object:
    """``value`` shaped as after a JSON round trip: tuples as lists, dict keys as str.

    Raises TypeError when two keys of one dict are written alike (``1`` and
    ``"1"``): the worker would receive only one of them.
    """
    if isinstance(value, dict):
        out: dict[str, object] = {}
        keys: dict[str, object] = {}
        for k, v in value.items():
            name = _json_key(k)
            if name in keys:
                raise TypeError(
                    f"a dict has the keys {keys[name]!r} and {k!r}, which JSON writes alike "
                    f"({json.dumps(name, ensure_ascii=False)}): the worker would receive "
                    "only one of them; give them distinct keys"
                )
            keys[name] = k
            out[name] = _normalise(v)
        return out
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def canonical(value: object) -> bytes:
    """The canonical bytes of ``value``: kombu's JSON, keys sorted, no spaces.

    Raises TypeError when kombu's JSON cannot encode ``value`` (a set, an
    arbitrary object, ...).
    """
    # surrogatepass: a str with a lone surrogate (a file name that is not UTF-8)
    # is sent by kombu (its JSON escapes it) and so must be keyed too.
    return _ENCODER.encode(_normalise(value)).encode("utf-8", "surrogatepass")


def digest(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    target = getattr(func, "__func__", func)  # a bound method: cache by its function
    sig = _SIGNATURES.get((target, hasattr(func, "__self__")))
    if sig is None:
        sig = inspect.signature(func)
        _SIGNATURES[(target, hasattr(func, "__self__"))] = sig
    return sig


def bind_arguments(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    task_name: str,
    defaults: bool = True,
) -> inspect.BoundArguments:
    """Bind ``args``/``kwargs`` to ``func``'s signature, defaults applied (unless
    ``defaults=False``).

    Raises TypeError naming the task when the arguments do not fit.
    """
    try:
        bound = _signature(func).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"task {task_name}: the arguments {tuple(args)!r}, {dict(kwargs)!r} do not match "
            f"its signature {_signature(func)}: {exc}"
        ) from None
    if defaults:
        bound.apply_defaults()
    return bound


def _encode_arguments(
    arguments: Mapping[str, Any], task_name: str, given: Collection[str] | None = None
) -> bytes:
    """The canonical bytes of the arguments; RedlockConfigError naming one that fails.

    ``given``: the names the call passed. A default the call left alone is never
    sent, so it need not be encodable: one that is not (a sentinel object, an
    Enum) stands in the key as a mark naming its parameter.
    """
    try:
        return canonical(dict(arguments))
    except (TypeError, ValueError):
        pass
    fixed = dict(arguments)
    for name, value in arguments.items():  # find the argument to name in the error
        try:
            canonical(value)
        except (TypeError, ValueError) as exc:
            if given is not None and name not in given:
                fixed[name] = {"\x00default": name}
                continue
            raise RedlockConfigError(
                f"task {task_name}: argument {name!r} ({type(value).__name__}) cannot be "
                f"encoded for its lock key ({exc}). The key hashes the arguments as kombu's "
                "JSON sends them (str, numbers, bool, None, lists, dicts, UUID, datetime, "
                "Decimal, bytes). Pass an encodable value, or set redlock_key to the names "
                "of the arguments that identify the work, or to a callable returning a str."
            ) from None
    try:
        return canonical(fixed)
    except (TypeError, ValueError):  # pragma: no cover - each argument alone was encodable
        raise RedlockConfigError(
            f"task {task_name}: its arguments cannot be encoded for its lock key"
        ) from None


_POSITIONAL_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _callable_name(spec: object) -> str:
    name = getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None)
    return str(name) if name else repr(spec)


def _check_callable(spec: Callable[..., Any], func: Callable[..., Any] | None, where: str) -> None:
    """Check that ``spec`` takes the task's arguments as :func:`build_key` passes them:
    ``spec(*bound.args, **bound.kwargs)``, defaults applied. Skipped when either
    signature cannot be read (a builtin)."""
    if func is None:
        return
    try:
        task_sig = _signature(func)
        spec_sig = inspect.signature(spec)
    except (TypeError, ValueError):
        return
    args: list[None] = []
    kwargs: dict[str, None] = {}
    for param in task_sig.parameters.values():
        if param.kind in _POSITIONAL_KINDS:
            args.append(None)  # bound.args holds every one of these, defaults applied
        elif param.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[param.name] = None
    try:
        spec_sig.bind(*args, **kwargs)
    except TypeError as exc:
        names = [p.name for p in task_sig.parameters.values() if p.kind in _POSITIONAL_KINDS]
        if kwargs:
            names += ["*", *kwargs]
        example = f"lambda {', '.join(names)}: ..." if names else "lambda: ..."
        raise RedlockConfigError(
            f"{where} is the callable {_callable_name(spec)}{spec_sig}, which cannot take the "
            f"task's arguments: it is called with all of them, bound to the task's signature "
            f"{task_sig} with defaults applied ({exc}). Give it the task's parameters "
            f"({example}), or add *args/**kwargs for those it ignores"
        ) from None


def check_key_spec(spec: object, func: Callable[..., Any] | None, where: str) -> None:
    """Validate a ``redlock_key`` value; raise :class:`RedlockConfigError` naming ``where``.

    With ``func`` (the task's ``run``), also check it against the task's
    parameters: the names are parameters, the callable takes the arguments.
    """
    if spec is None or spec == "":
        return
    if callable(spec):
        _check_callable(spec, func, where)
        return
    if isinstance(spec, str):
        raise RedlockConfigError(
            f"{where} is the str {spec!r}: give a list of argument names such as "
            f'({spec!r},), a callable returning a str, "" for the task name alone, '
            "or None for all arguments"
        )
    if not isinstance(spec, (list, tuple)) or not all(isinstance(n, str) for n in spec):
        raise RedlockConfigError(
            f"{where} must be None (all arguments), a list of argument names, a callable "
            f'returning a str, or "" (the task name alone), not {spec!r}'
        )
    if not spec:
        raise RedlockConfigError(f'{where} is an empty list; use "" to lock on the task name alone')
    if func is None:
        return
    params = _signature(func).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [name for name in spec if name not in params]
    if unknown:
        raise RedlockConfigError(
            f"{where} names {', '.join(map(repr, unknown))}, which "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of the "
            f"task; its parameters are {', '.join(params) or '(none)'}"
        )


def build_key(
    prefix: str,
    task_name: str,
    func: Callable[..., Any],
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    spec: object = None,
) -> str:
    """The lock key of one call of ``task_name`` (see the module docstring).

    ``func`` is the task's ``run`` (a bound method for ``bind=True`` tasks).
    """
    if spec == "":
        return f"{prefix}{task_name}"
    bound = bind_arguments(func, args or (), kwargs or {}, task_name, defaults=False)
    given = set(bound.arguments)
    bound.apply_defaults()
    if callable(spec):
        try:
            made = spec(*bound.args, **bound.kwargs)
        except Exception as exc:
            raise RedlockConfigError(
                f"task {task_name}: its redlock_key callable {_callable_name(spec)} raised "
                f"{type(exc).__name__}: {exc}. It is called with the call's arguments bound "
                f"to the task's signature {bound.signature}, defaults applied, and must return "
                "a str; fix the callable, or set redlock_key to the names of the arguments"
            ) from exc
        if not isinstance(made, str):
            raise RedlockConfigError(
                f"task {task_name}: its redlock_key callable returned {type(made).__name__} "
                f"{made!r}; it must return a str"
            )
        return f"{prefix}{task_name}:{digest(made.encode('utf-8'))}"
    arguments: Mapping[str, Any] = bound.arguments
    if spec is not None:
        names: Sequence[str] = spec  # type: ignore[assignment]
        arguments = {name: _lookup(bound, name, task_name) for name in names}
    return f"{prefix}{task_name}:{digest(_encode_arguments(arguments, task_name, given))}"


def _lookup(bound: inspect.BoundArguments, name: str, task_name: str) -> Any:
    if name in bound.arguments:
        return bound.arguments[name]
    for param in bound.signature.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return bound.arguments.get(param.name, {}).get(name)
    raise RedlockConfigError(  # pragma: no cover - check_key_spec catches it at bind time
        f"task {task_name}: redlock_key names {name!r}, which is not one of its arguments"
    )


#: A running task's token: its task id, then "|" and 12 hex digits for the run.
_RUN_TOKEN = re.compile(r"(.*)\|[0-9a-f]{12}", re.DOTALL)


@functools.lru_cache(maxsize=64)
def run_mark(pid: int, hostname: str | None = None) -> str:
    """6 hex digits naming the process that runs a task: its machine's host name and pid.

    A run's token starts with its process's mark (see :func:`run_token`), so
    the main worker process, which knows the pid of a child it lost or killed
    (on its own machine), frees that child's run of a task and no other
    delivery's. ``hostname``: this machine's (``socket.gethostname()``) when None.
    """
    host = _process.hostname() if hostname is None else hostname
    return hashlib.sha256(f"{host}:{pid}".encode()).hexdigest()[:6]


def run_token(task_id: str, mark: str | None = None) -> str:
    """The lock token of one run of task ``task_id``: ``"<task id>|<12 hex digits>"``.

    The digits are ``mark`` (6, see :func:`run_mark`), then 6 of a counter of
    this process's runs from a random start; 12 random ones when ``mark`` is
    None. Two deliveries of one message (same task id) get different
    tokens, so the second cannot re-enter the first one's lock. Between a run
    and its retry the lock is held under the bare task id, which the retried
    run takes over.
    """
    if mark is None:
        return f"{task_id}|{secrets.token_hex(6)}"
    if len(mark) != 6 or mark.strip("0123456789abcdef"):
        raise ValueError(f"a run mark is 6 lowercase hex digits, not {mark!r}")
    return f"{task_id}|{mark}{next(_runs) & 0xFFFFFF:06x}"


def _new_runs() -> None:
    global _runs
    _runs = itertools.count(secrets.randbits(24))


#: This process's run counter (its mark tells processes apart): from a random start,
#: again in a forked child.
_runs = itertools.count(secrets.randbits(24))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_runs)


def task_id_of(token: str | None) -> str | None:
    """The task id in a lock token (a run's token or a bare task id); None stays None."""
    if token is None:
        return None
    match = _RUN_TOKEN.fullmatch(token)
    return match.group(1) if match else token
