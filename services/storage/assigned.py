"""Attributes storage assigns to a client's records, as Harper does: a generated primary
key for a record inserted without one, and the record timestamps ``__createdtime__`` and
``__updatedtime__`` of tables that carry them.

Both are assigned on the node that accepts the write, before it is logged, so they
replicate as any attribute does and every node holds the same values. The record's JSON
is extended in place when it can be (the hot path stores the client's JSON as it came),
and written again otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from services.common import jsonbytes
from services.storage.schema import CREATED_TIME, UPDATED_TIME, Table


def generated_key() -> str:
    """A new primary key: a random UUID string, as Harper generates them."""
    return str(uuid.uuid4())


def extended(doc: dict[str, Any], raw: bytes, values: Mapping[str, Any]) -> bytes:
    """``raw`` (the JSON of ``doc``) with ``values`` set; ``doc`` is updated too."""
    replaced = any(name in doc for name in values)
    empty = not doc
    doc.update(values)
    body = raw.rstrip()
    if replaced or empty or not body.endswith(b"}"):
        return jsonbytes.dumps(doc)
    added = b",".join(orjson.dumps(name) + b":" + orjson.dumps(v) for name, v in values.items())
    return body[:-1] + b"," + added + b"}"


def timestamps(table: Table, created: bool, now_ms: int) -> dict[str, int]:
    """The timestamps a write sets: both for a record written for the first time (or
    again after its deletion), ``__updatedtime__`` for a change; none when the table
    has no timestamps."""
    if not table.timestamps:
        return {}
    if created:
        return {CREATED_TIME: now_ms, UPDATED_TIME: now_ms}
    return {UPDATED_TIME: now_ms}
