"""The JSON limits: nesting and 64-bit integers, exact both ways."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import jsoninput
from services.common.jsoninput import INT_MAX, INT_MIN, MAX_NESTING_DEPTH, SERIALIZABLE_DEPTH

SETTINGS = settings(max_examples=300, deadline=None)
integers = st.integers(-(2**70), 2**70) | st.sampled_from(
    [INT_MIN, INT_MIN - 1, INT_MAX, INT_MAX + 1, 2**63, 2**53 + 1, 10**30]
)
scalars = (
    st.none()
    | st.booleans()
    | integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='0123456789ab"\\{[', max_size=30)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def fits(value: Any) -> bool:
    if isinstance(value, dict):
        return all(map(fits, value.values()))
    if isinstance(value, list):
        return all(map(fits, value))
    return not isinstance(value, int) or isinstance(value, bool) or INT_MIN <= value <= INT_MAX


def wrapped(value: Any, levels: int) -> Any:
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


@SETTINGS
@given(values, st.integers(0, 8), st.integers(1, 12))
def test_accepted_exactly_when_within_both_limits(value: Any, extra: int, limit: int) -> None:
    value = wrapped(value, extra)
    text = json.dumps(value)
    within = depth(value) <= limit and fits(value)
    try:
        parsed = jsoninput.loads(text.encode(), limit)
    except jsoninput.TooDeep:
        assert depth(value) > limit
        return
    except jsoninput.OutOfRange:
        assert not fits(value) and depth(value) <= limit
        return
    assert within
    assert parsed == value
    assert orjson.loads(orjson.dumps(parsed)) == value  # and it can be written again


def test_depth_counts_arrays_and_objects() -> None:
    assert jsoninput.depth_of(1) == 0
    assert jsoninput.depth_of({}) == 1
    assert jsoninput.depth_of({"a": [1]}) == 2
    assert jsoninput.depth_of([[], [[{}]]]) == 4
    assert jsoninput.depth_of(wrapped(1, 500), stop=10) == 11  # stops counting past 10


@pytest.mark.parametrize(
    "text",
    [
        b'"12345678901234567890123"',  # digits in a string
        b"1.2345678901234567890123",  # a fraction
        b"1e0000000000000000000001",  # an exponent
        b'{"1234567890123456789012": 1}',  # a key
        b"18446744073709551615",
        b"-9223372036854775808",
    ],
)
def test_long_digit_runs_that_are_not_big_integers_are_accepted(text: bytes) -> None:
    assert jsoninput.loads(text, 4) == orjson.loads(text)


@pytest.mark.parametrize(
    ("text", "refusal", "words"),
    [
        (b"18446744073709551616", jsoninput.OutOfRange, "64-bit range"),
        (b"[-9223372036854775809]", jsoninput.OutOfRange, "send it as a string"),
        (b"1" + b"0" * 5000, jsoninput.OutOfRange, "5001 digits"),
        (b"[1e400]", jsoninput.NotJson, "too large for a double"),
        (b"{", jsoninput.NotJson, "not valid JSON"),
        (b"NaN", jsoninput.NotJson, "not valid JSON"),
        (b'"\\ud800"', jsoninput.NotJson, "not valid JSON"),
        (b"[" * 2000 + b"]" * 2000, jsoninput.TooDeep, "more than 4 levels"),
        (b"[[[[[1]]]]]", jsoninput.TooDeep, "storage.maxNestingDepth"),
    ],
)
def test_refusals_say_why(text: bytes, refusal: type[jsoninput.Refused], words: str) -> None:
    with pytest.raises(refusal) as caught:
        jsoninput.loads(text, 4)
    assert words in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_long_integer_is_shown_cut() -> None:
    with pytest.raises(jsoninput.OutOfRange) as caught:
        jsoninput.loads(b"9" * 4000, 4)
    assert "(4000 digits)" in str(caught.value) and len(str(caught.value)) < 300


def test_the_ceiling_leaves_room_for_every_read_path() -> None:
    # The deepest wrapping of a read path (an Execute audit entry by id: object, array,
    # entry, records array, then the record) stays within what can be serialized.
    record = wrapped(1, MAX_NESTING_DEPTH)
    answer = {"k": [{"records": [record]}]}
    assert depth(answer) <= SERIALIZABLE_DEPTH
    orjson.dumps(answer)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps(wrapped(1, SERIALIZABLE_DEPTH + 1))
