"""The redlock_* settings: defaults, where each value comes from, validation
messages, start-up checks, and one Redlock per process (fork-safe)."""

from __future__ import annotations

import os
import time
import types
from typing import Any

import fakeredis
import pytest
from celery import Celery

from celery_redlock import config
from celery_redlock.config import (
    DEFAULTS,
    RedlockSettings,
    get_redlock,
    resolve_settings,
    unknown_settings,
    validate_app,
)
from celery_redlock.exceptions import RedlockConfigError
from celery_redlock.task import RedlockTask

SERVERS = ["redis://r1:6379/0", "redis://r2:6379/0", "redis://r3:6379/0"]


def make_app(**conf: Any) -> Celery:
    app = Celery("cfg", set_as_current=False)
    app.conf.update(broker_url="memory://", **conf)
    return app


def test_the_defaults_are_the_documented_ones() -> None:
    assert dict(DEFAULTS) == {
        "servers": (),
        "ttl": 30.0,
        "retry_count": 3,
        "retry_delay": 0.2,
        "drift_factor": 0.01,
        "node_timeout": 0.1,
        "key_prefix": "redlock:",
        "key": None,
        "on_duplicate": "skip",
        "wait": None,
        "lock_on": "run",
        "auto_extend": True,
        "hold": 0.0,
        "on_unavailable": "fail",
        "version_check": True,
    }
    for name in DEFAULTS:  # every setting is in the module's table
        assert f"redlock_{name}" in (config.__doc__ or "")


def test_settings_come_from_app_conf_and_default_otherwise() -> None:
    settings = resolve_settings(make_app(redlock_servers=SERVERS, redlock_ttl=12))
    assert settings.servers == tuple(SERVERS)
    assert settings.ttl == 12.0
    assert settings.on_duplicate == "skip"
    assert settings.wait_for == 12.0  # wait defaults to the TTL


def test_a_task_attribute_overrides_the_app_conf() -> None:
    task = types.SimpleNamespace(name="t", redlock_ttl=3, redlock_on_duplicate="raise")
    settings = resolve_settings(make_app(redlock_servers=SERVERS, redlock_ttl=12), task)
    assert (settings.ttl, settings.on_duplicate) == (3.0, "raise")


def test_a_task_may_set_a_meaningful_none_over_the_app_value() -> None:
    app = make_app(redlock_servers=SERVERS, redlock_key="", redlock_wait=5, redlock_ttl=12)
    app.conf.broker_url = "redis://broker:6379/2"
    app.finalize()

    @app.task(
        base=RedlockTask,
        shared=False,
        redlock_key=None,  # all arguments, not the app's "" (the task name alone)
        redlock_wait=None,  # redlock_ttl, not the app's 5
        redlock_servers=None,  # the broker's server, not the app's servers
        redlock_ttl=None,  # None means nothing for the TTL: unset, the app's value
    )
    def by_arguments(x: int) -> None: ...

    settings = resolve_settings(app, by_arguments, func=by_arguments.run)
    assert settings.key is None
    assert (settings.wait, settings.wait_for, settings.ttl) == (None, 12.0, 12.0)
    assert settings.servers == ("redis://broker:6379/2",)
    assert by_arguments.redlock_key_for((1,)) != by_arguments.redlock_key_for((2,))

    class ByArguments(RedlockTask):  # type: ignore[misc]
        redlock_key = None  # a base class below RedlockTask sets it too

    @app.task(base=ByArguments, shared=False)
    def from_base(x: int) -> None: ...

    assert from_base.redlock_key_for((1,)) != from_base.redlock_key_for((2,))

    @app.task(base=RedlockTask, shared=False)
    def unset(x: int) -> None: ...  # RedlockTask's own None defaults are not set

    settings = resolve_settings(app, unset, func=unset.run)
    assert (settings.key, settings.wait, settings.servers) == ("", 5.0, tuple(SERVERS))
    assert unset.redlock_key_for((1,)) == unset.redlock_key_for((2,))


