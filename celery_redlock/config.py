"""The ``redlock_*`` settings: defaults, validation, reading ``app.conf``, and
one :class:`~celery_redlock.redlock.Redlock` per process.

Every setting is read with ``app.conf.get("redlock_<name>")``, so Django's
``CELERY_REDLOCK_<NAME>`` (``namespace="CELERY"``) works too, and can be
overridden per task by a task attribute of the same name. A value is taken
from the task attribute when the task sets it (an option of ``app.task()``, or
an attribute of the task class or of a base class below RedlockTask), else
from the app's configuration when set there (not None), else from
:data:`DEFAULTS`. A task may set ``redlock_servers``, ``redlock_key`` or
``redlock_wait`` to None, their meaningful None (the broker, all arguments,
``redlock_ttl``), over the app's value; for another setting None on the task
means unset:

======================  ===========  =================================================
setting                 default      meaning
======================  ===========  =================================================
redlock_servers         (broker)     one URL or a list; unset: the broker's server when
                                     the broker is Redis
redlock_ttl             30.0         seconds a lock lives without being extended
redlock_retry_count     3            attempts to acquire (0 means one)
redlock_retry_delay     0.2          most seconds between attempts (random in [0, x]);
                                     at most 10 years
redlock_drift_factor    0.01         clock drift allowance, a share of the TTL
redlock_node_timeout    0.1          seconds to wait for one node's reply; at most
                                     86400 (1 day)
redlock_key_prefix      "redlock:"   prefix of every task lock key
redlock_key             None         None: all arguments; names; a callable; "": name
redlock_on_duplicate    "skip"       "skip", "raise", "retry" or "wait"
redlock_wait            None         most seconds "wait" blocks (None: redlock_ttl)
redlock_lock_on         "run"        "run", or "publish" (also locked in apply_async)
redlock_auto_extend     True         renew the lock while the body runs
redlock_hold            0.0          keep the key at least this long after acquiring
redlock_on_unavailable  "fail"       "fail", or "run" (run unlocked, with a WARNING)
redlock_version_check   True         check the nodes' Redis version on first use
======================  ===========  =================================================

Bad values raise :class:`~celery_redlock.exceptions.RedlockConfigError`
naming the setting (or the task attribute) and what it must be: at worker
start-up for the configuration (see :func:`validate_app`), when the task is
registered for a task attribute.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import quote

from . import _process
from ._nodes import parse_servers, redact
from .exceptions import QuorumUnavailable, RedlockConfigError
from .keys import KeySpec, check_key_spec
from .redlock import MAX_NODE_TIMEOUT, MAX_TTL, Redlock

__all__ = [
    "DEFAULTS",
    "DUPLICATE_POLICIES",
    "LOCK_ON",
    "SETTING_NAMES",
    "UNAVAILABLE_POLICIES",
    "RedlockSettings",
    "forget_managers",
    "get_redlock",
    "resolve_settings",
    "setting_name",
    "unknown_settings",
    "validate_app",
]

#: What ``redlock_on_duplicate`` may be.
DUPLICATE_POLICIES = ("skip", "raise", "retry", "wait")
#: What ``redlock_lock_on`` may be.
LOCK_ON = ("run", "publish")
#: What ``redlock_on_unavailable`` may be.
UNAVAILABLE_POLICIES = ("fail", "run")
#: Prefix of every setting and task attribute.
PREFIX = "redlock_"
#: The shortest lock TTL, in seconds.
MIN_TTL = 0.01
#: Settings whose None means something (the broker's server, all arguments,
#: ``redlock_ttl``): a task setting one to None overrides the app's value.
NONE_MEANS_SOMETHING = ("servers", "key", "wait")
#: Settings other parts own and validate (the beat scheduler's, see beat.py).
OTHER_SETTINGS = ("redlock_beat_lock_key", "redlock_beat_ttl", "redlock_beat_poll")


@dataclass(frozen=True)
class RedlockSettings:
    """The resolved settings of one task (or of the app), validated."""

    #: the Redis masters (URLs or clients); the broker's server when unset
    servers: tuple[Any, ...] = ()
    #: seconds a lock lives without being extended
    ttl: float = 30.0
    #: attempts to acquire (0 means one)
    retry_count: int = 3
    #: most seconds between attempts
    retry_delay: float = 0.2
    #: clock drift allowance, as a share of the TTL
    drift_factor: float = 0.01
    #: seconds to wait for one node's reply
    node_timeout: float = 0.1
    #: prefix of every task lock key
    key_prefix: str = "redlock:"
    #: None (all arguments), argument names, a callable returning a str, or ""
    key: KeySpec = None
    #: "skip", "raise", "retry" or "wait"
    on_duplicate: str = "skip"
    #: most seconds the "wait" policy blocks; None means ``ttl``
    wait: float | None = None
    #: "run", or "publish" to lock in ``apply_async`` as well
    lock_on: str = "run"
    #: renew the lock while the body runs
    auto_extend: bool = True
    #: seconds the key stays held at least, counted from acquiring
    hold: float = 0.0
    #: "fail", or "run" without the lock
    on_unavailable: str = "fail"
    #: check the nodes' Redis version when the process first uses them
    version_check: bool = True
    #: why ``servers`` is empty (resolved with ``require_servers=False``); not a setting
    servers_error: str = field(default="", repr=False, compare=False)

    @property
    def wait_for(self) -> float:
        """Seconds the "wait" policy blocks (``wait``, else ``ttl``)."""
        return self.ttl if self.wait is None else self.wait

    @functools.cached_property
    def manager_key(self) -> tuple[Any, ...]:
        """What decides which process-wide :class:`Redlock` serves these settings
        (computed once: every locked run looks its manager up by it)."""
        servers = tuple(s if isinstance(s, str) else id(s) for s in self.servers)
        return (
            servers,
            self.retry_count,
            self.retry_delay,
            self.drift_factor,
            self.node_timeout,
            self.version_check,
        )


#: Setting (without the ``redlock_`` prefix) -> default.
DEFAULTS: Mapping[str, Any] = {
    f.name: f.default for f in fields(RedlockSettings) if f.name != "servers_error"
}
#: Every setting's full name, ``redlock_servers`` ... ``redlock_version_check``.
SETTING_NAMES = tuple(PREFIX + name for name in DEFAULTS)


def setting_name(name: str) -> str:
    """``"ttl"`` -> ``"redlock_ttl"``."""
    return PREFIX + name


# -- validation ---------------------------------------------------------------


def _number(where: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RedlockConfigError(f"{where} must be a number of seconds, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise RedlockConfigError(f"{where} must be a finite number {bound}, not {value!r}")
    return number


def _choice(where: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise RedlockConfigError(f"{where} must be one of {listed}, not {value!r}")
    return str(value)


def _flag(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RedlockConfigError(f"{where} must be True or False, not {value!r}")
    return value


def _servers(where: str, value: object) -> tuple[Any, ...]:
    servers = (value,) if isinstance(value, str) or not isinstance(value, (list, tuple)) else value
    try:
        parse_servers(list(servers))
    except RedlockConfigError as exc:
        hint = ""
        if any(isinstance(s, str) and "," in s for s in servers):
            hint = (
                "; several servers are a list of URLs, not one str with commas: "
                "['redis://r1:6379/0', 'redis://r2:6379/0', ...] "
                '(from an environment variable: value.split(","))'
            )
        raise RedlockConfigError(f"{where}: {exc}{hint}") from None
    return tuple(servers)


def _at_most_max_ttl(
    where: str, seconds: float, value: object, clock: str = "Redis' expiry clock"
) -> float:
    if seconds > MAX_TTL:
        raise RedlockConfigError(
            f"{where} must be at most {MAX_TTL:.0f} s (10 years), not {value!r}; longer "
            f"ones overflow {clock}"
        )
    return seconds


def _share(where: str, value: object) -> float:
    """A share of the TTL in [0, 0.5) (``redlock_drift_factor``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RedlockConfigError(
            f"{where} must be a number in [0, 0.5), a share of the lock's TTL (0.01 is "
            f"usual), not {value!r}"
        )
    number = float(value)
    if not 0 <= number < 0.5:  # also NaN
        raise RedlockConfigError(f"{where} must be in [0, 0.5), not {value!r}; 0.01 is usual")
    return number


def _validate(name: str, value: object, where: str, func: Callable[..., Any] | None) -> Any:
    if name == "servers":
        return _servers(where, value)
    if name == "ttl":
        ttl = _number(where, value, positive=True)
        if ttl < MIN_TTL:
            raise RedlockConfigError(
                f"{where} must be at least {MIN_TTL} s (the drift allowance eats shorter "
                f"ones), not {value!r}"
            )
        return _at_most_max_ttl(where, ttl, value)
    if name == "node_timeout":
        timeout = _number(where, value, positive=True)
        if timeout > MAX_NODE_TIMEOUT:
            raise RedlockConfigError(
                f"{where} must be at most {MAX_NODE_TIMEOUT:.0f} s (1 day), not {value!r}; it "
                "is the wait for one node's reply (0.1 is usual), and longer ones overflow "
                "the sockets' clocks"
            )
        return timeout
    if name == "hold":
        return _at_most_max_ttl(where, _number(where, value), value)
    if name == "retry_delay":
        clock = "the clock a wait between attempts sleeps on"
        return _at_most_max_ttl(where, _number(where, value), value, clock)
    if name == "wait":
        return None if value is None else _number(where, value)
    if name == "retry_count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RedlockConfigError(
                f"{where} must be an int >= 0 (0 means a single attempt), not {value!r}"
            )
        return value
    if name == "drift_factor":
        return _share(where, value)
    if name == "key_prefix":
        if not isinstance(value, str) or not value:
            # Empty, a lock key could be a Celery queue's name on the broker's Redis:
            # the SET NX would find it taken, and the task be skipped for ever.
            raise RedlockConfigError(
                f"{where} must be a non-empty str such as 'redlock:', not {value!r}"
            )
        return value
    if name == "key":
        check_key_spec(value, func, where)
        return value
    if name == "on_duplicate":
        return _choice(where, value, DUPLICATE_POLICIES)
    if name == "lock_on":
        return _choice(where, value, LOCK_ON)
    if name == "on_unavailable":
        return _choice(where, value, UNAVAILABLE_POLICIES)
    if name in ("auto_extend", "version_check"):
        return _flag(where, value)
    raise AssertionError(name)  # pragma: no cover


