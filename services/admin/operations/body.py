"""An operation's JSON body, read with Harper's field names and aliases, validated as read."""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf import timestamp_pb2
from shoal.storage.v1 import types_pb2

from services.common import jsoninput
from services.common.errors import InvalidArgument
from services.common.hlc import version_as_ms

Json = Any
MAX_CONFIRMATION = 2**31 - 1  # the typed field is an int32
MAX_UINT64 = 2**64 - 1  # counts (limit, offset) are uint64 fields
MAX_UINT32 = 2**32 - 1
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time a Timestamp holds
# Levels an operation may nest: its records are held to storage.maxNestingDepth by
# storage; the operation itself to the ceiling of that setting plus the few levels that
# hold a record in an operation (`{"records": [...]}`) or in an answer. Anything deeper
# could not be serialized again (services/common/jsoninput.py).
MAX_OPERATION_DEPTH = jsoninput.MAX_NESTING_DEPTH + 8


def shown_json(value: Any) -> str:
    """A JSON value for a message, cut short."""
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:40] + "…"


def harper_time(version: int) -> float:
    """A version as Harper shows times: Unix milliseconds, the counter as a fraction."""
    return version_as_ms(version) if version else 0.0


class Body:
    """An operation's fields, read with Harper's names and aliases, validated as read."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.operation = str(data.get("operation", ""))

    def value(self, *names: str) -> Any:
        """The first of these fields present, as sent (None: none is)."""
        for name in names:
            if name in self.data:
                return self.data[name]
        return None

    def text(self, *names: str, required: bool = True, default: str = "") -> str:
        value = self.value(*names)
        if value is None:
            if required:
                raise InvalidArgument(f"{self.operation}: '{names[0]}' is required")
            return default
        if not isinstance(value, str):
            raise InvalidArgument(f"{self.operation}: '{names[0]}' must be a string")
        return value

    def database(self) -> str:
        return self.text("database", "schema", required=False, default="data")

    def array(self, *names: str, required: bool = True) -> list[Any]:
        value = self.value(*names)
        if value is None:
            if required:
                raise InvalidArgument(f"{self.operation}: '{names[0]}' is required")
            return []
        if not isinstance(value, list):
            raise InvalidArgument(f"{self.operation}: '{names[0]}' must be an array")
        return value

    def number(self, *names: str, default: int = 0, maximum: int = MAX_UINT64) -> int:
        """A whole number from 0 to ``maximum`` (``2.0`` is 2; ``1.5`` is refused, not cut)."""
        value = self.value(*names)
        if value is None:
            return default
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not 0 <= value <= maximum:
            raise InvalidArgument(
                f"{self.operation}: '{names[0]}' must be a whole number from 0 to {maximum},"
                f" not {shown_json(value)}"
            )
        return int(value)

    def millis(self, value: Any, name: str) -> int:
        """``value`` as a time in Unix milliseconds (fractions are cut, as Harper's
        timestamps carry them), within what a protobuf Timestamp holds."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= MAX_MS
        ):
            raise InvalidArgument(
                f"{self.operation}: '{name}' must be a time in Unix milliseconds (0 to"
                f" {MAX_MS}), not {shown_json(value)}"
            )
        return int(value)

    def confirmation(self) -> int:
        """``replicated_confirmation``: a whole number of peers, 0 (the default) or more."""
        value = self.value("replicated_confirmation")
        if value is None:
            return 0
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or value < 0:
            raise InvalidArgument(
                f"{self.operation}: 'replicated_confirmation' must be a whole number of peers"
                f" (0 or more), not {orjson.dumps(value).decode()}"
            )
        if value > MAX_CONFIRMATION:
            raise InvalidArgument(
                f"{self.operation}: 'replicated_confirmation' {int(value)} is more peers than"
                " any cluster has"
            )
        return int(value)

    def replicate_to(self) -> types_pb2.ReplicateTo | None:
        """``replicateTo`` (or ``replicate_to``): how many nodes hold the records written
        first in full, or which (node names)."""
        value = self.value("replicateTo", "replicate_to")
        if value is None:
            return None
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return types_pb2.ReplicateTo(nodes=value)
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not 1 <= value <= MAX_CONFIRMATION:
            raise InvalidArgument(
                f"{self.operation}: 'replicateTo' must be a number of nodes (1 or more) or a"
                f" list of node names, not {orjson.dumps(value).decode()}"
            )
        return types_pb2.ReplicateTo(count=int(value))

    def flag(self, *names: str, default: bool) -> bool:
        value = self.value(*names)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidArgument(f"{self.operation}: '{names[0]}' must be true or false")
        return value

    def timestamp(self, *names: str) -> timestamp_pb2.Timestamp | None:
        value = self.value(*names)
        if value is None:
            return None
        ts = timestamp_pb2.Timestamp()
        ts.FromMilliseconds(self.millis(value, names[0]))
        return ts

    def names(self, *names: str, what: str) -> list[str]:
        """An optional array of strings (empty when absent)."""
        values = self.array(*names, required=False)
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"{self.operation}: '{names[0]}' must be an array of {what}")
        return list(values)


def nothing(body: Body) -> None:
    """The parser of an operation that reads no field."""
    return None


def whole(body: Body) -> Body:
    """The parser of an operation whose fields are checked against the node's state in
    between (this node's name, its backups folder): its handler reads the body itself, so
    a request with several faults reports the same one first as it always has."""
    return body