def test_a_callable_task_key_that_cannot_take_the_arguments_fails_at_registration() -> None:
    app = make_app(redlock_servers=SERVERS)
    app.finalize()
    with pytest.raises(RedlockConfigError) as caught:

        @app.task(base=RedlockTask, shared=False, name="app.charge", redlock_key=lambda a: a)
        def charge(account_id: int, amount: int) -> None: ...

    message = str(caught.value)
    assert message.startswith("the attribute redlock_key of task app.charge is the callable")
    assert "lambda account_id, amount: ..." in message

    @app.task(base=RedlockTask, bind=True, shared=False, redlock_key=lambda a, b: str(a))
    def bound(self: Any, account_id: int, amount: int) -> None: ...  # no self for the key

    assert bound.redlock_key_for((1, 2)) == bound.redlock_key_for((1, 3))


def test_the_app_key_naming_a_parameter_a_task_lacks_names_the_task() -> None:
    task = types.SimpleNamespace(name="app.notify", run=lambda user_id: None)
    app = make_app(redlock_servers=SERVERS, redlock_key=("account_id",))
    with pytest.raises(RedlockConfigError) as caught:
        validate_app(app, [task])
    message = str(caught.value)
    assert message.startswith("task app.notify: the setting redlock_key names 'account_id'")
    assert "give the task its own redlock_key" in message  # how to fix it

    app = make_app(redlock_servers=SERVERS, redlock_key=lambda account_id, amount: "x")
    with pytest.raises(RedlockConfigError, match=r"^task app\.notify: the setting redlock_key is"):
        validate_app(app, [task])

    django = Celery("django", set_as_current=False)
    source = types.SimpleNamespace(
        CELERY_BROKER_URL="memory://",
        CELERY_REDLOCK_SERVERS=SERVERS,
        CELERY_REDLOCK_KEY=("account_id",),
    )
    django.config_from_object(source, namespace="CELERY")
    with pytest.raises(RedlockConfigError) as caught:
        validate_app(django, [task])
    assert str(caught.value).startswith("task app.notify: the setting CELERY_REDLOCK_KEY names")

    # A bad shape is the setting's own error, whatever the task.
    app = make_app(redlock_servers=SERVERS, redlock_key="account_id")
    with pytest.raises(RedlockConfigError, match=r"^the setting redlock_key is the str"):
        validate_app(app, [task])


def test_django_celery_namespace_settings_are_read() -> None:
    app = Celery("django", set_as_current=False)
    source = types.SimpleNamespace(
        CELERY_BROKER_URL="memory://",
        CELERY_REDLOCK_SERVERS=SERVERS,
        CELERY_REDLOCK_TTL=7,
        CELERY_REDLOCK_ON_DUPLICATE="wait",
    )
    app.config_from_object(source, namespace="CELERY")
    settings = resolve_settings(app)
    assert (settings.servers, settings.ttl, settings.on_duplicate) == (tuple(SERVERS), 7.0, "wait")


def test_a_bad_django_setting_is_named_as_it_is_written() -> None:
    app = Celery("django", set_as_current=False)
    source = types.SimpleNamespace(
        CELERY_BROKER_URL="memory://", CELERY_REDLOCK_SERVERS=SERVERS, CELERY_REDLOCK_TTL="x"
    )
    app.config_from_object(source, namespace="CELERY")
    with pytest.raises(RedlockConfigError) as caught:
        validate_app(app)
    expected = "the setting CELERY_REDLOCK_TTL must be a number of seconds, not 'x'"
    assert str(caught.value) == expected


@pytest.mark.parametrize("servers", ["redis://a:6379/0,redis://b:6379/0", "a:6379, b:6379"])
def test_servers_given_as_one_comma_separated_str_are_told_to_be_a_list(servers: str) -> None:
    with pytest.raises(RedlockConfigError) as caught:
        resolve_settings(make_app(redlock_servers=servers))
    message = str(caught.value)
    assert message.startswith("the setting redlock_servers: ")
    assert "several servers are a list of URLs, not one str with commas" in message


