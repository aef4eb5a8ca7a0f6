"""Key encodings: round trips, order preservation, self-delimiting, invalid keys."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.storage import keys

SETTINGS = settings(max_examples=200, deadline=None)

SAFE = keys.MAX_SAFE_INTEGER
safe_ints = st.integers(min_value=-SAFE, max_value=SAFE)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
# Strings with NUL and 01 (the escape and terminator bytes) made likely, plus any unicode
# that UTF-8 can carry (lone surrogates cannot arrive: orjson and protobuf reject them).
texts = st.text(
    alphabet=st.sampled_from("\x00\x01\x7fa\u00ff") | st.characters(codec="utf-8"), max_size=12
)
key_floats = st.floats(
    min_value=-float(keys.MAX_SAFE_INTEGER), max_value=float(keys.MAX_SAFE_INTEGER)
)
key_values = safe_ints | key_floats | texts.filter(bool)
scalars = st.none() | st.booleans() | safe_ints | finite_floats | texts


def rank(value: Any) -> tuple[int, Any]:
    """The order the encoding promises: null < false < true < numbers < strings."""
    if value is None:
        return (0, 0)
    if value is False:
        return (1, 0)
    if value is True:
        return (2, 0)
    if isinstance(value, int | float):
        return (3, value)
    assert isinstance(value, str)
    return (4, value)


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values (1 == 1.0, -0.0 == 0), and of the same JSON type."""
    return rank(a) == rank(b)


def cmp(a: Any, b: Any) -> int:
    ra, rb = rank(a), rank(b)
    return (ra > rb) - (ra < rb)


def bcmp(a: bytes, b: bytes) -> int:
    return (a > b) - (a < b)


# -- round trips -------------------------------------------------------------------------


@SETTINGS
@given(scalars)
def test_value_round_trip(value: Any) -> None:
    encoded = keys.encode_value(value)
    decoded, end = keys.decode_value(encoded)
    assert end == len(encoded)
    assert same(decoded, value)
    assert keys.skip_value(encoded, 0) == len(encoded)


@SETTINGS
@given(key_values)
def test_key_round_trip(value: Any) -> None:
    encoded = keys.encode_key(value)
    assert encoded == keys.encode_value(value)
    decoded, end = keys.decode_value(encoded)
    assert end == len(encoded)
    assert same(decoded, value)


@SETTINGS
@given(safe_ints)
def test_safe_integers_decode_as_int(value: int) -> None:
    decoded, _ = keys.decode_value(keys.encode_key(value))
    assert type(decoded) is int
    assert decoded == value


@SETTINGS
@given(finite_floats.filter(lambda f: not f.is_integer()))
def test_fractions_decode_as_the_same_float(value: float) -> None:
    decoded, _ = keys.decode_value(keys.encode_value(value))
    assert type(decoded) is float
    assert decoded == value


def test_integral_floats_decode_as_int() -> None:
    assert keys.decode_value(keys.encode_key(3.0)) == (3, 9)
    assert type(keys.decode_value(keys.encode_key(-2.0))[0]) is int
    big = float(2**60)  # an indexed value; as a key it is out of range
    value, _ = keys.decode_value(keys.encode_value(big))
    assert type(value) is float
    assert value == big


def test_negative_zero_is_zero() -> None:
    assert keys.encode_key(-0.0) == keys.encode_key(0.0) == keys.encode_key(0)
    assert keys.encode_value(-0.0) == keys.encode_value(0)
    value, _ = keys.decode_value(keys.encode_key(-0.0))
    assert value == 0
    assert math.copysign(1.0, value) == 1.0


def test_string_escapes_nul() -> None:
    assert keys.encode_value("a\x00b") == b"\x05a\x00\xffb\x00\x01"
    assert keys.decode_value(b"\x05a\x00\xffb\x00\x01") == ("a\x00b", 7)
    assert keys.decode_value(keys.encode_value("\x00")) == ("\x00", 5)
    assert keys.decode_value(keys.encode_value("")) == ("", 3)


def test_tags() -> None:
    assert keys.encode_value(None) == b"\x01"
    assert keys.encode_value(False) == b"\x02"
    assert keys.encode_value(True) == b"\x03"
    assert keys.encode_value(1)[:1] == b"\x04"
    assert len(keys.encode_value(1.5)) == 9
    assert keys.encode_value("x")[:1] == b"\x05"


def test_unknown_tag_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown key tag"):
        keys.decode_value(b"\x09")


# -- order --------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(scalars, scalars)
def test_order_is_preserved(a: Any, b: Any) -> None:
    assert bcmp(keys.encode_value(a), keys.encode_value(b)) == cmp(a, b)


@SETTINGS
@given(st.lists(scalars, max_size=20))
def test_sorting_encodings_sorts_values(values: list[Any]) -> None:
    by_bytes = sorted(values, key=keys.encode_value)
    by_value = sorted(values, key=rank)
    assert [rank(v) for v in by_bytes] == [rank(v) for v in by_value]


@SETTINGS
@given(texts, texts)
def test_string_order_is_code_point_order(a: str, b: str) -> None:
    assert bcmp(keys.encode_value(a), keys.encode_value(b)) == (a > b) - (a < b)


@SETTINGS
@given(safe_ints | finite_floats, safe_ints | finite_floats)
def test_number_order(a: float, b: float) -> None:
    assert bcmp(keys.encode_value(a), keys.encode_value(b)) == (a > b) - (a < b)