def conf_where(name: str) -> str:
    """How an error names a setting read from the app's configuration."""
    return f"the setting {setting_name(name)}"


def task_where(name: str, task_name: str) -> str:
    """How an error names a task attribute."""
    return f"the attribute {setting_name(name)} of task {task_name}"


def validate_value(
    name: str, value: object, where: str, func: Callable[..., Any] | None = None
) -> Any:
    """Validate one setting's value (not None); return it normalised.

    Raises :class:`RedlockConfigError` naming ``where``.
    """
    return _validate(name, value, where, func)


#: broker_use_ssl's keys that a rediss:// lock server takes as URL options.
_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def _with_broker_ssl(url: str, use_ssl: object) -> str:
    """``url`` with the TLS files and checks of ``broker_use_ssl`` as URL options
    (those the URL does not give itself), as kombu connects to the broker."""
    if not isinstance(use_ssl, Mapping):
        return url
    given = {part.split("=", 1)[0] for part in url.partition("?")[2].split("&") if part}
    extra = []
    for name in _SSL_OPTIONS:
        value = use_ssl.get(name)
        if value is None or name in given:
            continue
        if name == "ssl_cert_reqs" and not isinstance(value, str):
            value = {0: "none", 1: "optional", 2: "required"}.get(int(value), value)
        extra.append(f"{name}={quote(str(value), safe='')}")
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + "&".join(extra)