def test_servers_default_to_a_redis_broker() -> None:
    app = make_app()
    app.conf.broker_url = "redis://:pw@broker:6379/3;redis://other:6379/0"
    assert resolve_settings(app).servers == ("redis://:pw@broker:6379/3",)
    app.conf.redlock_servers = "redis://one:6379/0"  # one URL is a list of one
    assert resolve_settings(app).servers == ("redis://one:6379/0",)


def test_servers_default_to_the_broker_celery_connects_to_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CELERY_BROKER_URL (and CELERY_BROKER_WRITE_URL) in the environment win over
    the app's broker_url for kombu; the default lock server follows them."""
    app = make_app()
    app.conf.broker_url = "redis://localhost:6379/0"
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://prod:6379/3")
    assert resolve_settings(app).servers == ("redis://prod:6379/3",)
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", "redis://writer:6379/4")
    assert resolve_settings(app).servers == ("redis://writer:6379/4",)


def test_a_tls_broker_s_certificates_go_with_it_to_the_default_lock_server() -> None:
    """broker_use_ssl (CA, client certificate, checks) applies to the lock
    connections too when the lock server is the broker's; options the URL gives
    itself win."""
    import ssl

    from celery_redlock._nodes import parse_server

    app = make_app()
    app.conf.broker_url = "rediss://:pw@broker:6380/0"
    app.conf.broker_use_ssl = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": "/etc/ssl/ca.pem",
        "ssl_certfile": "/etc/ssl/client.pem",
    }
    (server,) = resolve_settings(app).servers
    kwargs = dict(parse_server(server).connection_kwargs)
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert kwargs["ssl_certfile"] == "/etc/ssl/client.pem"
    app.conf.broker_url = "rediss://:pw@broker:6380/0?ssl_cert_reqs=none"
    (server,) = resolve_settings(app).servers
    assert dict(parse_server(server).connection_kwargs)["ssl_cert_reqs"] == "none"


def test_no_servers_and_a_broker_that_is_not_redis_names_redlock_servers() -> None:
    app = make_app()
    app.conf.broker_url = "amqp://guest:secret@rabbit//"
    with pytest.raises(RedlockConfigError) as caught:
        resolve_settings(app)
    message = str(caught.value)
    assert "redlock_servers" in message
    assert "CELERY_REDLOCK_SERVERS" in message
    assert "secret" not in message  # the broker URL is shown redacted


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ttl", 0, "redlock_ttl must be a finite number > 0, not 0"),
        ("ttl", 0.001, "redlock_ttl must be at least 0.01 s"),
        ("ttl", "30", "redlock_ttl must be a number of seconds, not '30'"),
        ("ttl", True, "redlock_ttl must be a number"),
        ("node_timeout", -1, "redlock_node_timeout must be a finite number > 0"),
        ("retry_count", -1, "redlock_retry_count must be an int >= 0"),
        ("retry_count", 1.5, "redlock_retry_count must be an int >= 0"),
        ("retry_delay", float("inf"), "redlock_retry_delay must be a finite number >= 0"),
        ("drift_factor", 0.5, "redlock_drift_factor must be in [0, 0.5)"),
        ("key_prefix", b"x", "redlock_key_prefix must be a non-empty str"),
        ("key_prefix", "", "redlock_key_prefix must be a non-empty str such as 'redlock:'"),
        ("key", "account_id", "redlock_key is the str 'account_id'"),
        ("on_duplicate", "ignore", "redlock_on_duplicate must be one of 'skip', 'raise'"),
        ("lock_on", "send", "redlock_lock_on must be one of 'run', 'publish'"),
        ("on_unavailable", "skip", "redlock_on_unavailable must be one of 'fail', 'run'"),
        ("auto_extend", "yes", "redlock_auto_extend must be True or False"),
        ("version_check", 1, "redlock_version_check must be True or False"),
        ("hold", -5, "redlock_hold must be a finite number >= 0"),
        ("ttl", 1e12, "redlock_ttl must be at most 315360000 s (10 years)"),
        ("hold", 4e8, "redlock_hold must be at most 315360000 s (10 years)"),
        ("retry_delay", 1e10, "redlock_retry_delay must be at most 315360000 s (10 years)"),
        ("node_timeout", 1e12, "redlock_node_timeout must be at most 86400 s (1 day), not"),
        ("node_timeout", 86401, "redlock_node_timeout must be at most 86400 s (1 day), not"),
        ("drift_factor", "0.01", "redlock_drift_factor must be a number in [0, 0.5), a share"),
        ("drift_factor", -0.1, "redlock_drift_factor must be in [0, 0.5), not -0.1"),
        ("drift_factor", float("nan"), "redlock_drift_factor must be in [0, 0.5), not nan"),
        ("wait", "forever", "redlock_wait must be a number"),
        ("servers", ["ftp://x"], "redlock_servers"),
        ("servers", [], "redlock_servers"),
    ],
)
def test_a_bad_setting_is_an_error_naming_it_and_what_it_must_be(
    name: str, value: Any, message: str
) -> None:
    conf: dict[str, Any] = {"redlock_servers": SERVERS, f"redlock_{name}": value}
    with pytest.raises(RedlockConfigError) as caught:
        resolve_settings(make_app(**conf))
    assert message in str(caught.value)
    assert f"the setting redlock_{name}" in str(caught.value)


