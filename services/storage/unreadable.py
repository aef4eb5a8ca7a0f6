"""Records a read meets but cannot return, so that one of them does not fail the read.

Older code accepted records nested deeper than JSON output allows (orjson parses 1,024
levels but writes 254; ``storage.maxNestingDepth`` now refuses them on the way in). Such
a record is stored, and replicated, but cannot be serialized into a response; a state
that does not decode is as unreadable. A read (by id, by value, by conditions) skips
each one, returns every other record, and then ends with DATA_LOSS (reason
``UNREADABLE_RECORDS``) naming their ids, so one bad record never hides a whole table
and the operator learns which ids to delete or rewrite.
"""

from __future__ import annotations

from typing import Any

import orjson

from services.common import jsonbytes
from services.common.errors import DataLoss
from services.storage import keys
from services.storage.schema import Table

MAX_NAMED = 100  # ids named in the error's details (the count says how many in all)
MAX_IDS_BYTES = 1536  # ... and at most this much of their JSON
MAX_IN_MESSAGE = 10


class Unreadable:
    """The unreadable records one read met, in the order met."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.ids: list[Any] = []
        self.count = 0

    def add(self, pk: Any) -> None:
        self.count += 1
        if len(self.ids) < MAX_NAMED:
            self.ids.append(pk)

    def add_key(self, encoded: bytes) -> None:
        """An unreadable record known by its encoded primary key."""
        self.add(keys.decode_value(encoded)[0])

    def render(self, doc: dict[str, Any]) -> bytes | None:
        """``doc`` as JSON, or None (and noted) when it cannot be serialized."""
        try:
            return jsonbytes.dumps(doc)
        except orjson.JSONEncodeError:
            self.add(doc.get(self.table.primary_key))
            return None

    def check(self) -> None:
        """DATA_LOSS naming the unreadable records, once the read returned the rest."""
        if not self.count:
            return
        table = f"{self.table.database}.{self.table.name}"
        named = ", ".join(_short(pk) for pk in self.ids[:MAX_IN_MESSAGE])
        more = f" and {self.count - MAX_IN_MESSAGE} more" if self.count > MAX_IN_MESSAGE else ""
        raise DataLoss(
            f"{self.count} record(s) of {table} cannot be read (ids {named}{more}): they nest"
            " arrays and objects deeper than JSON output allows, stored before"
            " storage.maxNestingDepth existed, or their stored state is damaged. Every other"
            " record was returned; delete or rewrite these ids",
            reason="UNREADABLE_RECORDS",
            metadata={"table": table, "count": str(self.count), "ids": _ids_json(self.ids)},
        )


def _ids_json(ids: list[Any]) -> str:
    """A JSON array of the first ids, at most MAX_IDS_BYTES long."""
    parts: list[bytes] = []
    size = 2
    for pk in ids:
        part = orjson.dumps(pk)
        size += len(part) + 1
        if size > MAX_IDS_BYTES:
            break
        parts.append(part)
    return (b"[" + b",".join(parts) + b"]").decode()


def _short(pk: Any) -> str:
    text = orjson.dumps(pk).decode()
    return text if len(text) <= 40 else text[:40] + "…"
