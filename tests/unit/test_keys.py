"""Task lock keys: arguments bound to the signature, canonical JSON, a digest."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu.utils.json import dumps, loads

from celery_redlock.exceptions import RedlockConfigError
from celery_redlock.keys import (
    bind_arguments,
    build_key,
    canonical,
    check_key_spec,
    digest,
    run_mark,
    run_token,
    task_id_of,
)


def sync_account(account_id: Any, full: bool = False) -> None: ...


def with_var(a: Any, *rest: Any, b: int = 1, **extra: Any) -> None: ...


class Bound:
    def run(self, account_id: Any, full: bool = False) -> None: ...


def key(func: Any = sync_account, *args: Any, spec: Any = None, **kwargs: Any) -> str:
    return build_key("redlock:", "app.sync", func, args, kwargs, spec)


def test_positional_default_and_keyword_calls_give_one_key() -> None:
    assert key(sync_account, 1) == key(sync_account, 1, False) == key(sync_account, account_id=1)
    assert key(sync_account, 1) != key(sync_account, 1, True)
    assert key(sync_account, 1) != key(sync_account, 2)


def test_a_bound_method_binds_without_self() -> None:
    method = Bound().run
    assert key(method, 1) == key(method, account_id=1, full=False) == key(sync_account, 1)


def test_the_key_is_prefix_task_name_and_a_sha256_digest_never_a_raw_value() -> None:
    made = key(sync_account, "secret-account-name")
    prefix, _, hexdigest = made.rpartition(":")
    assert prefix == "redlock:app.sync"
    assert len(hexdigest) == 64
    assert int(hexdigest, 16) >= 0
    assert "secret" not in made


def test_values_of_different_json_types_give_different_keys() -> None:
    keys = {key(sync_account, v) for v in (1, 1.0, "1", True, None, [1], {"1": 1})}
    assert len(keys) == 7


def test_tuples_lists_and_dict_key_order_and_int_keys_canonicalise_as_json_sends_them() -> None:
    assert canonical((1, 2)) == canonical([1, 2])
    assert canonical({"b": 1, "a": {"y": 2, "x": 3}}) == canonical({"a": {"x": 3, "y": 2}, "b": 1})
    assert canonical({1: "a", None: 2, 2.5: 3}) == canonical({"1": "a", "null": 2, "2.5": 3})
    assert canonical({False: 0}) == canonical({"false": 0})
    assert canonical({"a": 1}) == b'{"a":1}'


KOMBU_VALUES = [
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    dt.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=dt.timezone.utc),
    dt.datetime(2026, 1, 2, 3, 4, 5),
    dt.date(2026, 1, 2),
    dt.time(3, 4, 5),
    decimal.Decimal("1.10"),
    b"text bytes",
    b"\xff\x00binary",
    {"nested": [uuid.UUID(int=7), {"z": decimal.Decimal("2"), "a": (1, 2)}]},
]


@pytest.mark.parametrize("value", KOMBU_VALUES, ids=lambda v: type(v).__name__)
def test_kombu_types_give_the_same_key_before_and_after_a_json_round_trip(value: Any) -> None:
    args, kwargs = (value,), {"full": value}
    sent_args, sent_kwargs = loads(dumps([args, kwargs]))  # what the worker receives
    assert key(sync_account, *args, **kwargs) == key(sync_account, *sent_args, **sent_kwargs)


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.uuids(),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.binary(),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=1), st.dictionaries(st.just("full"), json_values))
def test_any_kombu_json_arguments_keep_their_key_through_the_broker(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    sent_args, sent_kwargs = loads(dumps([args, kwargs]))
    assert key(sync_account, *args, **kwargs) == key(sync_account, *sent_args, **sent_kwargs)


def test_an_argument_json_cannot_encode_is_an_error_naming_task_and_argument() -> None:
    with pytest.raises(RedlockConfigError) as caught:
        key(sync_account, 1, {3, 4})
    message = str(caught.value)
    assert "app.sync" in message
    assert "'full'" in message
    assert "set" in message
    assert "redlock_key" in message  # says how to fix it


def test_arguments_that_do_not_fit_the_signature_are_a_type_error_naming_the_task() -> None:
    with pytest.raises(TypeError, match=r"app\.sync"):
        key(sync_account, 1, 2, 3)
    with pytest.raises(TypeError, match=r"app\.sync"):
        bind_arguments(sync_account, (), {"nope": 1}, "app.sync")


def test_a_list_of_names_keys_on_those_arguments_only() -> None:
    spec = ("account_id",)
    assert key(sync_account, 1, True, spec=spec) == key(sync_account, 1, False, spec=spec)
    assert key(sync_account, 1, spec=spec) != key(sync_account, 2, spec=spec)
    assert key(sync_account, 1, spec=spec) != key(sync_account, 1)


def test_names_can_come_from_var_keyword_arguments() -> None:
    spec = ("a", "tenant")
    assert key(with_var, 1, 2, tenant="x", spec=spec) == key(with_var, 1, 3, tenant="x", spec=spec)
    assert key(with_var, 1, tenant="x", spec=spec) != key(with_var, 1, tenant="y", spec=spec)


def test_a_callable_key_is_hashed_and_must_return_a_str() -> None:
    def by_account(account_id: Any, full: bool) -> str:
        return f"acct-{account_id}"

    made = key(sync_account, 7, spec=by_account)
    assert made == "redlock:app.sync:" + digest(b"acct-7")
    assert made == key(sync_account, 7, True, spec=by_account)
    with pytest.raises(RedlockConfigError, match="must return a str"):
        key(sync_account, 7, spec=lambda account_id, full: 7)


def test_an_empty_string_keys_on_the_task_name_alone() -> None:
    assert key(sync_account, 1, spec="") == "redlock:app.sync"
    assert key(sync_account, 2, spec="") == "redlock:app.sync"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("account_id", "give a list of argument names such as ('account_id',)"),
        (["account_id", 3], "must be None"),
        ([], "empty list"),
        (("accont_id",), "'accont_id', which is not a parameter"),
        (42, "must be None"),
    ],
)
def test_a_bad_key_spec_is_an_error_naming_where_and_the_fix(spec: Any, message: str) -> None:
    with pytest.raises(RedlockConfigError) as caught:
        check_key_spec(spec, sync_account, "the attribute redlock_key of task app.sync")
    assert message in str(caught.value)
    assert "redlock_key of task app.sync" in str(caught.value)


def test_valid_key_specs_pass() -> None:
    specs: tuple[Any, ...] = (
        None,
        "",
        ("account_id", "full"),
        ["full"],
        lambda account_id, full: "x",
        lambda account_id, *rest, **kw: "x",
        lambda *args, **kw: "x",
    )
    for spec in specs:
        check_key_spec(spec, sync_account, "x")
    check_key_spec(("anything",), with_var, "x")  # **extra accepts any name


def test_a_run_mark_names_the_host_and_pid_in_6_hex_digits() -> None:
    import socket

    mark = run_mark(4242, "a")
    assert mark == run_mark(4242, "a")
    assert len(mark) == 6
    assert int(mark, 16) >= 0
    assert run_mark(4242) == run_mark(4242, socket.gethostname())  # this machine's
    # The same pid on another host, or another pid on the same host: other marks.
    others = {run_mark(pid, f"host-{host}") for host in "abcdefgh" for pid in range(4240, 4250)}
    assert len(others) == 80


def test_a_run_token_starts_with_its_mark_and_gives_back_its_task_id() -> None:
    mark = run_mark(4242, "a")
    tokens = {run_token("task-1", mark) for _ in range(50)}
    assert len(tokens) == 50  # each run its own token, even in one process
    for token in tokens:
        assert token.startswith(f"task-1|{mark}")
        assert len(token) == len("task-1|") + 12
        assert task_id_of(token) == "task-1"
    assert task_id_of(run_token("a|b")) == "a|b"  # a task id with a bar in it
    with pytest.raises(ValueError, match="6 lowercase hex digits"):
        run_token("task-1", "ABCDEF")


def test_a_forked_child_counts_its_runs_afresh_and_knows_its_own_pid() -> None:
    """The run counter and the kept pid are made again in a forked child."""
    import os

    from celery_redlock import _process

    assert _process.pid() == os.getpid()
    mark = run_mark(1, "a")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, f"{_process.pid()} {os.getpid()} {run_token('t', mark)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 200).decode().split()
    os.waitpid(child, 0)
    os.close(read)
    assert said[0] == said[1] == str(child)
    # From a new random start: not the parent's next token (1 in 16.7 million to match).
    assert said[2] != run_token("t", mark)


_UNSET = object()


class _Mode:
    """A default value kombu's JSON cannot encode (a sentinel, an Enum member)."""


