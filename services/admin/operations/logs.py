"""Logs and audit: the transaction log, the audit log, trimming them, and reverting one
transaction (the typed path is storage's RevertTransaction)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.admin.jobs import Job
from services.admin.operations import jobs
from services.admin.operations.body import Body, Json, harper_time
from services.admin.operations.execute import Execute
from services.common import jsonbytes
from services.common.errors import InvalidArgument

JOB_CALL_S = 3600.0  # a job's storage call is not bound by the Execute call that started it
_OPERATIONS_ENUM = {
    types_pb2.OPERATION_INSERT: "insert",
    types_pb2.OPERATION_UPDATE: "update",
    types_pb2.OPERATION_UPSERT: "upsert",
    types_pb2.OPERATION_DELETE: "delete",
}


def _record(write: types_pb2.Write) -> Json:
    """The record as the write left it, as Harper's audit shows it: whole, also for an
    update, which logs only the attributes it wrote (merged here over the record before
    it). None for a delete."""
    if not write.value:
        return None
    value = orjson.loads(write.value)
    if write.kind == types_pb2.WRITE_KIND_PATCH and write.prior and isinstance(value, dict):
        prior = orjson.loads(write.prior)
        if isinstance(prior, dict):
            return {**prior, **value}
    return value


def _log_entry(txn: types_pb2.Transaction) -> Json:
    operations = {_OPERATIONS_ENUM.get(w.operation, "write") for w in txn.writes}
    return {
        "operation": operations.pop() if len(operations) == 1 else "transaction",
        "user_name": txn.user,
        "timestamp": harper_time(txn.version),
        "origin": txn.origin,
        "version": txn.version,
        "hash_values": [orjson.loads(w.id) for w in txn.writes],
        "records": [_record(w) for w in txn.writes],
        "original_records": [orjson.loads(w.prior) if w.prior else None for w in txn.writes],
    } | (
        {"reverts": {"origin": txn.reverts.origin, "version": txn.reverts.version}}
        if txn.HasField("reverts")
        else {}
    )


def parse_read_transaction_log(body: Body) -> spb.ReadTransactionLogRequest:
    request = spb.ReadTransactionLogRequest(
        database=body.database(),
        table=body.text("table", required=False),
        limit=body.number("limit"),
    )
    if (start := body.timestamp("from")) is not None:
        request.start_time.CopyFrom(start)
    if (end := body.timestamp("to")) is not None:
        request.end_time.CopyFrom(end)
    return request


async def read_transaction_log(ex: Execute, request: spb.ReadTransactionLogRequest) -> Json:
    """The log's record writes; schema changes (a table created, an attribute declared),
    which write no record, are not entries of Harper's transaction log."""
    chunks = await ex.storage_stream("ReadTransactionLog", request, parsed=True)
    return [_log_entry(t) for c in chunks for t in c.transactions if t.writes]


@dataclass(frozen=True)
class AuditQuery:
    message: spb.ReadAuditLogRequest
    search_type: str  # hash_value: entries by the ids they wrote; username: by user


def parse_read_audit_log(body: Body) -> AuditQuery:
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
    return AuditQuery(request, search_type)


async def read_audit_log(ex: Execute, query: AuditQuery) -> Json:
    """Harper's answers: a list of entries; by ``hash_value`` an object keyed by id, by
    ``username`` an object keyed by user (each with the entries, oldest first)."""
    chunks = await ex.storage_stream("ReadAuditLog", query.message, parsed=True)
    entries = [_log_entry(t) for c in chunks for t in c.entries]
    grouped: dict[str, list[Json]] = {}
    if query.search_type == "hash_value":
        for entry in entries:
            for key in entry["hash_values"]:
                grouped.setdefault(str(key), []).append(entry)
        return grouped
    if query.search_type == "username":
        for entry in entries:
            grouped.setdefault(entry["user_name"], []).append(entry)
        return grouped
    return entries


def parse_delete_audit_logs_before(body: Body) -> spb.DeleteLogsBeforeRequest:
    before = body.timestamp("timestamp")
    if before is None:
        raise InvalidArgument("delete_audit_logs_before: 'timestamp' is required")
    return spb.DeleteLogsBeforeRequest(
        before=before, database=body.text("database", "schema", required=False)
    )


async def delete_audit_logs_before(ex: Execute, request: spb.DeleteLogsBeforeRequest) -> Json:
    """A job, as in Harper (get_job shows how many entries it deleted)."""

    async def work(job: Job) -> tuple[str, Json]:
        reply = await ex.node.call(
            ex.node.storage.DeleteLogsBefore, request, ex.caller.metadata, deadline_s=JOB_CALL_S
        )
        message = (
            f"deleted {reply.deleted_transactions} log entries and purged"
            f" {reply.purged_tombstones} tombstones"
        )
        result = {"deleted": reply.deleted_transactions, "purged": reply.purged_tombstones}
        return message, result

    return jobs.start(ex, "delete_audit_logs_before", work)


# -- revert ----------------------------------------------------------------------------------


def _transaction_version(body: Body) -> int:
    value = body.value("version")
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
    value = body.value("timestamp")
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


def parse_revert_transaction(body: Body) -> spb.RevertTransactionRequest:
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
    return request


async def revert_transaction(ex: Execute, request: spb.RevertTransactionRequest) -> Json:
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
