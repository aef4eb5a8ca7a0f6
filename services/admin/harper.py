"""Harper's JSON operations API, over the Execute RPC.

Each operation is a handler `(Execute, Body) -> JSON-able` registered in `OPERATIONS`.
Field names are Harper's, including its older aliases (`schema` for `database`,
`hash_attribute` for `primary_key`, `hash_values` for `ids`, `search_attribute` /
`search_value` for `attribute` / `value`). Handlers call the same code as the typed RPCs
(cluster.py, storage's RPCs), and failures become `{"error": "..."}` with the gRPC code
the typed path would have returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
from google.protobuf import timestamp_pb2
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.admin import analytics as history
from services.admin import clusterwide, csvload, shards
from services.admin.backup import Backups
from services.admin.backup_archive import ArchiveReader
from services.admin.budget import Reservation
from services.admin.certificates import Certificates, NewCertificate
from services.admin.cluster import Cluster
from services.admin.configuration import settings_from
from services.admin.exchange import Exchange, JoinRequest, authorization_header
from services.admin.node import CALL_TIMEOUT_S, AdminNode, Caller
from services.admin.nodes import (
    Nodes,
    Row,
    start_time_text,
    validated_row,
)
from services.common import jsonbytes, jsoninput, sysinfo
from services.common.analytics import AGGREGATE_PERIOD_MS, MAX_TIME_MS
from services.common.config import Route, parse_route_url, parse_time
from services.common.errors import (
    DataLoss,
    InvalidArgument,
    ResourceExhausted,
    ShoalError,
    from_rpc_error,
)
from services.common.hlc import version_as_ms
from services.common.routes import to_yaml

Json = Any
FORWARD_MARGIN_S = 0.25  # at most this much of an Execute deadline is kept to answer
RECORDS_ANSWER_FACTOR = 4  # memory per byte of records passed through to the answer
PARSED_ANSWER_FACTOR = 24  # ...of log entries parsed into objects (measured: up to ~20)
MAX_CONFIRMATION = 2**31 - 1  # the typed field is an int32
MAX_UINT64 = 2**64 - 1  # counts (limit, offset) are uint64 fields
MAX_UINT32 = 2**32 - 1
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time a Timestamp holds
# Levels an operation may nest: its records are held to storage.maxNestingDepth by
# storage; the operation itself to the ceiling of that setting plus the few levels that
# hold a record in an operation (`{"records": [...]}`) or in an answer. Anything deeper
# could not be serialized again (services/common/jsoninput.py).
MAX_OPERATION_DEPTH = jsoninput.MAX_NESTING_DEPTH + 8
Handler = Callable[["Execute", "Body"], Awaitable[Json]]

_OPERATIONS_ENUM = {
    types_pb2.OPERATION_INSERT: "insert",
    types_pb2.OPERATION_UPDATE: "update",
    types_pb2.OPERATION_UPSERT: "upsert",
    types_pb2.OPERATION_DELETE: "delete",
}
_COMPARATORS = {
    name.removeprefix("COMPARATOR_").lower(): value
    for name, value in spb.Comparator.items()
    if value != spb.COMPARATOR_UNSPECIFIED
}
_COMPARATORS.update(
    {
        "equal": spb.COMPARATOR_EQUALS,
        "greater_than_or_equal": spb.COMPARATOR_GREATER_THAN_EQUAL,
        "less_than_or_equal": spb.COMPARATOR_LESS_THAN_EQUAL,
    }
)


def _shown_json(value: Any) -> str:
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

    def _get(self, names: tuple[str, ...]) -> Any:
        for name in names:
            if name in self.data:
                return self.data[name]
        return None

    def text(self, *names: str, required: bool = True, default: str = "") -> str:
        value = self._get(names)
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
        value = self._get(names)
        if value is None:
            if required:
                raise InvalidArgument(f"{self.operation}: '{names[0]}' is required")
            return []
        if not isinstance(value, list):
            raise InvalidArgument(f"{self.operation}: '{names[0]}' must be an array")
        return value

    def number(self, *names: str, default: int = 0, maximum: int = MAX_UINT64) -> int:
        """A whole number from 0 to ``maximum`` (``2.0`` is 2; ``1.5`` is refused, not cut)."""
        value = self._get(names)
        if value is None:
            return default
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not 0 <= value <= maximum:
            raise InvalidArgument(
                f"{self.operation}: '{names[0]}' must be a whole number from 0 to {maximum},"
                f" not {_shown_json(value)}"
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
                f" {MAX_MS}), not {_shown_json(value)}"
            )
        return int(value)

    def confirmation(self) -> int:
        """``replicated_confirmation``: a whole number of peers, 0 (the default) or more."""
        value = self._get(("replicated_confirmation",))
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
        value = self._get(("replicateTo", "replicate_to"))
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
        value = self._get(names)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidArgument(f"{self.operation}: '{names[0]}' must be true or false")
        return value

    def timestamp(self, *names: str) -> timestamp_pb2.Timestamp | None:
        value = self._get(names)
        if value is None:
            return None
        ts = timestamp_pb2.Timestamp()
        ts.FromMilliseconds(self.millis(value, names[0]))
        return ts


def deadline_of(time_remaining: float | None) -> float | None:
    """The monotonic time an Execute call must have answered by (None: no deadline)."""
    return None if time_remaining is None else time.monotonic() + time_remaining


@dataclass
class Execute:
    """One Execute call: the node, the caller, and the cluster operations."""

    node: AdminNode
    caller: Caller
    cluster: Cluster
    nodes: Nodes
    certificates: Certificates
    exchange: Exchange
    deadline: float | None = None  # monotonic; the Execute call's own deadline
    reservation: Reservation | None = None  # its memory budget (budget.py), grown by answers

    def _timeout(self) -> float:
        """A storage call's timeout: the Execute call's time left, less a margin so that
        storage's answer (e.g. a write confirmation's DEADLINE_EXCEEDED, which storage
        gives shortly before its own deadline) comes back in time."""
        if self.deadline is None:
            return CALL_TIMEOUT_S
        left = self.deadline - time.monotonic()
        return max(0.01, min(CALL_TIMEOUT_S, left - min(FORWARD_MARGIN_S, left / 10)))

    async def storage(self, method: str, request: Any) -> Any:
        """A unary storage call with the caller's credentials (storage checks the role)."""
        return await self.node.call(
            getattr(self.node.storage, method),
            request,
            self.caller.metadata,
            deadline_s=self._timeout(),
        )

    async def storage_stream(self, method: str, request: Any, parsed: bool = False) -> list[Any]:
        """Every message of a streaming storage call, with the caller's credentials, up
        to what one Execute answer can carry (``storage.maxMessageBytes``): beyond it,
        RESOURCE_EXHAUSTED. Each message grows the call's memory reservation by its size
        times what it becomes here (``parsed``: JSON parsed into objects; else records
        passed through as they are)."""
        factor = PARSED_ANSWER_FACTOR if parsed else RECORDS_ANSWER_FACTOR
        limit = self.node.config.storage.max_message_bytes
        call = getattr(self.node.storage, method)(
            request, metadata=self.caller.metadata, timeout=CALL_TIMEOUT_S
        )
        chunks: list[Any] = []
        total = 0
        try:
            async for chunk in call:
                size = chunk.ByteSize()
                total += size
                if total > limit:
                    raise ResourceExhausted(
                        f"the answer is larger than the {limit} bytes an Execute answer"
                        " carries (storage.maxMessageBytes): ask for less at a time (limit"
                        " and offset, get_attributes), or use the typed streaming RPC",
                        reason="ANSWER_TOO_LARGE",
                    )
                if self.reservation is not None:
                    self.reservation.grow(factor * size, "this answer")
                chunks.append(chunk)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "storage") from exc
        finally:
            call.cancel()
        return chunks


