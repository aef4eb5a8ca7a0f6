"""Typed attributes: Harper's attribute types and the check of a record's values.

A table may declare its attributes with types (``create_table`` with ``attributes:
[{name, type}]``). The node that accepts a client write checks each declared attribute's
value against its type and refuses the whole request (INVALID_ARGUMENT, reason
ATTRIBUTE_TYPE, Harper's message) before anything is written. Writes replicated from
peers are never checked: they were checked where they were accepted, and refusing them
here would stop replication.

Null is accepted for every type (Harper's attributes are nullable unless declared
otherwise). Values are JSON: a ``Date`` is a number (Unix milliseconds) or an ISO 8601
string, as Harper accepts them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import orjson

from services.common.errors import InvalidArgument

INT32 = 2**31
SAFE_INTEGER = 2**53


def _whole(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _date(value: Any) -> bool:
    if _number(value):
        return True
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


# Harper's type name -> (check, what the value must be, in Harper's words).
TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "String": (lambda v: isinstance(v, str), "a string"),
    "Int": (
        lambda v: _whole(v) and -INT32 <= v < INT32,
        f"an integer (from {-INT32} to {INT32 - 1})",
    ),
    "Long": (
        lambda v: _whole(v) and -SAFE_INTEGER <= v <= SAFE_INTEGER,
        f"an integer (from {-SAFE_INTEGER} to {SAFE_INTEGER})",
    ),
    "BigInt": (_whole, "an integer"),
    "Float": (_number, "a number"),
    "Number": (_number, "a number"),
    "Boolean": (lambda v: isinstance(v, bool), "a boolean"),
    "Date": (_date, "a Date"),
    "ID": (lambda v: isinstance(v, str) or _whole(v), "a string or an integer"),
    "Any": (lambda v: True, "any value"),
}
_BY_LOWER = {name.lower(): name for name in TYPES}


def type_name(given: str, attribute: str) -> str:
    """Harper's spelling of a declared type (any case; empty is Any); INVALID_ARGUMENT
    naming the known types otherwise."""
    if not given:
        return "Any"
    name = _BY_LOWER.get(given.lower())
    if name is None:
        raise InvalidArgument(
            f"attribute {attribute!r}: unknown type {given!r}; the types are {', '.join(TYPES)}"
        )
    return name


def accepts(declared: str, value: Any) -> bool:
    """Whether an attribute of the declared type may hold ``value``."""
    return TYPES[declared][0](value)


def _shown(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 200 else text[:200] + "…"


def problems(doc: Mapping[str, Any], types: Mapping[str, str]) -> list[str]:
    """Harper's message for each declared attribute of ``doc`` holding a value of the
    wrong type (empty: the record is valid)."""
    found = []
    for attribute, declared in types.items():
        value = doc.get(attribute)
        if value is None:
            continue
        check, expected = TYPES[declared]
        if not check(value):
            found.append(f"Value {_shown(value)} in property {attribute} must be {expected}")
    return found


def check(doc: Mapping[str, Any], types: Mapping[str, str]) -> None:
    """Refuse a record with a value of the wrong type (Harper's messages, joined)."""
    if not types:
        return
    found = problems(doc, types)
    if found:
        raise InvalidArgument(". ".join(found), reason="ATTRIBUTE_TYPE")