def test_the_largest_retry_delay_and_node_timeout_pass() -> None:
    app = make_app(
        redlock_servers=SERVERS, redlock_retry_delay=315360000, redlock_node_timeout=86400
    )
    settings = resolve_settings(app)
    assert (settings.retry_delay, settings.node_timeout) == (315360000.0, 86400.0)


def test_a_bad_task_attribute_names_the_task() -> None:
    task = types.SimpleNamespace(name="app.charge", redlock_hold=-1)
    with pytest.raises(RedlockConfigError, match=r"attribute redlock_hold of task app\.charge"):
        resolve_settings(make_app(redlock_servers=SERVERS), task)


def test_unknown_settings_suggest_the_closest_name_and_skip_other_parts() -> None:
    errors = unknown_settings(["redlock_tll", "redlock_ttl", "broker_url", "redlock_beat_ttl"])
    assert len(errors) == 1
    assert "redlock_tll is not a celery_redlock setting; did you mean redlock_ttl?" in errors[0]
    assert unknown_settings(["CELERY_REDLOCK_ON_DUPLICATES"], "CELERY")[0].startswith(
        "CELERY_REDLOCK_ON_DUPLICATES is not a celery_redlock setting; did you mean "
        "CELERY_REDLOCK_ON_DUPLICATE?"
    )
    lower = unknown_settings(["celery_redlock_tll"], "CELERY")[0]
    assert "did you mean celery_redlock_ttl?" in lower
    assert "each after the celery_ prefix" in lower


def test_a_publisher_without_servers_computes_keys_and_fails_only_to_lock() -> None:
    app = make_app()
    app.conf.broker_url = "amqp://rabbit//"
    settings = resolve_settings(app, require_servers=False)
    assert settings.servers == ()
    with pytest.raises(RedlockConfigError, match="redlock_servers is not set"):
        get_redlock(settings)
    with pytest.raises(RedlockConfigError, match="redlock_servers is not set"):
        validate_app(app, [types.SimpleNamespace(name="t", run=lambda: None)])


def test_validate_app_checks_the_conf_and_each_task() -> None:
    validate_app(make_app(redlock_servers=SERVERS))
    with pytest.raises(RedlockConfigError, match="redlock_tll"):
        validate_app(make_app(redlock_servers=SERVERS, redlock_tll=3))
    task = types.SimpleNamespace(name="t", redlock_ttl=-1, run=lambda: None)
    with pytest.raises(RedlockConfigError, match="redlock_ttl of task t"):
        validate_app(make_app(redlock_servers=SERVERS), [task])


def test_validate_app_leaves_an_app_without_redlock_alone() -> None:
    app = make_app()
    app.conf.broker_url = "amqp://rabbit//"  # no Redis anywhere: fine when nothing uses it
    validate_app(app)


# ---------------------------------------------------------------------------
# One Redlock per process


