"""Server specs that must be refused at parse time, with messages that never show a
password: credentials holding unencoded delimiters, several URLs in one string,
URL options a connection does not take, and Sentinel clients."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel

from celery_redlock import RedlockConfigError, _nodes
from celery_redlock._nodes import classify, parse_server, parse_servers, redact

#: Two halves of a password; neither may show in any message.
ONE, TWO = "Sekr1tOne", "Sekr1tTwo"


def refused(spec: object) -> str:
    """The message ``parse_server(spec)`` refuses ``spec`` with (a RedlockConfigError,
    a ValueError), checked to show no piece of the password."""
    with pytest.raises(RedlockConfigError) as caught:
        parse_servers(spec)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert ONE not in message, message
    assert TWO not in message, message
    return message


# --------------------------------------------------------------------------
# Credentials in messages


def test_several_urls_in_one_string_show_no_password_and_say_to_give_a_list() -> None:
    message = refused(f"redis://:{ONE}@a:6379/0,redis://:{TWO}@b:6379/0")
    assert "give several servers as a list of URLs" in message


@pytest.mark.parametrize("delimiter", ["/", "?", "#", "/x?y#", "://", " "])
@pytest.mark.parametrize(
    "template",
    [
        "redis://:{one}{d}{two}@h:6379/0",
        "redis://user:{one}{d}{two}@h:6379/0",
        "redis://{one}{d}{two}:pw@h:6379/0",
        "rediss://:{one}{d}{two}@h:6380/0",
        "redis://:{one}{d}{two}@h:notaport/0",
        "redis://:{one}{d}{two}@h:6379/db",
    ],
)
def test_a_password_holding_an_unencoded_delimiter_never_shows(
    template: str, delimiter: str
) -> None:
    spec = template.format(one=ONE, two=TWO, d=delimiter)
    try:
        node = parse_server(spec)
    except RedlockConfigError:
        refused(spec)
    else:  # read as a user name or password holding a space: never in the node's name
        assert ONE not in node.name
        assert TWO not in node.name
        assert ONE not in repr(node)


@pytest.mark.parametrize("delimiter", ["/", "?", "#"])
def test_such_a_password_is_refused_with_a_hint_to_percent_encode_it(delimiter: str) -> None:
    message = refused(f"redis://:{ONE}{delimiter}{TWO}@h:6379/0")
    assert "'redis://***@h:6379/0'" in message
    assert "must be percent-encoded" in message


@pytest.mark.parametrize(
    "spec",
    [
        f"redis://h:6379/0?password={ONE}#{TWO}",
        f"redis://h:6379/0?password={ONE}&{TWO}=x",
        f"redis://h:6379/0?password={ONE}&{TWO}",
        f"redis://h:6379/0?db=2&password={ONE}&{TWO}=x&db=3",
    ],
)
def test_a_query_password_holding_a_delimiter_never_shows(spec: str) -> None:
    refused(spec)


def test_a_question_mark_in_a_query_password_is_part_of_it() -> None:
    node = parse_server(f"redis://h:6379/0?password={ONE}?{TWO}")
    assert dict(node.connection_kwargs)["password"] == f"{ONE}?{TWO}"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (f"redis://:{ONE}/{TWO}@h:6379/0", "redis://***@h:6379/0"),
        (f"redis://:{ONE}?{TWO}@h:6379/0", "redis://***@h:6379/0"),
        (f"redis://:{ONE}#{TWO}@h:6379/0", "redis://***@h:6379/0"),
        (f"redis://:{ONE}@a:1/0,redis://:{TWO}@b:1/0", "redis://***@b:1/0"),
        (f"redis://h:1/0?password={ONE}#{TWO}&db=2", "redis://h:1/0?password=***&db=2"),
    ],
)
def test_redact_hides_everything_up_to_the_last_at_sign(text: str, redacted: str) -> None:
    assert redact(text) == redacted


def test_classify_hides_a_password_with_a_slash_in_an_error_text() -> None:
    error = redis.ConnectionError(f"cannot reach redis://u:{ONE}/{TWO}@h:1/0 now")
    vote = classify(parse_server("h:1"), error, False)
    assert ONE not in vote.detail
    assert TWO not in vote.detail
    assert "redis://***@h:1/0 now" in vote.detail


def test_an_at_sign_in_a_query_password_is_still_a_valid_url() -> None:
    node = parse_server("redis://h:1/0?password=a@b")
    assert dict(node.connection_kwargs)["password"] == "a@b"
    assert node.name == "h:1"


# --------------------------------------------------------------------------
# URL options


@pytest.mark.parametrize(
    ("spec", "named", "hint"),
    [
        ("redis://h:1/0?timeout=3", "'timeout'", "node_timeout"),
        ("redis://h:1/0?ssl_cert_reqs=none", "'ssl_cert_reqs'", "rediss://"),
        ("redis://h:1/0?Password=x", "'Password'", "lower case"),
        ("redis://h:1/0?sockettimeout=1", "'sockettimeout'", "socket_timeout"),
        ("unix:///tmp/r.sock?socket_keepalive=true", "'socket_keepalive'", "db"),
        ("redis://h:1/0?retry_on_error=x", "'retry_on_error'", "socket_timeout"),
    ],
)
def test_a_url_option_a_connection_does_not_take_is_refused_at_parse_time(
    spec: str, named: str, hint: str
) -> None:
    """Passed on, each fails every connect later with a raw TypeError (in a connect
    thread); refused now, it is named with the options a URL may give."""
    message = refused(spec)
    assert named in message
    assert hint in message
    assert "a lock server's URL may give" in message
    assert "max_connections is accepted and ignored" in message


def test_max_connections_is_accepted_and_dropped() -> None:
    node = parse_server("redis://h:1/0?max_connections=20&db=2")
    assert "max_connections" not in dict(node.connection_kwargs)
    assert node.name == "h:1/2"
    node.connect(0.5)  # builds a connection (no TypeError); it does not connect yet


SAMPLE_VALUES = {
    "db": "1", "username": "u", "password": "p", "client_name": "c", "lib_name": "x",
    "lib_version": "1", "protocol": "2", "socket_keepalive": "true",
    "socket_read_size": "65536", "encoding": "utf-8", "encoding_errors": "strict",
    "socket_timeout": "1", "socket_connect_timeout": "1", "retry_on_timeout": "true",
    "health_check_interval": "0", "decode_responses": "false", "ssl_keyfile": "/k",
    "ssl_certfile": "/c", "ssl_cert_reqs": "none", "ssl_ca_certs": "/ca",
    "ssl_ca_path": "/cap", "ssl_ca_data": "x", "ssl_password": "x",
    "ssl_check_hostname": "false", "ssl_min_version": "771", "ssl_ciphers": "HIGH",
    "ssl_include_verify_flags": "VERIFY_X509_STRICT",
    "ssl_exclude_verify_flags": "VERIFY_X509_STRICT", "legacy_responses": "true",
    "ssl_validate_ocsp": "false", "ssl_validate_ocsp_stapled": "false",
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:.*lib_name and lib_version:DeprecationWarning")
@pytest.mark.parametrize(
    ("base", "cls"),
    [
        ("redis://h:1/0", redis.Connection),
        ("rediss://h:1/0", redis.SSLConnection),
        ("unix:///tmp/r.sock", redis.UnixDomainSocketConnection),
    ],
)
def test_every_accepted_option_builds_a_connection(base: str, cls: type) -> None:
    accepted = _nodes._accepted_options(cls)
    assert {"db", "password", "username", "client_name"} <= accepted
    assert ("ssl_ca_certs" in accepted) is (cls is redis.SSLConnection)
    query = "&".join(f"{name}={SAMPLE_VALUES[name]}" for name in sorted(accepted))
    node = parse_server(f"{base}?{query}")
    assert isinstance(node.connect(0.5), cls)


def test_the_options_the_lock_replaces_are_replaced() -> None:
    node = parse_server("redis://h:1/0?socket_timeout=30&health_check_interval=5")
    conn: Any = node.connect(0.25)
    assert conn.socket_timeout == 0.25
    assert conn.health_check_interval == 0


# --------------------------------------------------------------------------
# Clients that are not one fixed server


@pytest.mark.parametrize("role", ["master_for", "slave_for"])
def test_a_sentinel_client_is_refused_with_a_hint_to_pass_the_masters_urls(role: str) -> None:
    client = getattr(Sentinel([("127.0.0.1", 26379)]), role)("mymaster")
    message = refused(client)
    assert "Sentinel" in message
    assert "pass the URL of each master" in message


def test_a_client_whose_pool_names_no_server_is_refused() -> None:
    class Custom(redis.Connection):
        pass

    pool = redis.ConnectionPool(connection_class=Custom)
    pool.connection_kwargs.pop("host", None)
    message = refused(redis.Redis(connection_pool=pool))
    assert "names no host or socket path" in message


def test_an_ssl_password_in_a_url_never_shows() -> None:
    """The TLS key's password (``?ssl_password=``) is hidden like the server's."""
    for url in (
        "rediss://h:6380/0?ssl_keyfile=/k&ssl_password=hunter2",
        "rediss://h:6380/0?ssl_password=hunter2&ssl_min_version=bogus",
    ):
        assert "hunter2" not in redact(url)
        with pytest.raises(RedlockConfigError) as caught:
            parse_server(url.replace("/k&", "/k&ssl_min_version=bogus&"))
        assert "hunter2" not in str(caught.value)


def test_url_options_a_connection_takes_are_accepted() -> None:
    """Options redis-py's connections take (``legacy_responses``, OCSP checks on
    TLS) are not refused."""
    parse_server("redis://h:6379/0?legacy_responses=true")
    parse_server("rediss://h:6380/0?ssl_validate_ocsp=false&ssl_validate_ocsp_stapled=false")