async def run(execute: Execute, raw: bytes) -> tuple[Json, int]:
    """Run one JSON operation; returns (Harper response or {"error": ...}, gRPC code)."""
    try:
        data = jsoninput.loads(raw, MAX_OPERATION_DEPTH, "the limit of an operation")
    except jsoninput.Refused as exc:
        return {"error": f"the operation is refused: {exc}"}, InvalidArgument.code.value[0]
    if not isinstance(data, dict):
        return {"error": "the operation must be a JSON object"}, InvalidArgument.code.value[0]
    body = Body(data)
    handler = OPERATIONS.get(body.operation)
    if handler is None:
        known = ", ".join(sorted(OPERATIONS))
        message = (
            f"unknown operation {body.operation!r}" if body.operation else "'operation' is required"
        )
        return {"error": f"{message}; known operations: {known}"}, InvalidArgument.code.value[0]
    try:
        return await handler(execute, body), 0
    except ShoalError as exc:
        return {"error": exc.message}, exc.code.value[0]


def answer(result: Json, code: int) -> apb.ExecuteResponse:
    """An operation's answer, as JSON. A record stored before storage.maxNestingDepth
    existed may nest deeper than JSON output allows (a log entry holding one): the
    answer is then an error naming the cause (DATA_LOSS), never a failed call."""
    try:
        return apb.ExecuteResponse(result=orjson.dumps(result), code=code)
    except orjson.JSONEncodeError as exc:
        error = (
            f"the answer cannot be written as JSON ({exc}): it holds a record nested deeper"
            " than JSON output allows, stored before storage.maxNestingDepth existed; read"
            " the records one by one and delete or rewrite that one"
        )
        return apb.ExecuteResponse(
            result=orjson.dumps({"error": error}), code=DataLoss.code.value[0]
        )


# -- data and schema (delegated to storage) ------------------------------------------------


def _records(body: Body) -> list[bytes]:
    records = body.array("records")
    if not all(isinstance(r, dict) for r in records):
        raise InvalidArgument(f"{body.operation}: every record must be a JSON object")
    return [jsonbytes.dumps(r) for r in records]


def _ids(body: Body) -> list[bytes]:
    return [jsonbytes.dumps(v) for v in body.array("ids", "hash_values")]


def _loads(values: Any) -> list[Any]:
    return [orjson.loads(v) for v in values]


async def insert(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "Insert",
        spb.InsertRequest(
            database=body.database(),
            table=body.text("table"),
            records=_records(body),
            replicated_confirmation=body.confirmation(),
            replicate_to=body.replicate_to(),
        ),
    )
    total = len(reply.inserted_ids) + len(reply.skipped_ids)
    return {
        "message": f"inserted {len(reply.inserted_ids)} of {total} records",
        "inserted_hashes": _loads(reply.inserted_ids),
        "skipped_hashes": _loads(reply.skipped_ids),
    }


async def update(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "Update",
        spb.UpdateRequest(
            database=body.database(),
            table=body.text("table"),
            records=_records(body),
            replicated_confirmation=body.confirmation(),
            replicate_to=body.replicate_to(),
        ),
    )
    total = len(reply.updated_ids) + len(reply.skipped_ids)
    return {
        "message": f"updated {len(reply.updated_ids)} of {total} records",
        "update_hashes": _loads(reply.updated_ids),
        "skipped_hashes": _loads(reply.skipped_ids),
    }


async def upsert(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "Upsert",
        spb.UpsertRequest(
            database=body.database(),
            table=body.text("table"),
            records=_records(body),
            replicated_confirmation=body.confirmation(),
            replicate_to=body.replicate_to(),
        ),
    )
    return {
        "message": f"upserted {len(reply.upserted_ids)} of {len(reply.upserted_ids)} records",
        "upserted_hashes": _loads(reply.upserted_ids),
    }


async def delete(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "Delete",
        spb.DeleteRequest(
            database=body.database(),
            table=body.text("table"),
            ids=_ids(body),
            replicated_confirmation=body.confirmation(),
            replicate_to=body.replicate_to(),
        ),
    )
    total = len(reply.deleted_ids) + len(reply.skipped_ids)
    return {
        "message": f"{len(reply.deleted_ids)} of {total} records successfully deleted",
        "deleted_hashes": _loads(reply.deleted_ids),
        "skipped_hashes": _loads(reply.skipped_ids),
    }


def _attributes(body: Body) -> list[str]:
    values = body.array("get_attributes", required=False)
    if not all(isinstance(v, str) for v in values):
        raise InvalidArgument(f"{body.operation}: 'get_attributes' must be an array of names")
    return list(values)


def _chunks_records(chunks: list[Any]) -> list[Json]:
    """Records as storage sent them, passed into the answer without parsing them."""
    return [orjson.Fragment(r) for c in chunks for r in c.records]


async def search_by_id(ex: Execute, body: Body) -> Json:
    request = spb.SearchByIdRequest(
        database=body.database(),
        table=body.text("table"),
        ids=_ids(body),
        get_attributes=_attributes(body),
    )
    return _chunks_records(await ex.storage_stream("SearchById", request))


def _sort(body: Body) -> list[spb.SortKey]:
    sort = body._get(("sort",))
    keys: list[spb.SortKey] = []
    while sort is not None:
        if not isinstance(sort, dict) or not isinstance(sort.get("attribute"), str):
            raise InvalidArgument(
                f"{body.operation}: 'sort' must be {{attribute, descending, next}}"
            )
        keys.append(
            spb.SortKey(attribute=sort["attribute"], descending=bool(sort.get("descending", False)))
        )
        sort = sort.get("next")
    return keys