def _broker_servers(app: Any) -> tuple[Any, ...]:
    # The properties, as kombu connects with them: CELERY_BROKER_WRITE_URL and
    # CELERY_BROKER_URL in the environment come first.
    conf = app.conf
    url = getattr(conf, "broker_write_url", None) or getattr(conf, "broker_url", None)
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if isinstance(url, str):
        first = url.split(";")[0].strip()
        scheme = first.split("://", 1)[0].lower()
        if scheme == "rediss":
            return (_with_broker_ssl(first, conf.get("broker_use_ssl")),)
        if scheme == "redis":
            return (first,)
    shown = redact(str(url)) if url else "not set"
    raise RedlockConfigError(
        f"the setting redlock_servers is not set and the broker ({shown}) is not a Redis URL; "
        "set app.conf.redlock_servers to one Redis URL or a list of them, e.g. "
        "['redis://r1:6379/0', 'redis://r2:6379/0', 'redis://r3:6379/0'] "
        "(CELERY_REDLOCK_SERVERS with Django)"
    )


def _set_on_task(task: Any, full: str) -> bool:
    """Whether ``task`` sets the attribute ``full`` itself: on the instance, or in
    the own ``__dict__`` of a class below RedlockTask in its class's MRO
    (``app.task(**options)`` makes a subclass holding the options), not through
    RedlockTask's defaults (all None)."""
    if full in getattr(task, "__dict__", {}):
        return True
    # Looked up, not imported: the task module imports this one (and celery).
    base = getattr(sys.modules.get(f"{__package__}.task"), "RedlockTask", None)
    for klass in type(task).__mro__:
        if klass is base:
            return False
        if full in vars(klass):
            return True
    return False


