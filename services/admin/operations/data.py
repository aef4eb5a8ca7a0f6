"""Data operations: the writes (driven by one table), the searches and CSV loads.

All are forwarded to storage with the caller's credentials, so storage applies the
caller's role exactly as for a direct client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.admin import csvload
from services.admin.jobs import Job
from services.admin.operations import jobs
from services.admin.operations.body import Body, Json
from services.admin.operations.execute import Execute
from services.common import jsonbytes
from services.common.errors import InvalidArgument

COMPARATORS = {
    name.removeprefix("COMPARATOR_").lower(): value
    for name, value in spb.Comparator.items()
    if value != spb.COMPARATOR_UNSPECIFIED
}
COMPARATORS.update(
    {
        "equal": spb.COMPARATOR_EQUALS,
        "greater_than_or_equal": spb.COMPARATOR_GREATER_THAN_EQUAL,
        "less_than_or_equal": spb.COMPARATOR_LESS_THAN_EQUAL,
    }
)


def records(body: Body) -> list[bytes]:
    values = body.array("records")
    if not all(isinstance(r, dict) for r in values):
        raise InvalidArgument(f"{body.operation}: every record must be a JSON object")
    return [jsonbytes.dumps(r) for r in values]


def ids(body: Body) -> list[bytes]:
    return [jsonbytes.dumps(v) for v in body.array("ids", "hash_values")]


def _loads(values: Any) -> list[Any]:
    return [orjson.loads(v) for v in values]


# -- writes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One write operation: its storage RPC, what its body carries, and its answer."""

    rpc: str  # the storage RPC, e.g. "Insert"
    message: Callable[..., Any]  # its request message, e.g. spb.InsertRequest
    payload: str  # the request's field for what the body carries: "records" or "ids"
    written: str  # the reply's field of the ids written, e.g. "inserted_ids"
    key: str  # Harper's name for them in the answer, e.g. "inserted_hashes"
    sentence: str  # the answer's message, from {done} and {total}
    skips: bool = True  # the reply has skipped_ids (answered as skipped_hashes)

    def parse(self, body: Body) -> WriteRequest:
        database, table = body.database(), body.text("table")
        payload = records(body) if self.payload == "records" else ids(body)
        confirmation, replicate_to = body.confirmation(), body.replicate_to()
        message = self.message(
            database=database,
            table=table,
            replicated_confirmation=confirmation,
            replicate_to=replicate_to,
            **{self.payload: payload},
        )
        return WriteRequest(self, message)


@dataclass(frozen=True)
class WriteRequest:
    write: Write
    message: Any


WRITES = {
    "insert": Write(
        "Insert",
        spb.InsertRequest,
        "records",
        "inserted_ids",
        "inserted_hashes",
        "inserted {done} of {total} records",
    ),
    "update": Write(
        "Update",
        spb.UpdateRequest,
        "records",
        "updated_ids",
        "update_hashes",
        "updated {done} of {total} records",
    ),
    "upsert": Write(
        "Upsert",
        spb.UpsertRequest,
        "records",
        "upserted_ids",
        "upserted_hashes",
        "upserted {done} of {total} records",
        skips=False,
    ),
    "delete": Write(
        "Delete",
        spb.DeleteRequest,
        "ids",
        "deleted_ids",
        "deleted_hashes",
        "{done} of {total} records successfully deleted",
    ),
}


async def write(ex: Execute, request: WriteRequest) -> Json:
    """Any of the WRITES: the storage call, then Harper's answer."""
    spec = request.write
    reply = await ex.storage(spec.rpc, request.message)
    done = getattr(reply, spec.written)
    skipped = reply.skipped_ids if spec.skips else []
    result: dict[str, Any] = {
        "message": spec.sentence.format(done=len(done), total=len(done) + len(skipped)),
        spec.key: _loads(done),
    }
    if spec.skips:
        result["skipped_hashes"] = _loads(skipped)
    return result


# -- searches --------------------------------------------------------------------------------


def attributes(body: Body) -> list[str]:
    return body.names("get_attributes", what="names")


def _records_of(chunks: list[Any]) -> list[Json]:
    """Records as storage sent them, passed into the answer without parsing them."""
    return [orjson.Fragment(r) for c in chunks for r in c.records]


def parse_search_by_id(body: Body) -> spb.SearchByIdRequest:
    return spb.SearchByIdRequest(
        database=body.database(),
        table=body.text("table"),
        ids=ids(body),
        get_attributes=attributes(body),
    )


async def search_by_id(ex: Execute, request: spb.SearchByIdRequest) -> Json:
    return _records_of(await ex.storage_stream("SearchById", request))


def _sort(body: Body) -> list[spb.SortKey]:
    sort = body.value("sort")
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


def parse_search_by_value(body: Body) -> spb.SearchByValueRequest:
    value = body.value("value", "search_value")
    if value is None:
        raise InvalidArgument("search_by_value: 'value' is required")
    return spb.SearchByValueRequest(
        database=body.database(),
        table=body.text("table"),
        attribute=body.text("attribute", "search_attribute"),
        value=orjson.dumps(value),
        get_attributes=attributes(body),
        limit=body.number("limit"),
        offset=body.number("offset"),
        sort=_sort(body),
    )


