"""JSON from outside a process (clients, Execute, CSV cells, peers, backups), parsed
under the two limits that keep everything Shoal accepts readable by every read path.

* **Nesting.** A document may hold at most ``max_depth`` levels of arrays and objects
  (``{}`` is one level, ``{"a": [1]}`` two, a scalar none). orjson parses up to 1,024
  levels but serializes only 254, and every read path serializes records again, some
  wrapped in a few more levels (a record state, an Execute log entry), so a record
  accepted deeper than that could be stored but never read back. Storage takes its
  limit from ``storage.maxNestingDepth`` (``DEFAULT_NESTING_DEPTH``), which cannot be
  set above ``MAX_NESTING_DEPTH``: that ceiling leaves ``READ_PATH_LEVELS`` levels for
  the deepest wrapping of a read path.
* **Integers.** Every integer must lie in the 64-bit range ``INT_MIN`` to ``INT_MAX``,
  which orjson reads and writes exactly. orjson reads a larger integer as the nearest
  double, so 2^64 and 2^64+1 would silently become the same number: such a document is
  refused (send the number as a string). Numeric primary keys have a narrower range,
  see ``services.storage.keys``.

Both checks cost a scan of the raw bytes in C; the slower exact checks run only when
that scan says the document might break a limit.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

SERIALIZABLE_DEPTH = 254  # orjson.dumps refuses anything deeper
READ_PATH_LEVELS = 54  # the levels read paths may wrap around a record, with room to spare
MAX_NESTING_DEPTH = SERIALIZABLE_DEPTH - READ_PATH_LEVELS  # 200
DEFAULT_NESTING_DEPTH = 64
MIN_NESTING_DEPTH = 8  # system tables (membership rows, certificates) need a few levels
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
_INT_DIGITS = len(str(INT_MAX))  # 20
# One pass over the text maps every digit to 0 and every { to [: then an object or array
# opens at each [, and an integer outside the 64-bit range (at least 19 digits, as
# -9223372036854775809) leaves a run of 19 zeros.
_SCAN = bytes.maketrans(b"123456789{", b"000000000[")
_LONG_NUMBER = b"0" * 19
_SHOWN_DIGITS = 40
STORAGE_LIMIT = "storage.maxNestingDepth"


class Refused(ValueError):
    """A JSON document Shoal does not accept; the message says why (callers prefix it
    with what the document was: "record 3: ...")."""


class NotJson(Refused):
    """The text is not JSON (or holds a number beyond the range of a double)."""


class TooDeep(Refused):
    """The document nests deeper than the limit."""


class OutOfRange(Refused):
    """The document holds an integer outside the 64-bit range."""


def loads(raw: bytes | str, max_depth: int, limit: str = STORAGE_LIMIT) -> Any:
    """Parse ``raw``; Refused when it is not JSON, nests deeper than ``max_depth``
    levels (the setting named ``limit``), or holds an integer outside the 64-bit range."""
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # deeper than orjson's own 1,024 levels
            raise TooDeep(too_deep(max_depth, limit)) from None
        if "infinity" in str(exc):  # an integer that long is out of range first
            _check_integers(data)
            raise NotJson("a number is too large for a double (above about 1.8e308)") from None
        raise NotJson(f"not valid JSON ({exc})") from None
    check_text(data, value, max_depth, limit)
    return value


def check_text(data: bytes, value: Any, max_depth: int, limit: str = STORAGE_LIMIT) -> None:
    """Both limits for ``value``, parsed from ``data`` by orjson (Refused when broken)."""
    scanned = data.translate(_SCAN)
    if scanned.count(b"[") > max_depth and depth_of(value, max_depth) > max_depth:
        raise TooDeep(too_deep(max_depth, limit))
    if _LONG_NUMBER in scanned:
        _check_integers(data)


def check_depth(value: Any, max_depth: int, limit: str = STORAGE_LIMIT) -> None:
    """The nesting limit for a value already parsed (Refused when deeper)."""
    if depth_of(value, max_depth) > max_depth:
        raise TooDeep(too_deep(max_depth, limit))


def too_deep(max_depth: int, limit: str = STORAGE_LIMIT) -> str:
    return f"nests arrays and objects more than {max_depth} levels deep ({limit})"


def depth_of(value: Any, stop: int | None = None) -> int:
    """Levels of arrays and objects in ``value`` (0 for a scalar); counting ends as soon
    as it passes ``stop``."""
    if type(value) is not dict and type(value) is not list:
        return 0
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > deepest:
            deepest = level
            if stop is not None and deepest > stop:
                return deepest
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, level + 1))
    return deepest


def _checked_integer(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) <= _INT_DIGITS:
        number = int(text)
        if INT_MIN <= number <= INT_MAX:
            return number
    shown = (
        text if len(text) <= _SHOWN_DIGITS else f"{text[:_SHOWN_DIGITS]}… ({len(digits)} digits)"
    )
    raise OutOfRange(
        f"the integer {shown} is outside the 64-bit range ({INT_MIN} to {INT_MAX}) that Shoal"
        " stores exactly; send it as a string"
    )


def _check_integers(data: bytes) -> None:
    """Refused when an integer literal of ``data`` (valid JSON) is outside the 64-bit
    range. orjson has already read those as doubles, so the text is read again, with
    every integer checked as it is met."""
    try:
        json.loads(data, parse_int=_checked_integer)
    except RecursionError:  # cannot happen after the nesting check; never a crash
        raise TooDeep("not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as exc:
        raise NotJson(f"not valid JSON ({exc})") from None
