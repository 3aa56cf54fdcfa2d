"""Keys: canonical encoding, argument binding, and the key scheme."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from celery_unique.exceptions import ConfigurationError, UniqueKeyError
from celery_unique.keys import (
    ArgumentKey,
    canonical_json,
    digest,
    digest_of_key,
    family_key,
    lock_key,
    task_name_of_tag,
    validate_prefix,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.uuids(),
    st.datetimes(),
    st.dates(),
    st.decimals(allow_nan=False),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
        st.frozensets(st.integers(), max_size=4),
    ),
    max_leaves=12,
)


def _strict(value: Any) -> Any:
    """A structure that compares by type as well as value (what a task sees)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_strict(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _strict(v)) for k, v in value.items())))
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, tuple(sorted(map(repr, value))))
    return (type(value).__name__, repr(value))


@given(values)
def test_equal_values_give_equal_digests(value: Any) -> None:
    import copy

    assert digest(value) == digest(copy.deepcopy(value))


@given(values, values)
def test_different_values_give_different_digests(a: Any, b: Any) -> None:
    if _strict(a) != _strict(b):
        assert digest(a) != digest(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, "1"),
        (None, "None"),
        (None, "null"),
        (True, 1),
        (1, 1.0),
        ((1, 2), [1, 2]),
        ({1: "a"}, {"1": "a"}),
        (b"abc", "abc"),
        (uuid.UUID(int=1), str(uuid.UUID(int=1))),
        (date(2026, 1, 1), "2026-01-01"),
        (Decimal("1.0"), "1.0"),
        ({1, 2}, [1, 2]),
        (frozenset({1}), {1}),
        ({"\x00tuple": [1]}, (1,)),
        ([["\x00tuple", [1]]], (1,)),
    ],
)
def test_values_json_would_confuse_stay_apart(a: Any, b: Any) -> None:
    assert digest(a) != digest(b)


def test_canonical_json_is_order_independent_and_ascii() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == canonical_json({"a": "é", "b": 1})
    assert canonical_json({"a": "é"}).isascii()
    assert canonical_json({3, 1, 2}) == canonical_json({2, 3, 1})


def test_equal_instants_in_other_zones_are_one_key() -> None:
    utc = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    plus_one = utc.astimezone(timezone(timedelta(hours=1)))
    assert digest(utc) == digest(plus_one)
    assert digest(utc) != digest(utc.replace(tzinfo=None))
    assert digest(time(1, 2)) != digest("01:02:00")


def test_unserialisable_arguments_raise_unique_key_error() -> None:
    with pytest.raises(UniqueKeyError, match="object"):
        digest(object())
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(UniqueKeyError, match="self-referencing"):
        digest(loop)


def test_large_and_odd_arguments_give_fixed_length_keys() -> None:
    for value in ("x" * 1_000_000, "{}:\n\udcff", b"\xff\xfe"):
        key = lock_key(family_key("p", "t", digest(value)))
        assert len(key) == len(lock_key(family_key("p", "t", digest(1))))


# Strings full of what a key's syntax uses: braces (the hash tag), colons, newlines, NUL, a lone surrogate.
odd_text = st.text(alphabet=st.sampled_from(["{", "}", ":", "\n", "\r", "\x00", "a", "é", "\udcff", " "]))
arguments = st.recursive(
    st.one_of(scalars, odd_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(odd_text, inner, max_size=3)),
    max_leaves=8,
)


def shaped(order_id: Any, note: Any = None, *rest: Any, flag: bool = False, **extra: Any) -> None: ...


FIXED_LENGTH = len(lock_key(family_key("app", "proj.shaped", "0" * 64)))


@given(
    st.lists(arguments, max_size=4),
    st.dictionaries(odd_text, arguments, max_size=3),
    st.sampled_from([None, "args", "kwargs"]),
)
def test_any_call_gives_a_fixed_length_key_with_one_hash_tag_or_a_key_error(
    args: list[Any], kwargs: dict[str, Any], unserialisable: str | None
) -> None:
    if unserialisable == "args":
        args = [*args, object()]
    elif unserialisable == "kwargs":
        kwargs = {**kwargs, "unserialisable": object()}
    key = ArgumentKey("proj.shaped", shaped, None)
    try:
        argument_digest = key.digest(args, kwargs)
    except UniqueKeyError:
        # Unserialisable, or not a call of this signature: refused, nothing else.
        assert unserialisable is not None or not args or set(kwargs) & {"order_id", "note", "flag"}
        return
    assert unserialisable is None
    built = lock_key(family_key("app", "proj.shaped", argument_digest))
    assert len(built) == FIXED_LENGTH and built.isascii()
    assert built.count("{") == 1 and built.count("}") == 1
    assert digest_of_key(built) == argument_digest


@given(arguments, arguments, st.dictionaries(odd_text, arguments, max_size=3))
def test_positional_and_keyword_spellings_are_one_key(
    order_id: Any, note: Any, extra: dict[str, Any]
) -> None:
    assume(not set(extra) & {"order_id", "note", "flag"})
    key = ArgumentKey("proj.shaped", shaped, None)
    spellings = [
        key.digest((order_id, note), extra),
        key.digest((order_id,), {"note": note, **extra}),
        key.digest((), {"order_id": order_id, "note": note, "flag": False, **extra}),
    ]
    assert len(set(spellings)) == 1


