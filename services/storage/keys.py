"""Byte encodings of keys, in an order RocksDB's bytewise comparator preserves.

Values (primary keys and indexed attribute values) are encoded with a type tag first,
so values of different JSON types sort null < false < true < numbers < strings:

    0x01                      null
    0x02                      false
    0x03                      true
    0x04 + 8 bytes            number: IEEE-754 double, sign-flipped so bytes sort like numbers
    0x05 + escaped UTF-8 + 00 01
                              string: 0x00 inside is written 00 FF, so the 00 01 terminator
                              is unambiguous and "a" sorts before "ab"

Every encoding is self-delimiting, so a key can append further parts after it.

Column-family key layouts (``tid`` = 4-byte big-endian table id, local to the node):

    data     tid + enc(pk)                               -> record state (see merge.py)
    index    tid + attribute + 00 + enc(value) + enc(pk) -> empty
    tomb     version(8) + tid + enc(pk)                  -> empty (tombstones by age)
    log      local_time(8)                               -> Transaction (protobuf)
    logidx   database + 00 + origin + 00 + version(8)    -> local_time(8)
    logkey   database + 00 + table + 00 + enc(pk) + local_time(8) -> empty (audit by key)
"""

from __future__ import annotations

import math
import struct
from typing import Any

TAG_NULL = 0x01
TAG_FALSE = 0x02
TAG_TRUE = 0x03
TAG_NUMBER = 0x04
TAG_STRING = 0x05

MAX_SAFE_INTEGER = 2**53
_DOUBLE = struct.Struct(">d")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_SIGN = 1 << 63
_MASK = (1 << 64) - 1


class InvalidKey(ValueError):
    """A value cannot be used as a primary key."""


def _encode_number(value: float) -> bytes:
    raw = _DOUBLE.pack(value)
    if raw[0] < 0x80:  # positive: set the sign bit
        return bytes((TAG_NUMBER, raw[0] | 0x80)) + raw[1:]
    if value == 0:  # -0.0 is the same key as 0
        return b"\x04\x80\x00\x00\x00\x00\x00\x00\x00"
    return b"\x04" + (int.from_bytes(raw, "big") ^ _MASK).to_bytes(8, "big")


def _decode_number(data: bytes, offset: int) -> float:
    bits = _U64.unpack_from(data, offset)[0]
    bits = (bits ^ _SIGN) if bits & _SIGN else (bits ^ _MASK)
    return float(_DOUBLE.unpack(_U64.pack(bits))[0])


def encode_value(value: Any) -> bytes:
    """Order-preserving encoding of a JSON scalar (objects and arrays are not encodable)."""
    kind = type(value)
    if kind is int:
        return _encode_number(float(value))
    if isinstance(value, str):
        return b"\x05" + value.encode("utf-8").replace(b"\x00", b"\x00\xff") + b"\x00\x01"
    if value is True:
        return b"\x03"
    if value is False:
        return b"\x02"
    if value is None:
        return b"\x01"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidKey("numbers must be finite")
        return _encode_number(float(value))
    raise InvalidKey(f"a {type(value).__name__} cannot be encoded as a key")


def encode_key(value: Any) -> bytes:
    """Encoding of a primary key: a string, or a number within ±2^53.

    Keys hold numbers as doubles, and within ±2^53 every integer is a distinct double;
    beyond it neighbouring integers share one (2^53 + 1 would be the key 2^53), so larger
    numbers, integers or not, are refused rather than merged with another key."""
    if type(value) is int and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return _encode_number(float(value))
    if isinstance(value, str):
        if not value:
            raise InvalidKey("a primary key must not be an empty string")
        return b"\x05" + value.encode("utf-8").replace(b"\x00", b"\x00\xff") + b"\x00\x01"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidKey("a primary key must be a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidKey("a numeric primary key must be finite")
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise InvalidKey(
            "a numeric primary key must be within ±2^53 (9007199254740992), where every"
            " integer is exact; use a string for larger ids"
        )
    return _encode_number(float(value))


def decode_value(data: bytes, offset: int = 0) -> tuple[Any, int]:
    """Decode one value at ``offset``; returns (value, offset after it)."""
    tag = data[offset]
    if tag == TAG_STRING:
        end = offset + 1
        out = bytearray()
        while True:
            zero = data.index(b"\x00", end)
            out += data[end:zero]
            marker = data[zero + 1]
            if marker == 0x01:
                return out.decode("utf-8"), zero + 2
            out += b"\x00"  # escaped 00 FF
            end = zero + 2
    if tag == TAG_NUMBER:
        number = _decode_number(data, offset + 1)
        if number.is_integer() and abs(number) <= MAX_SAFE_INTEGER:
            return int(number), offset + 9
        return number, offset + 9
    if tag == TAG_NULL:
        return None, offset + 1
    if tag == TAG_TRUE:
        return True, offset + 1
    if tag == TAG_FALSE:
        return False, offset + 1
    raise ValueError(f"unknown key tag {tag:#x}")


def skip_value(data: bytes, offset: int) -> int:
    """Offset just after the encoded value at ``offset``."""
    tag = data[offset]
    if tag == TAG_STRING:
        end = offset + 1
        while True:
            zero = data.index(b"\x00", end)
            if data[zero + 1] == 0x01:
                return zero + 2
            end = zero + 2
    if tag == TAG_NUMBER:
        return offset + 9
    return offset + 1


def string_prefix(prefix: str) -> bytes:
    """Encoded prefix shared by every string value that starts with ``prefix``."""
    return b"\x05" + prefix.encode("utf-8").replace(b"\x00", b"\x00\xff")


def table_prefix(table_id: int) -> bytes:
    """Prefix of a table's rows in the data CF (and of its index entries)."""
    return _U32.pack(table_id)


def data_key(table_id: int, encoded_pk: bytes) -> bytes:
    """Key of a record in the data CF."""
    return _U32.pack(table_id) + encoded_pk


def index_prefix(table_id: int, attribute: str) -> bytes:
    """Prefix of one attribute's entries in the index CF."""
    return _U32.pack(table_id) + attribute.encode("utf-8") + b"\x00"


def audit_prefix(database: str, table: str) -> bytes:
    """Prefix of one table's entries in the logkey CF (append enc(pk) + local_time)."""
    return database.encode() + b"\x00" + table.encode() + b"\x00"


def u64(value: int) -> bytes:
    """Big-endian 8-byte unsigned integer."""
    return _U64.pack(value)


def read_u64(data: bytes, offset: int = 0) -> int:
    """Read a big-endian 8-byte unsigned integer."""
    return int(_U64.unpack_from(data, offset)[0])


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no bound)."""
    data = bytearray(prefix)
    while data:
        if data[-1] != 0xFF:
            data[-1] += 1
            return bytes(data)
        data.pop()
    return None