def resolve_settings(
    app: Any,
    task: Any = None,
    *,
    func: Callable[..., Any] | None = None,
    require_servers: bool = True,
) -> RedlockSettings:
    """The settings for ``task`` (or the app's, when ``task`` is None), validated.

    Each value comes from the task attribute when the task sets it (see
    :func:`_set_on_task`; None counts only for the settings in
    :data:`NONE_MEANS_SOMETHING`), else from ``app.conf.get("redlock_<name>")``
    when not None, else the default.
    With ``require_servers=False``, a process that has no servers to use (no
    ``redlock_servers``, a broker that is not Redis) gets empty ``servers``
    and the error is raised by :func:`get_redlock` instead: a publisher
    computes keys without talking to Redis.
    """
    conf = app.conf
    values: dict[str, Any] = {}
    task_name = getattr(task, "name", None) or "?"
    for name, default in DEFAULTS.items():
        full = setting_name(name)
        on_task = task is not None and _set_on_task(task, full)
        value = getattr(task, full, None) if on_task else None
        if isinstance(value, types.MethodType) and value.__self__ is task:
            # A function given as a task option (redlock_key=f) is a class attribute,
            # so the instance binds it; the setting is the function itself.
            value = value.__func__
        if on_task and (value is not None or name in NONE_MEANS_SOMETHING):
            where = task_where(name, task_name)
        else:
            value = conf.get(full)
            where = conf_where(name)
        if value is None:
            if name == "servers":
                try:
                    values[name] = _broker_servers(app)
                except RedlockConfigError as exc:
                    if require_servers:
                        raise
                    values[name], values["servers_error"] = (), str(exc)
            else:
                values[name] = default
            continue
        try:
            if name == "key" and task is not None and where == conf_where(name):
                _check_conf_key(value, where, func, task_name, full)
            values[name] = _validate(name, value, where, func)
        except RedlockConfigError as exc:
            spelt = _as_spelt(app, full) if where == conf_where(name) else full
            if spelt == full:
                raise
            # Name the setting as the user wrote it (CELERY_REDLOCK_TTL with Django).
            raise RedlockConfigError(str(exc).replace(where, f"the setting {spelt}", 1)) from None
    return RedlockSettings(**values)


def _check_conf_key(
    value: object, where: str, func: Callable[..., Any] | None, task_name: str, full: str
) -> None:
    """The app's ``redlock_key`` against one task's parameters: an error names the task."""
    check_key_spec(value, None, where)  # its shape: the setting's own error
    try:
        check_key_spec(value, func, where)
    except RedlockConfigError as exc:
        raise RedlockConfigError(
            f"task {task_name}: {exc}; give the task its own {full} "
            f"(@app.task(base=RedlockTask, {full}=...)) to override the setting for it"
        ) from None


def _as_spelt(app: Any, full: str) -> str:
    """``full`` (``redlock_ttl``) as the app's configuration spells it under its
    namespace (``CELERY_REDLOCK_TTL``), or ``full`` when it is not so spelt."""
    namespace = getattr(app, "namespace", None)
    if not namespace:
        return full
    wanted = f"{namespace}_{full}".lower()
    names = list(app.conf.keys())
    for key in names:
        if isinstance(key, str) and key.lower() == wanted:
            return key
    return full


def unknown_settings(names: Iterable[object], namespace: str | None = None) -> list[str]:
    """Error lines for ``redlock_*`` names that are not settings (typos), or that are
    settings spelt so that Celery never reads them (``REDLOCK_TTL`` in a module
    without a namespace; ``CELERY_redlock_ttl``, or ``REDLOCK_TTL`` without the
    prefix, under ``namespace="CELERY"``).

    Under a namespace only the names after its prefix are checked (and settings
    set on ``app.conf`` by their own lowercase name): a project's own settings
    that happen to start with ``REDLOCK_`` (Django's) are none of ours.
    ``redlock_beat_*`` names belong to :mod:`celery_redlock.beat`, which checks them.
    """
    errors = []
    ns = (namespace or "").lower()
    known = SETTING_NAMES + OTHER_SETTINGS
    for raw in names:
        if not isinstance(raw, str):
            continue
        name = raw.lower()
        spelt = ""  # the namespace prefix as the name spells it ("CELERY_")
        if ns and name.startswith(ns + "_"):
            spelt = raw[: len(ns) + 1]
            name = name[len(ns) + 1 :]
        if not name.startswith(PREFIX) or name == "redlock_lost":
            continue
        if ns and not spelt:
            if raw == name:
                pass  # set on app.conf by its own name: read as it is
            elif name in known:
                errors.append(
                    f"{raw} is not read: the app reads its settings under the "
                    f"{namespace}_ namespace; spell it {namespace}_{name.upper()}"
                )
                continue
            else:
                continue  # the project's own setting, not under the namespace
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = ""
            if close:
                same_case = close[0].upper() if raw[len(spelt) :].isupper() else close[0]
                hint = f"; did you mean {spelt}{same_case}?"
            where = f", each after the {spelt} prefix" if spelt else ""
            errors.append(
                f"{raw} is not a celery_redlock setting{hint} "
                f"(the settings are {', '.join(known)}{where})"
            )
            continue
        if spelt and namespace:
            # As Celery looks it up: the namespace as given, then the name in its case.
            readable = f"{namespace}_{name.upper() if namespace.isupper() else name}"
            if raw != readable:
                errors.append(f"{raw} is not read: spell it {readable}")
        elif not spelt and raw != name:
            errors.append(
                f"{raw} is not read: Celery reads the setting by its lowercase name "
                f"{name} (or, with app.config_from_object(..., namespace=...), as "
                f"<NAMESPACE>_{name.upper()})"
            )
    return errors