def with_sentinel(x: Any, since: Any = _UNSET, mode: Any = _Mode) -> None: ...


def test_a_default_the_call_does_not_pass_need_not_be_encodable() -> None:
    """A default is never sent: f(1) and f(x=1) share a key though ``since``'s default
    is a sentinel; passing such a value explicitly still fails, naming it."""
    key = build_key("p:", "t", with_sentinel, (1,), {})
    assert key == build_key("p:", "t", with_sentinel, (), {"x": 1})
    assert key != build_key("p:", "t", with_sentinel, (2,), {})
    assert key != build_key("p:", "t", with_sentinel, (1, "2026-01-01"), {})
    with pytest.raises(RedlockConfigError, match="argument 'since' \\(object\\)"):
        build_key("p:", "t", with_sentinel, (1, object()), {})


def test_a_str_with_a_lone_surrogate_is_keyed_as_kombu_sends_it() -> None:
    """A file name that is not UTF-8 (os.listdir gives lone surrogates): kombu's JSON
    sends it escaped, and the worker receives the same str; both key alike."""
    name = "caf\udce9.txt"
    sent = loads(dumps([name]))
    assert sent == [name]
    key = build_key("p:", "t", sync_account, (name,), {})
    assert key == build_key("p:", "t", sync_account, tuple(sent), {})
    assert key != build_key("p:", "t", sync_account, ("caf\u00e9.txt",), {})