@pytest.fixture
def fake_settings() -> RedlockSettings:
    servers = tuple(fakeredis.FakeRedis(server=fakeredis.FakeServer()) for _ in range(3))
    return RedlockSettings(servers=servers, version_check=False)


def test_one_manager_per_settings_per_process(fake_settings: RedlockSettings) -> None:
    first = get_redlock(fake_settings)
    assert get_redlock(fake_settings) is first
    other = RedlockSettings(servers=fake_settings.servers, version_check=False, retry_count=1)
    assert get_redlock(other) is not first
    config.forget_managers()
    assert get_redlock(fake_settings) is not first
    config.forget_managers()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_its_own_manager(fake_settings: RedlockSettings) -> None:
    parent = get_redlock(fake_settings)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child = get_redlock(fake_settings)
            ok = child is not parent and get_redlock(fake_settings) is child
            lock = child.acquire("fork-test", 5)
            ok = ok and child.release(lock)
            os.write(write, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok"
    os.close(read)
    assert get_redlock(fake_settings) is parent
    config.forget_managers()


def test_a_failed_start_up_check_is_answered_at_once_for_a_while_not_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nodes that do not answer a new Redlock's check (stalled: each try waits out
    the check's timeout): the runs that follow within CHECK_AGAIN_AFTER fail at
    once; after it, the nodes are asked again."""
    from celery_redlock.exceptions import QuorumUnavailable
    from celery_redlock.redlock import Redlock

    checks: list[bool] = []
    answer = {"ok": False}

    def check(self: Redlock) -> list[dict[str, str]]:
        checks.append(answer["ok"])
        if not answer["ok"]:
            raise QuorumUnavailable("0 of 3 nodes answered, a quorum is 2", [])
        return []

    monkeypatch.setattr(Redlock, "check_servers", check)
    monkeypatch.setattr(config, "CHECK_AGAIN_AFTER", 0.2)
    settings = resolve_settings(make_app(redlock_servers=SERVERS))
    try:
        for _ in range(3):
            with pytest.raises(QuorumUnavailable, match="0 of 3 nodes answered"):
                get_redlock(settings)
        assert checks == [False]
        time.sleep(0.25)
        answer["ok"] = True
        manager = get_redlock(settings)
        assert checks == [False, True]
        assert get_redlock(settings) is manager
    finally:
        config.forget_managers()


@pytest.mark.parametrize(
    ("namespace", "names", "error"),
    [
        (None, {"REDLOCK_SERVERS": ["redis://a"]}, "REDLOCK_SERVERS is not read"),
        (None, {"Redlock_Ttl": 5}, "Redlock_Ttl is not read"),
        ("CELERY", {"CELERY_redlock_ttl": 5}, "spell it CELERY_REDLOCK_TTL"),
        ("CELERY", {"REDLOCK_TTL": 5}, "spell it CELERY_REDLOCK_TTL"),
        ("celery", {"CELERY_REDLOCK_TTL": 5}, "spell it celery_redlock_ttl"),
    ],
)
def test_a_setting_spelt_so_that_celery_never_reads_it_stops_the_worker(
    namespace: str | None, names: dict[str, object], error: str
) -> None:
    """A setting Celery would never hand over (wrong case, or missing the namespace
    prefix) is not silently ignored, leaving its default (the broker, one node)."""
    from celery import Celery

    from celery_redlock.config import validate_app

    app = Celery("spelt", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.config_from_object(type("Settings", (), dict(names)), namespace=namespace)
    with pytest.raises(RedlockConfigError, match=error):
        validate_app(app)


def test_a_project_s_own_redlock_named_setting_outside_the_namespace_is_left_alone() -> None:
    """Under namespace="CELERY" (Django), a project's own REDLOCK_URL is none of
    ours: the worker starts."""
    from celery import Celery

    from celery_redlock.config import validate_app

    app = Celery("own", set_as_current=False)
    app.config_from_object(
        type("Settings", (), {"REDLOCK_URL": "x", "CELERY_REDLOCK_SERVERS": ["redis://h:1/0"]}),
        namespace="CELERY",
    )
    validate_app(app)