async def search_by_value(ex: Execute, request: spb.SearchByValueRequest) -> Json:
    return _records_of(await ex.storage_stream("SearchByValue", request))


def _operator(value: Any, operation: str) -> spb.LogicalOperator.ValueType:
    if value is None or value == "and":
        return spb.LOGICAL_OPERATOR_AND
    if value == "or":
        return spb.LOGICAL_OPERATOR_OR
    raise InvalidArgument(f"{operation}: 'operator' must be 'and' or 'or'")


def conditions(items: Any, operation: str, depth: int = 0) -> list[spb.Condition]:
    """Harper's conditions (nested groups too) as typed ones."""
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
                        conditions=conditions(item["conditions"], operation, depth + 1),
                    )
                )
            )
            continue
        attribute = item.get("attribute", item.get("search_attribute"))
        comparator = item.get("comparator", item.get("search_type"))
        if not isinstance(attribute, str) or comparator not in COMPARATORS:
            raise InvalidArgument(
                f"{operation}: condition {i} needs an attribute and a comparator"
                f" ({', '.join(sorted(COMPARATORS))})"
            )
        value = item.get("value", item.get("search_value"))
        out.append(
            spb.Condition(
                comparison=spb.Comparison(
                    attribute=attribute,
                    comparator=COMPARATORS[comparator],
                    value=orjson.dumps(value),
                )
            )
        )
    return out


def parse_search_by_conditions(body: Body) -> spb.SearchByConditionsRequest:
    return spb.SearchByConditionsRequest(
        database=body.database(),
        table=body.text("table"),
        operator=_operator(body.value("operator"), body.operation),
        conditions=conditions(body.array("conditions"), body.operation),
        get_attributes=attributes(body),
        limit=body.number("limit"),
        offset=body.number("offset"),
        sort=_sort(body),
    )


async def search_by_conditions(ex: Execute, request: spb.SearchByConditionsRequest) -> Json:
    return _records_of(await ex.storage_stream("SearchByConditions", request))


# -- CSV loads -------------------------------------------------------------------------------
# (no typed admin RPCs: the typed path is storage's LoadCsv)

_CSV_ACTIONS = {
    "insert": types_pb2.OPERATION_INSERT,
    "update": types_pb2.OPERATION_UPDATE,
    "upsert": types_pb2.OPERATION_UPSERT,
}


@dataclass(frozen=True)
class CsvLoad:
    header: spb.LoadCsvHeader
    source: str  # the CSV text (csv_data_load), or the node-local file (csv_file_load)


def _csv_header(body: Body) -> spb.LoadCsvHeader:
    action = body.text("action", required=False, default="insert")
    if action not in _CSV_ACTIONS:
        raise InvalidArgument(f"{body.operation}: 'action' must be insert, update or upsert")
    return spb.LoadCsvHeader(
        database=body.database(), table=body.text("table"), operation=_CSV_ACTIONS[action]
    )


def _csv_outcome(reply: spb.LoadCsvResponse) -> tuple[str, Json]:
    """A load's job message (Harper's) and result (Shoal's counts and failed rows)."""
    return f"successfully loaded {reply.written} of {reply.rows} records", {
        "rows": reply.rows,
        "written": reply.written,
        "skipped": reply.skipped,
        "failed": reply.failed,
        "errors": [{"line": e.line, "message": e.message} for e in reply.errors],
    }


def parse_csv_data_load(body: Body) -> CsvLoad:
    header = _csv_header(body)
    return CsvLoad(header, body.text("data"))


async def _reported(chunks: AsyncIterator[bytes], job: Job, total: int) -> AsyncIterator[bytes]:
    """The chunks of a load, its job's progress updated as each goes to storage."""
    sent = 0
    async for chunk in chunks:
        yield chunk
        sent += len(chunk)
        job.progress(f"sent {sent} of {total} bytes of CSV to storage")


async def csv_data_load(ex: Execute, request: CsvLoad) -> Json:
    """A job (Harper's answer names it; get_job shows its progress and outcome)."""

    async def work(job: Job) -> tuple[str, Json]:
        data = request.source
        chunks = _reported(csvload.each(csvload.text_chunks(data)), job, len(data.encode()))
        return _csv_outcome(await csvload.load(ex.node, ex.caller.metadata, request.header, chunks))

    return jobs.start(ex, "csv_data_load", work)


def parse_csv_file_load(body: Body) -> CsvLoad:
    header = _csv_header(body)
    return CsvLoad(header, body.text("file_path"))


async def csv_file_load(ex: Execute, request: CsvLoad) -> Json:
    """Super user only: it reads files of the node's machine. The file is opened before
    the job starts, so a path that cannot be loaded is refused at once."""
    path = request.source
    file = await asyncio.to_thread(csvload.open_csv_file, path)

    async def work(job: Job) -> tuple[str, Json]:
        try:
            size = os.fstat(file.fileno()).st_size
            chunks = _reported(csvload.file_chunks(file, path), job, size)
            return _csv_outcome(
                await csvload.load(ex.node, ex.caller.metadata, request.header, chunks)
            )
        finally:
            file.close()

    try:
        return jobs.start(ex, "csv_file_load", work)
    except Exception:
        file.close()
        raise