async def search_by_value(ex: Execute, body: Body) -> Json:
    value = body._get(("value", "search_value"))
    if value is None:
        raise InvalidArgument("search_by_value: 'value' is required")
    request = spb.SearchByValueRequest(
        database=body.database(),
        table=body.text("table"),
        attribute=body.text("attribute", "search_attribute"),
        value=orjson.dumps(value),
        get_attributes=_attributes(body),
        limit=body.number("limit"),
        offset=body.number("offset"),
        sort=_sort(body),
    )
    return _chunks_records(await ex.storage_stream("SearchByValue", request))


def _operator(value: Any, operation: str) -> spb.LogicalOperator.ValueType:
    if value is None or value == "and":
        return spb.LOGICAL_OPERATOR_AND
    if value == "or":
        return spb.LOGICAL_OPERATOR_OR
    raise InvalidArgument(f"{operation}: 'operator' must be 'and' or 'or'")


def _conditions(items: Any, operation: str, depth: int = 0) -> list[spb.Condition]:
    if not isinstance(items, list):
        raise InvalidArgument(f"{operation}: 'conditions' must be an array")
    out: list[spb.Condition] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidArgument(f"{operation}: condition {i} must be an object")
        if "conditions" in item:
            out.append(
                spb.Condition(
                    group=spb.ConditionGroup(
                        operator=_operator(item.get("operator"), operation),
                        conditions=_conditions(item["conditions"], operation, depth + 1),
                    )
                )
            )
            continue
        attribute = item.get("attribute", item.get("search_attribute"))
        comparator = item.get("comparator", item.get("search_type"))
        if not isinstance(attribute, str) or comparator not in _COMPARATORS:
            raise InvalidArgument(
                f"{operation}: condition {i} needs an attribute and a comparator"
                f" ({', '.join(sorted(_COMPARATORS))})"
            )
        value = item.get("value", item.get("search_value"))
        out.append(
            spb.Condition(
                comparison=spb.Comparison(
                    attribute=attribute,
                    comparator=_COMPARATORS[comparator],
                    value=orjson.dumps(value),
                )
            )
        )
    return out


async def search_by_conditions(ex: Execute, body: Body) -> Json:
    request = spb.SearchByConditionsRequest(
        database=body.database(),
        table=body.text("table"),
        operator=_operator(body._get(("operator",)), body.operation),
        conditions=_conditions(body.array("conditions"), body.operation),
        get_attributes=_attributes(body),
        limit=body.number("limit"),
        offset=body.number("offset"),
        sort=_sort(body),
    )
    return _chunks_records(await ex.storage_stream("SearchByConditions", request))


def _table_json(table: spb.TableInfo) -> Json:
    return {
        "name": table.name,
        "schema": table.database,
        "database": table.database,
        "hash_attribute": table.primary_key,
        "attributes": [{"attribute": a.name, "indexed": a.indexed} for a in table.attributes],
        "record_count": table.record_count,
        "replicate": table.replicate,
    }


async def describe_all(ex: Execute, body: Body) -> Json:
    reply = await ex.storage("DescribeAll", spb.DescribeAllRequest())
    return {db.name: {t.name: _table_json(t) for t in db.tables} for db in reply.databases}


async def describe_database(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "DescribeDatabase", spb.DescribeDatabaseRequest(database=body.database())
    )
    return {t.name: _table_json(t) for t in reply.database.tables}


async def describe_table(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "DescribeTable",
        spb.DescribeTableRequest(database=body.database(), table=body.text("table")),
    )
    return _table_json(reply.table)


def _replicated(ex: Execute, body: Body) -> bool:
    """The operation's ``replicated`` flag (read before anything changes); cluster-wide
    operations need a super user."""
    replicated = body.flag("replicated", default=False)
    if replicated:
        ex.caller.require_super_user(f"{body.operation} with 'replicated'")
    return replicated


async def _on_members(ex: Execute, body: Body, result: dict[str, Any]) -> Json:
    """``result`` plus, in ``replicated``, each member's outcome of the same operation."""
    names = await clusterwide.members(ex.nodes, ex.cluster)
    metadata = ex.caller.member_metadata(f"{body.operation} with 'replicated'")
    results = await clusterwide.fan_out(ex.node, names, body.data, metadata)
    return {**result, "replicated": [r.json() for r in results]}


async def create_database(ex: Execute, body: Body) -> Json:
    replicated = _replicated(ex, body)
    name = body.text("database", "schema")
    await ex.storage("CreateDatabase", spb.CreateDatabaseRequest(database=name))
    result = {"message": f"database '{name}' successfully created"}
    return await _on_members(ex, body, result) if replicated else result


async def drop_database(ex: Execute, body: Body) -> Json:
    replicated = _replicated(ex, body)
    name = body.text("database", "schema")
    await ex.storage("DropDatabase", spb.DropDatabaseRequest(database=name))
    result = {"message": f"successfully deleted database '{name}'"}
    return await _on_members(ex, body, result) if replicated else result


async def create_table(ex: Execute, body: Body) -> Json:
    database, table = body.database(), body.text("table")
    indexed = [
        a["name"] if isinstance(a, dict) else a
        for a in body.array("attributes", required=False)
        if (isinstance(a, dict) and a.get("indexed")) or isinstance(a, str)
    ]
    request = spb.CreateTableRequest(
        database=database,
        table=table,
        primary_key=body.text("primary_key", "hash_attribute", required=False, default="id"),
        indexed_attributes=[i for i in indexed if isinstance(i, str)],
    )
    if "replicate" in body.data:
        request.replicate = body.flag("replicate", default=True)
    await ex.storage("CreateTable", request)
    return {"message": f"table '{database}.{table}' successfully created."}


async def drop_table(ex: Execute, body: Body) -> Json:
    replicated = _replicated(ex, body)
    database, table = body.database(), body.text("table")
    await ex.storage("DropTable", spb.DropTableRequest(database=database, table=table))
    result = {"message": f"successfully deleted table '{database}.{table}'"}
    return await _on_members(ex, body, result) if replicated else result


async def create_attribute(ex: Execute, body: Body) -> Json:
    database, table, attribute = body.database(), body.text("table"), body.text("attribute")
    await ex.storage(
        "CreateAttribute",
        spb.CreateAttributeRequest(
            database=database,
            table=table,
            attribute=attribute,
            indexed=body.flag("indexed", default=False),
        ),
    )
    return {"message": f"attribute '{database}.{table}.{attribute}' successfully created."}