def test_order_examples() -> None:
    ordered: list[Any] = [
        None,
        False,
        True,
        -1e308,
        -(2**53),
        -1,
        -0.5,
        0,
        5e-324,
        0.5,
        1,
        2**53,
        1e308,
        "",
        "\x00",
        "\x00\x00",
        "\x01",
        "a",
        "a\x00",
        "a\x00b",
        "a\x01",
        "ab",
        "b",
        "é",
        "\uffff",
        "\U0001f600",
    ]
    encoded = [keys.encode_value(v) for v in ordered]
    assert encoded == sorted(encoded)
    assert len(set(encoded)) == len(encoded)
    assert keys.encode_value("a") < keys.encode_value("ab")


# -- self-delimiting ----------------------------------------------------------------------


@SETTINGS
@given(st.lists(scalars, min_size=1, max_size=6), st.binary(max_size=8))
def test_concatenated_values_decode_in_sequence(values: list[Any], suffix: bytes) -> None:
    blob = b"".join(keys.encode_value(v) for v in values) + suffix
    offset = 0
    for value in values:
        skipped = keys.skip_value(blob, offset)
        decoded, offset_after = keys.decode_value(blob, offset)
        assert same(decoded, value)
        assert skipped == offset_after
        offset = offset_after
    assert blob[offset:] == suffix


@SETTINGS
@given(texts, texts, texts)
def test_prefix_plus_parts_keeps_order_of_first_part(a: str, b: str, tail: str) -> None:
    # A composite key (value, pk) sorts by value first whatever follows it.
    ka = keys.encode_value(a) + keys.encode_value(tail)
    kb = keys.encode_value(b) + keys.encode_value("")
    if a != b:
        assert (ka < kb) == (a < b)


def test_decode_at_offset_inside_a_data_key() -> None:
    pk = keys.encode_key("dog\x00house")
    data_key = keys.data_key(7, pk)
    assert data_key[:4] == b"\x00\x00\x00\x07"
    assert keys.decode_value(data_key, 4) == ("dog\x00house", len(data_key))
    index_key = keys.index_prefix(7, "breed") + keys.encode_value("pug") + keys.encode_key(42)
    offset = len(keys.index_prefix(7, "breed"))
    value, offset = keys.decode_value(index_key, offset)
    assert value == "pug"
    assert keys.decode_value(index_key, offset) == (42, len(index_key))


@SETTINGS
@given(texts)
def test_string_prefix_is_a_prefix_of_every_extension(prefix: str) -> None:
    encoded_prefix = keys.string_prefix(prefix)
    assert keys.encode_value(prefix).startswith(encoded_prefix)
    assert keys.encode_value(prefix + "x\x00").startswith(encoded_prefix)


# -- invalid keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        None,
        {},
        {"a": 1},
        [],
        [1],
        b"bytes",
        math.nan,
        math.inf,
        -math.inf,
        "",
        2**53 + 1,
        -(2**53) - 1,
        10**400,
        # Doubles beyond 2^53 too: the integer literal 2^64 + 1 arrives as the double 2^64.
        float(2**53 + 2),
        float(2**64),
        -1e300,
    ],
    ids=repr,
)
def test_invalid_keys(value: Any) -> None:
    with pytest.raises(keys.InvalidKey):
        keys.encode_key(value)


def test_limits_of_safe_integers_are_valid_keys() -> None:
    assert keys.decode_value(keys.encode_key(2**53))[0] == 2**53
    assert keys.decode_value(keys.encode_key(-(2**53)))[0] == -(2**53)


@pytest.mark.parametrize("value", [{}, [], math.nan, math.inf, -math.inf, b"x"], ids=repr)
def test_values_that_cannot_be_indexed(value: Any) -> None:
    with pytest.raises(keys.InvalidKey):
        keys.encode_value(value)


def test_invalid_key_is_a_value_error() -> None:
    assert issubclass(keys.InvalidKey, ValueError)


# -- prefix_end and helpers ---------------------------------------------------------------


def test_prefix_end_examples() -> None:
    assert keys.prefix_end(b"ab") == b"ac"
    assert keys.prefix_end(b"a\xff") == b"b"
    assert keys.prefix_end(b"a\xff\xff") == b"b"
    assert keys.prefix_end(b"\x00") == b"\x01"
    assert keys.prefix_end(b"\xff") is None
    assert keys.prefix_end(b"\xff\xff") is None
    assert keys.prefix_end(b"") is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=4), st.binary(max_size=6))
def test_prefix_end_bounds_exactly_the_keys_with_the_prefix(prefix: bytes, key: bytes) -> None:
    end = keys.prefix_end(prefix)
    inside = key >= prefix and (end is None or key < end)
    assert inside == key.startswith(prefix)


@SETTINGS
@given(st.binary(max_size=4).filter(lambda p: p.strip(b"\xff") != b""))
def test_prefix_end_is_the_smallest_bound(prefix: bytes) -> None:
    end = keys.prefix_end(prefix)
    assert end is not None
    assert end > prefix
    assert not end.startswith(prefix)
    # The prefix extended by any number of FF bytes still sorts below the bound.
    assert prefix + b"\xff" * 16 < end


def test_u64_round_trip_and_order() -> None:
    values = [0, 1, 255, 256, 2**32, 2**63, 2**64 - 1]
    encoded = [keys.u64(v) for v in values]
    assert encoded == sorted(encoded)
    assert [keys.read_u64(e) for e in encoded] == values
    assert keys.read_u64(b"xx" + keys.u64(99), 2) == 99


def test_table_prefix_orders_tables() -> None:
    assert keys.table_prefix(1) < keys.table_prefix(2) < keys.table_prefix(256)
    assert keys.data_key(3, b"k").startswith(keys.table_prefix(3))
    assert keys.index_prefix(3, "a").startswith(keys.table_prefix(3))