def test_deep_nesting_is_a_key_error_not_a_crash() -> None:
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(UniqueKeyError, match="deeply nested"):
        digest(deep)


def run(loan_id: int, force: bool = False, *, reason: str = "") -> None: ...


def plain(loan_id: int, force: bool = False) -> None: ...


@pytest.mark.parametrize("func", [run, plain])
def test_binding_applies_defaults_and_names(func: Any) -> None:
    key = ArgumentKey("t", func, None)
    assert key.digest((42,), {}) == key.digest((), {"loan_id": 42})
    assert key.digest((42,), {}) == key.digest((42, False), {})
    assert key.digest((42,), {}) != key.digest((42, True), {})


def test_unique_on_names_choose_the_arguments() -> None:
    key = ArgumentKey("t", plain, ("loan_id",))
    assert key.digest((42, True), {}) == key.digest((42, False), {})
    assert key.digest((42,), {}) != key.digest((43,), {})


def test_unique_on_callable_gives_the_material() -> None:
    key = ArgumentKey("t", plain, lambda args, kwargs: args[0] // 10)
    assert key.digest((41,), {}) == key.digest((42,), {})
    assert key.digest((41,), {}) != key.digest((51,), {})


def test_unknown_unique_on_name_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="nope"):
        ArgumentKey("t", plain, ("nope",))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, 2, 3), {}), ((1,), {"loan_id": 1}), ((1,), {"other": 2})],
)
def test_calls_that_do_not_bind_raise_unique_key_error(args: Any, kwargs: Any) -> None:
    with pytest.raises(UniqueKeyError, match="signature") as info:
        ArgumentKey("t", plain, None).digest(args, kwargs)
    assert isinstance(info.value, TypeError)


def test_key_scheme_has_one_hash_tag_per_family() -> None:
    family = family_key("app", "proj.tasks.recompute", "ab" * 32)
    key = lock_key(family)
    assert key == "app:v1:{proj.tasks.recompute:" + "ab" * 32 + "}:lock"
    assert digest_of_key(key) == "ab" * 32


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", 3])
def test_invalid_prefix_is_a_configuration_error(prefix: Any) -> None:
    with pytest.raises(ConfigurationError):
        validate_prefix(prefix)


def _hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the text between the first "{" and the next "}"."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


@given(st.text(min_size=1))
def test_any_task_name_keeps_one_hash_tag_per_family(task_name: str) -> None:
    family = family_key("app", task_name, "d" * 64)
    tag = _hash_tag(family)
    # The whole name and digest are the tag, whatever braces the name holds,
    # so every key of the family (":lock", ":run", ...) lands in one slot.
    assert tag.endswith(":" + "d" * 64) and _hash_tag(lock_key(family)) == tag
    assert task_name_of_tag(tag.rpartition(":")[0]) == task_name


class Loan:
    """A user's own class: not something a key can be built from."""


def test_the_argument_that_cannot_be_encoded_is_named() -> None:
    def recompute(loan: Any, amount: int = 0) -> None: ...

    key = ArgumentKey("loans.recompute", recompute, None)
    with pytest.raises(UniqueKeyError, match=r"loans\.recompute: .*argument 'loan'.* Loan") as info:
        key.digest((Loan(),), {"amount": 5})
    assert "unique_on" in str(info.value)  # and what to do about it


def test_an_integer_too_long_to_write_is_a_unique_key_error() -> None:
    def charge(amount: int) -> None: ...

    with pytest.raises(UniqueKeyError, match="argument 'amount'"):
        ArgumentKey("billing.charge", charge, None).digest((10**5000,), {})
    with pytest.raises(UniqueKeyError):
        digest(10**5000)


def test_a_key_function_whose_value_cannot_be_encoded_is_named() -> None:
    def recompute(loan: Any) -> None: ...

    key = ArgumentKey("loans.recompute", recompute, lambda args, kwargs: args[0])
    with pytest.raises(UniqueKeyError, match="unique_on function"):
        key.digest((Loan(),), {})


def test_one_and_one_point_zero_are_different_keys() -> None:
    """As docs/usage.rst says: JSON keeps an int and a float apart."""
    assert digest(1) != digest(1.0)
    assert digest(True) != digest(1)


class Colour(str, enum.Enum):
    RED = "red"


plain_arguments = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and the infinities too
    st.text(),
    st.sampled_from([Colour.RED, 10**5000]),  # a subclass; an integer too long to write
    st.lists(st.integers(), max_size=2),
)


@given(
    st.tuples(plain_arguments, plain_arguments),
    st.dictionaries(st.sampled_from(["z", "_a"]), plain_arguments),
)
def test_scalar_arguments_give_the_digest_of_the_general_encoding(
    args: tuple[Any, Any], kwargs: dict[str, Any]
) -> None:
    """A call of plain scalars takes a shorter way to its digest: the same digest, or the same error."""

    def task(a: Any, b: Any, z: Any = 0, _a: Any = None) -> None: ...

    key = ArgumentKey("t", task, None)
    bound = {"a": args[0], "b": args[1], "z": 0, "_a": None, **kwargs}
    try:
        expected = digest(bound)
    except UniqueKeyError:
        with pytest.raises(UniqueKeyError):
            key.digest(args, kwargs)
    else:
        assert key.digest(args, kwargs) == expected