async def drop_attribute(ex: Execute, body: Body) -> Json:
    replicated = _replicated(ex, body)
    database, table, attribute = body.database(), body.text("table"), body.text("attribute")
    await ex.storage(
        "DropAttribute",
        spb.DropAttributeRequest(database=database, table=table, attribute=attribute),
    )
    result = {"message": f"successfully deleted attribute '{attribute}'"}
    return await _on_members(ex, body, result) if replicated else result


# -- logs ------------------------------------------------------------------------------------


def _log_entry(txn: types_pb2.Transaction) -> Json:
    operations = {_OPERATIONS_ENUM.get(w.operation, "write") for w in txn.writes}
    return {
        "operation": operations.pop() if len(operations) == 1 else "transaction",
        "user_name": txn.user,
        "timestamp": harper_time(txn.version),
        "origin": txn.origin,
        "version": txn.version,
        "hash_values": [orjson.loads(w.id) for w in txn.writes],
        "records": [orjson.loads(w.value) if w.value else None for w in txn.writes],
        "original_records": [orjson.loads(w.prior) if w.prior else None for w in txn.writes],
    } | (
        {"reverts": {"origin": txn.reverts.origin, "version": txn.reverts.version}}
        if txn.HasField("reverts")
        else {}
    )


async def read_transaction_log(ex: Execute, body: Body) -> Json:
    request = spb.ReadTransactionLogRequest(
        database=body.database(),
        table=body.text("table", required=False),
        limit=body.number("limit"),
    )
    if (start := body.timestamp("from")) is not None:
        request.start_time.CopyFrom(start)
    if (end := body.timestamp("to")) is not None:
        request.end_time.CopyFrom(end)
    chunks = await ex.storage_stream("ReadTransactionLog", request, parsed=True)
    return [_log_entry(t) for c in chunks for t in c.transactions]


async def read_audit_log(ex: Execute, body: Body) -> Json:
    database, table = body.database(), body.text("table")
    search_type = body.text("search_type", required=False)
    values = body.array("search_values", required=False)
    request = spb.ReadAuditLogRequest(database=database, table=table, limit=body.number("limit"))
    if search_type == "hash_value":
        request.ids.extend(jsonbytes.dumps(v) for v in values)
    elif search_type == "username":
        request.users.extend(str(v) for v in values)
    elif search_type == "timestamp":
        if not values or not all(isinstance(v, int | float) for v in values[:2]):
            raise InvalidArgument(
                "read_audit_log: 'search_values' must hold [from] or [from, to] times"
            )
        request.start_time.FromMilliseconds(body.millis(values[0], "search_values"))
        if len(values) > 1:
            request.end_time.FromMilliseconds(body.millis(values[1], "search_values"))
    elif search_type:
        raise InvalidArgument(
            "read_audit_log: 'search_type' must be hash_value, username or timestamp"
        )
    chunks = await ex.storage_stream("ReadAuditLog", request, parsed=True)
    entries = [_log_entry(t) for c in chunks for t in c.entries]
    if search_type == "hash_value":
        by_id: dict[str, list[Json]] = {}
        for entry in entries:
            for key in entry["hash_values"]:
                by_id.setdefault(str(key), []).append(entry)
        return by_id
    return entries


async def delete_audit_logs_before(ex: Execute, body: Body) -> Json:
    before = body.timestamp("timestamp")
    if before is None:
        raise InvalidArgument("delete_audit_logs_before: 'timestamp' is required")
    reply = await ex.storage(
        "DeleteLogsBefore",
        spb.DeleteLogsBeforeRequest(
            before=before, database=body.text("database", "schema", required=False)
        ),
    )
    return {
        "message": f"deleted {reply.deleted_transactions} log entries and purged"
        f" {reply.purged_tombstones} tombstones"
    }


# -- csv and revert -------------------------------------------------------------------------
# (no typed admin RPCs: the typed path is storage's LoadCsv and RevertTransaction)

_CSV_ACTIONS = {
    "insert": types_pb2.OPERATION_INSERT,
    "update": types_pb2.OPERATION_UPDATE,
    "upsert": types_pb2.OPERATION_UPSERT,
}


def _csv_header(body: Body) -> spb.LoadCsvHeader:
    action = body.text("action", required=False, default="insert")
    if action not in _CSV_ACTIONS:
        raise InvalidArgument(f"{body.operation}: 'action' must be insert, update or upsert")
    return spb.LoadCsvHeader(
        database=body.database(), table=body.text("table"), operation=_CSV_ACTIONS[action]
    )


def _csv_json(reply: spb.LoadCsvResponse) -> Json:
    return {
        "message": f"successfully loaded {reply.written} of {reply.rows} records",
        "rows": reply.rows,
        "written": reply.written,
        "skipped": reply.skipped,
        "failed": reply.failed,
        "errors": [{"line": e.line, "message": e.message} for e in reply.errors],
    }


async def csv_data_load(ex: Execute, body: Body) -> Json:
    header = _csv_header(body)
    chunks = csvload.each(csvload.text_chunks(body.text("data")))
    return _csv_json(await csvload.load(ex.node, ex.caller.metadata, header, chunks))