def validate_app(app: Any, tasks: Iterable[Any] = ()) -> None:
    """Check the app's ``redlock_*`` configuration and every given task's settings.

    Called when a worker starts (see :mod:`celery_redlock.signals`); raises
    :class:`RedlockConfigError` naming the first bad setting.
    """
    names = list(app.conf.keys())
    namespace = getattr(app, "namespace", None)
    errors = unknown_settings(names, namespace)
    if errors:
        raise RedlockConfigError(errors[0])
    tasks = list(tasks)
    for task in tasks:
        resolve_settings(app, task, func=getattr(task, "run", None))
    if not tasks and _mentions_redlock(names, namespace):
        resolve_settings(app)


def _mentions_redlock(names: list[Any], namespace: str | None) -> bool:
    ns = f"{namespace.lower()}_" if namespace else ""
    for raw in names:
        name = raw.lower() if isinstance(raw, str) else ""
        if name.startswith(PREFIX) or (ns and name.startswith(ns + PREFIX)):
            return True
    return False


# -- one Redlock per process ---------------------------------------------------

#: Seconds a process answers QuorumUnavailable at once, without asking the nodes
#: again, after a quorum did not answer the check a new Redlock makes.
CHECK_AGAIN_AFTER = 5.0

_managers: dict[tuple[Any, ...], Redlock] = {}
#: manager key -> (until when, the QuorumUnavailable of the last failed check)
_failures: dict[tuple[Any, ...], tuple[float, QuorumUnavailable]] = {}
_orphans: list[Redlock] = []  # a parent's managers, kept (never closed) in a forked child
_owner = os.getpid()
_guard = threading.Lock()


def get_redlock(settings: RedlockSettings) -> Redlock:
    """The process's :class:`Redlock` for ``settings``' servers, created on first use.

    Never shared across a fork: a child process makes its own.
    """
    global _owner
    if not settings.servers:
        raise RedlockConfigError(settings.servers_error or "no Redis servers: set redlock_servers")
    key = settings.manager_key
    manager = _managers.get(key)
    if manager is not None and _owner == _process.pid():
        return manager
    with _guard:
        if _owner != os.getpid():
            _forget_in_child()
        manager = _managers.get(key)
        if manager is None:
            failed = _failures.get(key)
            if failed is not None and time.monotonic() < failed[0]:
                # A quorum did not answer the start-up check a moment ago: fail at once
                # rather than make every run wait out the check's timeout again.
                raise QuorumUnavailable(failed[1].message, failed[1].votes)
            try:
                manager = Redlock(
                    list(settings.servers),
                    retry_count=settings.retry_count,
                    retry_delay=settings.retry_delay,
                    drift_factor=settings.drift_factor,
                    version_check=settings.version_check,
                    node_timeout=settings.node_timeout,
                )
            except QuorumUnavailable as exc:
                _failures[key] = (time.monotonic() + CHECK_AGAIN_AFTER, exc)
                raise
            _failures.pop(key, None)
            _managers[key] = manager
        return manager


def _forget_in_child() -> None:
    global _owner, _guard
    _orphans.extend(_managers.values())
    _managers.clear()
    _failures.clear()
    _owner = os.getpid()
    _guard = threading.Lock()


def forget_managers() -> None:
    """Close and drop this process's managers (tests; a new app configuration)."""
    with _guard:
        managers = list(_managers.values()) if _owner == os.getpid() else []
        _managers.clear()
        _failures.clear()
    for manager in managers:
        manager.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