def only_account(account_id: Any) -> None: ...


def keyword_only(account_id: Any, *, amount: int = 0) -> None: ...


@pytest.mark.parametrize(
    ("func", "spec", "example"),
    [
        (sync_account, lambda account_id: str(account_id), "lambda account_id, full: ..."),
        (sync_account, lambda **kw: "x", "lambda account_id, full: ..."),
        (keyword_only, lambda account_id: "x", "lambda account_id, *, amount: ..."),
        (only_account, lambda account_id, amount: "x", "lambda account_id: ..."),
    ],
)
def test_a_callable_key_that_cannot_take_the_task_s_arguments_is_refused_naming_where(
    func: Any, spec: Any, example: str
) -> None:
    with pytest.raises(RedlockConfigError) as caught:
        check_key_spec(spec, func, "the attribute redlock_key of task app.sync")
    message = str(caught.value)
    assert message.startswith("the attribute redlock_key of task app.sync is the callable")
    assert "cannot take the task's arguments" in message
    assert example in message  # how to fix it


def test_a_callable_key_whose_signature_cannot_be_read_is_not_checked() -> None:
    check_key_spec(str, only_account, "x")  # a builtin: no signature to read
    assert key(only_account, 7, spec=str) == "redlock:app.sync:" + digest(b"7")


def test_an_exception_from_a_callable_key_is_a_config_error_naming_the_task() -> None:
    def by_account(account_id: Any, full: bool) -> str:
        return str(account_id["id"])

    with pytest.raises(RedlockConfigError) as caught:
        key(sync_account, 7, spec=by_account)
    message = str(caught.value)
    assert message.startswith("task app.sync: its redlock_key callable")
    assert "by_account raised TypeError" in message
    assert isinstance(caught.value.__cause__, TypeError)  # chained to the original
    with pytest.raises(RedlockConfigError, match=r"task app\.sync: .*redlock_key"):
        key(with_var, 1, 2, spec=lambda a, b=1: "x")  # *rest holds 2: more than it takes


@pytest.mark.parametrize(
    "value", [{1: "a", "1": "b"}, {"x": {None: 1, "null": 2}}, {True: 1, "true": 2}]
)
def test_a_dict_with_two_keys_json_writes_alike_is_not_encodable(value: Any) -> None:
    with pytest.raises(TypeError, match="which JSON writes alike"):
        canonical(value)
    with pytest.raises(RedlockConfigError) as caught:
        key(sync_account, value)
    message = str(caught.value)
    assert "argument 'account_id' (dict) cannot be encoded for its lock key" in message
    assert "JSON writes alike" in message


class Reduced:
    """An argument kombu encodes through its ``__json__``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __json__(self) -> Any:
        return self.value


@pytest.mark.parametrize(
    "reduced",
    [{2: "a", 10: "b"}, {2: "a", "x": "b"}, [(1, 2), {3: {20: 1, 100: 2}}]],
    ids=["int-keys", "mixed-keys", "nested"],
)
def test_what_a_json_method_returns_is_keyed_as_the_worker_receives_it(reduced: Any) -> None:
    args = (Reduced(reduced),)
    sent_args, sent_kwargs = loads(dumps([args, {}]))  # what the worker receives
    assert key(sync_account, *args) == key(sync_account, *sent_args, **sent_kwargs)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (1, 1.0),
        (1, True),
        (0.0, -0.0),
        (decimal.Decimal("1.0"), decimal.Decimal("1")),
        (
            dt.datetime(2026, 1, 2, 12, tzinfo=dt.timezone.utc),
            dt.datetime(2026, 1, 2, 14, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        ),
    ],
)
def test_values_python_compares_equal_get_different_keys_when_the_message_differs(
    one: Any, other: Any
) -> None:
    assert one == other
    assert key(sync_account, one) != key(sync_account, other)  # as documented