async def csv_file_load(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("csv_file_load")  # it reads files of the node's machine
    header = _csv_header(body)
    path = body.text("file_path")
    file = await asyncio.to_thread(csvload.open_csv_file, path)
    try:
        chunks = csvload.file_chunks(file, path)
        return _csv_json(await csvload.load(ex.node, ex.caller.metadata, header, chunks))
    finally:
        file.close()


def _transaction_version(body: Body) -> int:
    value = body._get(("version",))
    if value is None:
        return 0
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 64:
        raise InvalidArgument(
            "revert_transaction: 'version' must be the transaction's version as the log shows"
            " it (a positive integer, or a string of digits)"
        )
    return value


def _transaction_time(body: Body) -> float:
    value = body._get(("timestamp",))
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidArgument(
            "revert_transaction: 'timestamp' must be the transaction's timestamp as the log"
            " shows it (Unix milliseconds)"
        )
    return float(value)


def _ref_json(ref: types_pb2.TransactionRef) -> Json:
    return {"origin": ref.origin, "version": ref.version, "timestamp": harper_time(ref.version)}


async def revert_transaction(ex: Execute, body: Body) -> Json:
    request = spb.RevertTransactionRequest(
        database=body.database(),
        origin=body.text("origin", required=False),
        version=_transaction_version(body),
        timestamp=_transaction_time(body),
        force=body.flag("force", default=False),
    )
    if not request.version and not request.timestamp:
        raise InvalidArgument(
            "revert_transaction: 'version' (or 'timestamp') and 'origin' of the transaction"
            " are required, as read_transaction_log and read_audit_log show them"
        )
    reply = await ex.storage("RevertTransaction", request)
    records = [
        {
            "table": r.table,
            "hash_value": orjson.loads(r.id),
            "operation": "unchanged" if r.unchanged else _OPERATIONS_ENUM.get(r.operation, "write"),
            "later_writes": [_ref_json(w) for w in r.later_writes],
        }
        for r in reply.records
    ]
    written = sum(not r.unchanged for r in reply.records)
    reverted = reply.reverted
    return {
        "message": f"reverted transaction {reverted.version} of {reverted.origin}:"
        f" {written} of {len(records)} records set back",
        "reverted": _ref_json(reverted),
        **_ref_json(reply.revert),
        "records": records,
    }


# -- backups ----------------------------------------------------------------------------------


def _versions_json(positions: Any) -> Json:
    return [
        {"origin": p.origin, "version": p.version, "time": harper_time(p.version)}
        for p in positions
    ]


async def get_backup(ex: Execute, body: Body) -> Json:
    """Write a backup into the node's backups folder (Harper answers the archive itself
    over HTTP; JSON cannot carry it: the typed GetBackup streams it)."""
    ex.caller.require_super_user("get_backup")
    database = body.text("database", "schema")
    name = body.text("name", required=False) or None
    saved = await Backups(ex.node).save(database, name)
    info = saved.result.info()
    return {
        "message": f"backup of database '{database}' saved as '{saved.name}'",
        "name": saved.name,
        "file": saved.file,
        "database": info.database,
        "node_name": info.node_name,
        "taken_at": info.taken_at_ms,
        "node_time": info.node_time,
        "rows": info.rows,
        "transactions": info.transactions,
        "size": info.size_bytes,
        "sha256": info.sha256,
        "positions": _versions_json(info.positions),
        "horizons": _versions_json(info.horizons),
    }


async def restore_backup(ex: Execute, body: Body) -> Json:
    """Restore a backup of the node's backups folder, optionally to a point in time."""
    ex.caller.require_super_user("restore_backup")
    raw_until = body._get(("until",))
    if raw_until is not None and (
        isinstance(raw_until, bool) or not isinstance(raw_until, int | float)
    ):
        raise InvalidArgument("restore_backup: 'until' must be a time in Unix milliseconds")
    until = None if raw_until is None else body.millis(raw_until, "until")
    backups = Backups(ex.node)
    name = body.text("backup", "name")
    log_name = body.text("log_backup", required=False)
    base = ArchiveReader(backups.path_of(name), f"backup '{name}'")
    log = ArchiveReader(backups.path_of(log_name), f"backup '{log_name}'") if log_name else None
    result = await backups.restore(
        base, log, until, body.text("database", "schema", required=False)
    )
    response = result.response()
    mode = apb.RestoreMode.Name(response.mode).removeprefix("RESTORE_MODE_").lower()
    if until is not None:
        state = f"as of {until}"
    elif log_name:
        state = f"rolled forward through the log of '{log_name}'"
    else:
        state = "as backed up"
    return {
        "message": f"database '{response.database}' restored from backup '{name}' ({state})",
        "database": response.database,
        "mode": mode,
        "rows": response.rows,
        "logged_transactions": response.logged_transactions,
        "replayed_transactions": response.replayed_transactions,
        "positions": _versions_json(response.positions),
    }


# -- analytics --------------------------------------------------------------------------------


def _time_ms(body: Body, name: str, default: int) -> int:
    value = body._get((name,))
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_MS:
        raise InvalidArgument(f"{body.operation}: '{name}' must be a time in Unix milliseconds")
    return int(value)


async def get_analytics(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("get_analytics")
    query = history.AnalyticsQuery(
        metric=body.text("metric"),
        start_ms=_time_ms(body, "start_time", 0),
        end_ms=_time_ms(body, "end_time", MAX_TIME_MS),
        period_ms=body.number("period", default=AGGREGATE_PERIOD_MS, maximum=MAX_UINT32),
        attributes=tuple(_attributes(body)),
        conditions=tuple(_conditions(body.array("conditions", required=False), body.operation)),
    )
    return await history.get_analytics(ex.node, ex.caller, query)


async def list_metrics(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("list_metrics")
    types = body.array("metric_types", required=False) or ["builtin"]
    if not all(isinstance(t, str) for t in types):
        raise InvalidArgument("list_metrics: 'metric_types' must be an array of strings")
    return history.list_metrics(ex.caller, types)


# -- certificates (system.hdb_certificate) ---------------------------------------------------


async def add_certificate(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("add_certificate")
    raw_authority = body._get(("is_authority",))
    if raw_authority is not None and not isinstance(raw_authority, bool):
        raise InvalidArgument("add_certificate: 'is_authority' must be true or false")
    new = NewCertificate(
        name=body.text("name"),
        certificate=body.text("certificate"),
        private_key=body.text("private_key", required=False),
        is_authority=raw_authority,
    )
    row = await ex.certificates.add(new)
    return {
        "message": f"Successfully added certificate: {new.name}",
        "certificate": row,
    }


async def list_certificates(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("list_certificates")
    return await ex.certificates.list()


async def remove_certificate(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("remove_certificate")
    name = body.text("name")
    await ex.certificates.remove(name)
    return {"message": f"Successfully removed {name}"}


# -- cluster ----------------------------------------------------------------------------------


def _connection_json(c: rpb.Connection) -> Json:
    sockets = []
    for db in c.databases:
        sockets.append(
            {
                "database": db.database,
                "connected": c.connected,
                "latency": c.latency_ms,
                "lastReceivedVersion": harper_time(db.last_received_version),
                "lastReceivedLocalTime": db.last_received_local_time.ToMilliseconds()
                if db.HasField("last_received_local_time")
                else None,
                "lastCommitConfirmed": harper_time(db.last_commit_confirmed),
                "backPressurePercent": c.back_pressure_percent,
                "lastConnectionError": c.last_connection_error or None,
                "backlog": {"transactions": db.backlog_transactions, "seconds": db.backlog_seconds},
                "copy": {
                    "source": db.copy.source,
                    "rows": db.copy.rows,
                    "bytes": db.copy.bytes,
                    "estimatedRows": db.copy.estimated_rows,
                }
                if db.HasField("copy")
                else None,
            }
        )
    return {
        "name": c.peer,
        "url": c.address,
        "connected": c.connected,
        "dialed": c.dialed,
        "replicates": {"sends": c.sends, "receives": c.receives},
        "latency": c.latency_ms,
        "backPressurePercent": c.back_pressure_percent,
        "lastConnectionError": c.last_connection_error or None,
        "connectedSince": c.connected_since.ToMilliseconds()
        if c.HasField("connected_since")
        else None,
        "shard": c.shard if c.HasField("shard") else None,
        "withheldDatabases": list(c.withheld_databases),
        # The tables flowing each way when only some do (null: every table).
        "subscriptions": {
            "receives": _tables_json(c.received_tables),
            "sends": _tables_json(c.sent_tables),
        },
        "logMarginSeconds": c.log_margin_seconds if c.HasField("log_margin_seconds") else None,
        "database_sockets": sockets,
    }


def _tables_json(tables: Sequence[types_pb2.TableRef]) -> Json:
    if not tables:
        return None
    return [{"database": t.database, "table": t.table} for t in tables]


async def cluster_status(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("cluster_status")
    reply = await ex.cluster.status()
    return {
        "node_name": reply.node_name,
        "is_enabled": reply.is_enabled,
        "connections": [_connection_json(c) for c in reply.connections],
        "removed": reply.removed,
        "shard": reply.shard if reply.HasField("shard") else None,
        "residency": (
            {
                "repair": _progress_json(reply.residency.repair),
                "rebalance": _progress_json(reply.residency.rebalance),
                "gone": list(reply.residency.gone),
            }
            if reply.HasField("residency")
            else {"error": reply.residency_error}
        ),
    }


def _progress_json(progress: spb.ResidencyProgress) -> Json:
    return {
        "running": progress.running,
        "passes": progress.passes,
        "scanned": progress.scanned,
        "needing": progress.needing,
        "rehomed": progress.rehomed,
        "deferred": progress.deferred,
        "unrecoverable": progress.unrecoverable,
        "dry_run": progress.dry_run,
        "started_ms": progress.started_ms,
        "finished_ms": progress.finished_ms,
    }


async def rebalance(ex: Execute, body: Body) -> Json:
    """Move records to where rendezvous hashing over the current members puts them, on
    every member (each moves the records it is the first resident of); ``dry_run`` only
    counts. Progress: ``cluster_status`` (``residency.rebalance``) of each node."""
    ex.caller.require_super_user("rebalance")
    replicated = body.flag("replicated", default=True)
    dry_run = body.flag("dry_run", default=False)
    database = body.text("database", "schema", required=False)
    reply = await ex.storage("Rebalance", spb.RebalanceRequest(database=database, dry_run=dry_run))
    result: dict[str, Any] = {
        "message": "rebalance dry run started" if dry_run else "rebalance started",
        "progress": _progress_json(reply.progress),
    }
    return await _on_members(ex, body, result) if replicated else result


def _route_json(route: Route) -> Json:
    entry = to_yaml(route)
    return {"hostname": entry} if isinstance(entry, str) else entry


def _routes_from_body(body: Body) -> list[rpb.Route]:
    routes: list[rpb.Route] = []
    for i, item in enumerate(body.array("routes")):
        if isinstance(item, str):
            routes.append(
                _route_message({"url": item} if "://" in item else {"hostname": item}, i, body)
            )
        elif isinstance(item, dict):
            routes.append(_route_message(item, i, body))
        else:
            raise InvalidArgument(
                f"{body.operation}: route {i} must be a host name, a URL or an object"
            )
    return routes


def _route_message(item: dict[str, Any], index: int, body: Body) -> rpb.Route:
    host = item.get("hostname", item.get("host"))
    port = item.get("port") or 0
    secure = None
    if "url" in item:
        try:
            host, url_port, secure = parse_route_url(str(item["url"]))
        except ValueError as exc:
            raise InvalidArgument(f"{body.operation}: route {index}: {exc}") from exc
        port = url_port or port
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise InvalidArgument(
            f"{body.operation}: route {index} needs a host name (and a numeric port)"
        )
    message = rpb.Route(hostname=host, port=port)
    if secure is not None:
        message.secure = secure
    replicates = item.get("replicates")
    if isinstance(replicates, dict):
        message.sends = bool(replicates.get("sends", True))
        message.receives = bool(replicates.get("receives", True))
    unknown = sorted(set(item) - _ROUTE_KEYS)
    if unknown:
        raise InvalidArgument(
            f"{body.operation}: route {index}: unknown field(s) {', '.join(unknown)}"
            f" (a route has {', '.join(sorted(_ROUTE_KEYS))})"
        )
    where = f"{body.operation}: route {index}"
    revoked = item.get("revokedCertificates", item.get("revoked_certificates"))
    if revoked is not None:
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise InvalidArgument(f"{where}: 'revokedCertificates' must be a list of serials")
        message.revoked_certificates.extend(revoked)
    start = item.get("startTime", item.get("start_time"))
    if start is not None:
        try:
            when = (
                datetime.fromtimestamp(start / 1000, tz=UTC)
                if isinstance(start, int | float) and not isinstance(start, bool)
                else parse_time(start)
            )
        except (ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{where}: 'startTime': {exc}") from exc
        message.start_time.FromDatetime(when.astimezone(UTC).replace(tzinfo=None))
    subscriptions = item.get("subscriptions")
    if subscriptions is not None:
        if not isinstance(subscriptions, list) or not all(
            isinstance(x, dict) for x in subscriptions
        ):
            raise InvalidArgument(f"{where}: 'subscriptions' must be a list of objects")
        for x in subscriptions:
            message.subscriptions.append(
                rpb.Subscription(
                    database=str(x.get("database", x.get("schema", ""))),
                    table=str(x.get("table", "")),
                    publish=bool(x.get("publish", False)),
                    subscribe=bool(x.get("subscribe", False)),
                )
            )
    return message


# What a route object of cluster_set_routes may hold (anything else is refused, never
# silently dropped).
_ROUTE_KEYS = frozenset(
    {
        "hostname",
        "host",
        "port",
        "url",
        "replicates",
        "startTime",
        "start_time",
        "subscriptions",
        "revokedCertificates",
        "revoked_certificates",
    }
)


async def cluster_get_routes(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("cluster_get_routes")
    return [_route_json(r) for r in ex.cluster.routes()]


async def cluster_set_routes(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("cluster_set_routes")
    change = await ex.cluster.set_routes(_routes_from_body(body))
    return {
        "message": "cluster routes successfully set",
        "set": [_route_json(r) for r in change.changed],
        "skipped": [_route_json(r) for r in change.skipped],
    }


async def cluster_delete_routes(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("cluster_delete_routes")
    names = [m.hostname for m in _routes_from_body(body)]
    change = await ex.cluster.delete_routes(names)
    return {
        "message": "cluster routes successfully deleted",
        "deleted": [_route_json(r) for r in change.changed],
        "skipped": [{"hostname": n} for n in change.missing],
    }


async def get_configuration(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("get_configuration")
    return ex.cluster.configuration()


async def set_configuration(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("set_configuration")
    replicated = _replicated(ex, body)
    keep = body.flag("keep_sharded_data", default=False) or replicated
    settings = settings_from(body.data)
    outcome = await shards.set_configuration(ex.nodes, settings, keep)
    result: dict[str, Any] = {
        "message": "Configuration successfully set. Restart the node (restart) for the new"
        " settings to take effect."
    }
    if outcome.shard_change is not None:
        result["message"] = (
            f"Configuration successfully set; this node {outcome.shard_change.sentence()}."
            " Other new settings take effect at the next restart (restart)."
        )
        result["shardChange"] = outcome.shard_change.json()
    if not replicated:
        return result
    # Every member moves to the one shard, keeping what it holds (the shards merge);
    # a shard change restarts a member's replicator, hence the longer limit.
    names = await clusterwide.members(ex.nodes, ex.cluster)
    metadata = ex.caller.member_metadata("set_configuration with 'replicated'")
    operation = {**body.data, "keep_sharded_data": True}
    results = await clusterwide.fan_out(
        ex.node, names, operation, metadata, limit_s=clusterwide.MEMBER_RESTART_TIMEOUT_S
    )
    return {**result, "replicated": [r.json() for r in results]}


def _restart_services(body: Body) -> list[str]:
    if body.operation == "restart_service":
        return clusterwide.services_to_restart([body.text("service")])
    names = body.array("services", required=False)
    if not all(isinstance(n, str) for n in names):
        raise InvalidArgument("restart: 'services' must be an array of service names")
    return clusterwide.services_to_restart(names)


async def restart(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user(body.operation)
    replicated = _replicated(ex, body)
    services = _restart_services(body)
    metadata = (
        ex.caller.member_metadata(f"{body.operation} with 'replicated'") if replicated else ()
    )
    done = await clusterwide.restart(ex.node, ex.nodes, ex.cluster, services, replicated, metadata)
    if done.services:
        here = [s for s in done.services if s != "admin"]
        message = f"restarted {', '.join(here)}" if here else ""
        if "admin" in done.services:
            message += ("; " if message else "") + "the admin service restarts now"
    else:
        message = "the rolling restart stopped before this node; nothing was restarted here"
    result: dict[str, Any] = {"message": message, "services": done.services}
    if replicated:
        result["replicated"] = [r.json() for r in done.replicated]
    return result


# -- membership (system.hdb_nodes) ---------------------------------------------------------

_NODE_COLUMNS = ("url", "replicates", "subscriptions", "start_time", "revoked_certificates")


def _node_name(body: Body) -> str:
    name = body._get(("hostname", "node_name", "name"))
    url = body._get(("url",))
    if name is None and isinstance(url, str):
        try:
            name, _, _ = parse_route_url(url)
        except ValueError as exc:
            raise InvalidArgument(f"{body.operation}: url: {exc}") from exc
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{body.operation}: 'hostname' (or 'url') is required")
    return name


def _node_changes(body: Body) -> Row:
    """The hdb_nodes columns an add_node / update_node body sets (Harper's field names)."""
    changes: Row = {c: body.data[c] for c in _NODE_COLUMNS if c in body.data}
    if "sends" in body.data or "receives" in body.data:
        replicates = changes.get("replicates", True)
        flows = replicates if isinstance(replicates, dict) else {}
        changes["replicates"] = {
            "sends": body.flag("sends", default=flows.get("sends", True)),
            "receives": body.flag("receives", default=flows.get("receives", True)),
        }
    if "subscriptions" in changes:
        subscriptions = body.array("subscriptions")
        changes["subscriptions"] = [
            {"database": s.get("database", s.get("schema")), **s} if isinstance(s, dict) else s
            for s in subscriptions
        ]
        for item in changes["subscriptions"]:
            if isinstance(item, dict):
                item.pop("schema", None)
    if "start_time" in changes:
        changes["start_time"] = start_time_text(changes["start_time"], body.operation)
    if "shard" in body.data:
        shard = body.data["shard"]
        if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int)):
            raise InvalidArgument(f"{body.operation}: 'shard' must be a whole number")
        changes["shard"] = shard
    return changes


def _requested_row(body: Body, node_name: str, where: str = "") -> Row:
    name = _node_name(body)
    changes = _node_changes(body)
    return validated_row(
        {"name": name, **changes}, node_name, changes.get("shard"), f"{body.operation}: {where}"
    )


async def add_node(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("add_node")
    requested = _requested_row(body, ex.nodes.name)
    authorization = body.data.get("authorization")
    if authorization is None or authorization == "":
        # verify_tls only concerns the certificate exchange: without credentials no
        # connection is made here.
        row = await ex.nodes.add(requested)
    else:
        port = body.number("admin_port", default=0)
        if port > 65535:
            raise InvalidArgument("add_node: 'admin_port' must be a port number (1 to 65535)")
        join = JoinRequest(
            row=requested,
            authorization=authorization_header(authorization, "add_node"),
            verify_tls=body.flag("verify_tls", default=True),
            admin_port=port or None,
        )
        row = await ex.exchange.join(join)
    return {"message": f"Successfully added '{row['name']}' to cluster", "node": row}


async def update_node(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user(body.operation)
    name = _node_name(body)
    row = await ex.nodes.update(name, _node_changes(body))
    return {"message": f"Successfully updated '{name}'", "node": row}


async def remove_node(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("remove_node")
    name = _node_name(body)
    await ex.nodes.remove(name)
    return {"message": f"Successfully removed '{name}' from cluster"}


async def configure_cluster(ex: Execute, body: Body) -> Json:
    ex.caller.require_super_user("configure_cluster")
    rows = []
    for i, item in enumerate(body.array("connections")):
        if not isinstance(item, dict):
            raise InvalidArgument(f"configure_cluster: connection {i} must be an object")
        entry = Body({**item, "operation": "configure_cluster"})
        row = _requested_row(entry, ex.nodes.name, f"connection {i}: ")
        if "shard" not in item:
            row.pop("shard")
        rows.append(row)
    done = await ex.nodes.configure(rows)
    return {
        "message": "Cluster successfully configured.",
        "added": [r["name"] for r in done.added],
        "updated": [r["name"] for r in done.updated],
        "removed": done.removed,
    }


# -- users and roles (local to each node; the typed path is storage's own user RPCs) ---------


def _user_json(user: spb.User, roles: dict[str, Json]) -> Json:
    return {
        "username": user.username,
        "active": user.active,
        "role": roles.get(user.role, {"role": user.role}),
    }


def _role_json(role: spb.Role) -> Json:
    return {"role": role.name, "id": role.name, "permission": orjson.loads(role.permission)}


async def _roles(ex: Execute) -> dict[str, Json]:
    reply = await ex.storage("ListRoles", spb.ListRolesRequest())
    return {r.name: _role_json(r) for r in reply.roles}


async def add_user(ex: Execute, body: Body) -> Json:
    request = spb.AddUserRequest(
        username=body.text("username"), password=body.text("password"), role=body.text("role")
    )
    if "active" in body.data:
        request.active = body.flag("active", default=True)
    await ex.storage("AddUser", request)
    return {"message": f"{request.username} successfully added"}


async def alter_user(ex: Execute, body: Body) -> Json:
    request = spb.AlterUserRequest(username=body.text("username"))
    if "password" in body.data:
        request.password = body.text("password")
    if "role" in body.data:
        request.role = body.text("role")
    if "active" in body.data:
        request.active = body.flag("active", default=True)
    await ex.storage("AlterUser", request)
    return {"message": f"{request.username} successfully updated"}


async def drop_user(ex: Execute, body: Body) -> Json:
    username = body.text("username")
    await ex.storage("DropUser", spb.DropUserRequest(username=username))
    return {"message": f"{username} successfully deleted"}


async def list_users(ex: Execute, body: Body) -> Json:
    roles = await _roles(ex)
    reply = await ex.storage("ListUsers", spb.ListUsersRequest())
    return [_user_json(u, roles) for u in reply.users]


async def user_info(ex: Execute, body: Body) -> Json:
    reply = await ex.storage("Authenticate", spb.AuthenticateRequest())
    return {
        "username": reply.username,
        "role": {
            "role": reply.role,
            "permission": orjson.loads(reply.permission) if reply.permission else {},
        },
        "super_user": reply.super_user,
    }


def _permission(body: Body) -> bytes:
    permission = body._get(("permission",))
    if not isinstance(permission, dict):
        raise InvalidArgument(f"{body.operation}: 'permission' must be an object")
    return orjson.dumps(permission)


async def add_role(ex: Execute, body: Body) -> Json:
    reply = await ex.storage(
        "AddRole", spb.AddRoleRequest(name=body.text("role"), permission=_permission(body))
    )
    return _role_json(reply.role)


async def alter_role(ex: Execute, body: Body) -> Json:
    name = body.text("role", "id")
    reply = await ex.storage(
        "AlterRole", spb.AlterRoleRequest(name=name, permission=_permission(body))
    )
    return _role_json(reply.role)


async def drop_role(ex: Execute, body: Body) -> Json:
    name = body.text("id", "role")
    await ex.storage("DropRole", spb.DropRoleRequest(name=name))
    return {"message": f"{name} successfully deleted"}


async def list_roles(ex: Execute, body: Body) -> Json:
    return list((await _roles(ex)).values())


# -- monitoring ----------------------------------------------------------------------------


_NODE_SECTIONS = ("table_size", "replication")


async def system_information(ex: Execute, body: Body) -> Json:
    """psutil's view of the machine (sysinfo.py), plus table sizes and a replication
    summary from this node's storage and replicator."""
    ex.caller.require_super_user("system_information")
    attributes = body.array("attributes", required=False) or None
    if attributes is not None and not all(isinstance(a, str) for a in attributes):
        raise InvalidArgument("system_information: 'attributes' must be an array of names")
    machine = [a for a in attributes if a not in _NODE_SECTIONS] if attributes else None
    config = ex.node.config
    result: dict[str, Any] = {}
    if machine is None or machine:
        result = await asyncio.to_thread(
            sysinfo.system_information, machine, config=config, config_path=config.source
        )
    if attributes is None or "table_size" in attributes:
        reply = await ex.storage("DescribeAll", spb.DescribeAllRequest())
        result["table_size"] = [
            {"database": db.name, "table": t.name, "record_count": t.record_count}
            for db in reply.databases
            for t in db.tables
        ]
    if attributes is None or "replication" in attributes:
        status = await ex.cluster.status()
        result["replication"] = {
            "node_name": status.node_name,
            "removed": status.removed,
            "connections": [
                {
                    "name": c.peer,
                    "connected": c.connected,
                    "backlog_transactions": sum(d.backlog_transactions for d in c.databases),
                }
                for c in status.connections
            ],
        }
    return result


OPERATIONS: dict[str, Handler] = {
    # data
    "insert": insert,
    "update": update,
    "upsert": upsert,
    "delete": delete,
    "search_by_id": search_by_id,
    "search_by_hash": search_by_id,
    "search_by_value": search_by_value,
    "search_by_conditions": search_by_conditions,
    # schema
    "describe_all": describe_all,
    "describe_database": describe_database,
    "describe_schema": describe_database,
    "describe_table": describe_table,
    "create_database": create_database,
    "create_schema": create_database,
    "drop_database": drop_database,
    "drop_schema": drop_database,
    "create_table": create_table,
    "drop_table": drop_table,
    "create_attribute": create_attribute,
    "drop_attribute": drop_attribute,
    # logs
    "read_transaction_log": read_transaction_log,
    "read_audit_log": read_audit_log,
    "delete_audit_logs_before": delete_audit_logs_before,
    # users and roles
    "add_user": add_user,
    "alter_user": alter_user,
    "drop_user": drop_user,
    "list_users": list_users,
    "user_info": user_info,
    "add_role": add_role,
    "alter_role": alter_role,
    "drop_role": drop_role,
    "list_roles": list_roles,
    # monitoring
    "system_information": system_information,
    # csv and revert
    "csv_data_load": csv_data_load,
    "csv_file_load": csv_file_load,
    "revert_transaction": revert_transaction,
    # backups
    "get_backup": get_backup,
    "restore_backup": restore_backup,
    # analytics
    "get_analytics": get_analytics,
    "list_metrics": list_metrics,
    # certificates
    "add_certificate": add_certificate,
    "list_certificates": list_certificates,
    "remove_certificate": remove_certificate,
    # cluster
    "cluster_status": cluster_status,
    "rebalance": rebalance,
    "cluster_get_routes": cluster_get_routes,
    "cluster_set_routes": cluster_set_routes,
    "cluster_delete_routes": cluster_delete_routes,
    "get_configuration": get_configuration,
    "set_configuration": set_configuration,
    "restart": restart,
    "restart_service": restart,
    # membership
    "add_node": add_node,
    "update_node": update_node,
    "set_node_replication": update_node,
    "remove_node": remove_node,
    "configure_cluster": configure_cluster,
}
