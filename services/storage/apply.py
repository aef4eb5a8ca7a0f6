"""Apply: transactions committed elsewhere merged into this node, each with its origin
and version, in one ``BatchWriter`` write (see the Apply RPC contract). Writes of records
with residents are merged as residency has them (``residency.py``): their full form on a
resident, a stub elsewhere, with handovers queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from shoal.storage.v1 import types_pb2

from services.common import jsoninput
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.hlc import format_version
from services.storage import copy, keys, limited, merge, residency
from services.storage.commit import DELETE, PATCH, PUT, BatchWriter, apply_write
from services.storage.schema import Table, check_name

if TYPE_CHECKING:
    from services.storage.engine import Engine

_WRITE_KINDS = frozenset((PUT, PATCH, DELETE))


@dataclass
class ApplyResult:
    """Outcome of applying remote transactions."""

    applied: int = 0
    skipped: int = 0
    positions: dict[tuple[str, str], int] = field(default_factory=dict)
    fenced: set[str] = field(default_factory=set)  # databases left unapplied (fence.py)


def apply_transactions(
    engine: Engine,
    transactions: list[types_pb2.Transaction],
    max_clock_skew_ms: int,
    partial: bool = False,
    tables: set[tuple[str, str]] | None = None,
) -> ApplyResult:
    """Apply transactions committed elsewhere (see the Apply RPC contract); with
    ``partial``, their databases' positions are marked partial, and with ``tables``
    (a subscription to those tables only) limited to them (copy.py)."""
    for i, txn in enumerate(transactions):
        if not txn.origin or not txn.database or txn.version == 0:
            raise InvalidArgument(f"transaction {i}: origin, database and version are required")
        own = engine.positions.get((txn.database, txn.origin), 0)
        if txn.origin == engine.node_name and txn.version > own:
            raise InvalidArgument(
                f"transaction {i} claims to come from this node ({txn.origin}) at a version"
                " it never committed: a node's own writes start only on that node"
            )
        check_name("database", txn.database)
        if max_clock_skew_ms:
            ahead = engine.clock.ahead_ms(txn.version)
            if ahead > max_clock_skew_ms:
                raise FailedPrecondition(
                    f"transaction {format_version(txn.version)} from {txn.origin} is"
                    f" {ahead / 1000:.1f} s ahead of this node's clock (maxClockSkew"
                    f" {max_clock_skew_ms / 1000:.0f} s); check the clock of {txn.origin}",
                    reason="CLOCK_SKEW",
                    metadata={"origin": txn.origin, "ahead_ms": str(ahead)},
                )
    result = ApplyResult()
    writer = BatchWriter(engine)
    try:
        for txn in transactions:
            key = (txn.database, txn.origin)
            if txn.version <= writer.positions.get(key, engine.positions.get(key, 0)):
                result.skipped += 1
                continue
            if txn.database in engine.fences:
                # Being handed over: not applied, so its position stays before it
                # (the caller subscribes again to receive it).
                result.fenced.add(txn.database)
                continue
            _apply_one(engine, writer, txn)
            if partial:
                copy.mark_partial(engine, writer, txn.database)
            if tables is not None:
                limited.narrow(engine, writer, key, (t for d, t in tables if d == txn.database))
            result.applied += 1
    except Exception:
        engine.reload_catalog()
        raise
    writer.commit()
    engine.hand_over(writer.handovers)
    engine.applied_transactions += result.applied
    engine.skipped_transactions += result.skipped
    for txn in transactions:
        key = (txn.database, txn.origin)
        result.positions[key] = engine.positions.get(key, 0)
    return result


def _apply_one(engine: Engine, writer: BatchWriter, txn: types_pb2.Transaction) -> None:
    database = txn.database
    origin = txn.origin
    version = txn.version
    tables: dict[str, Table] = {}
    for schema in txn.tables:
        tables[schema.name] = engine._ensure_table(writer, database, schema)
    if not txn.writes and txn.tables:
        writer.mark_schema(database)
    writes = txn.writes
    groups: dict[str, list[types_pb2.Write]] = {}
    for w in writes:
        groups.setdefault(w.table, []).append(w)
    for table_name, group in groups.items():
        check_name("table", table_name)
        if any(w.kind not in _WRITE_KINDS for w in group):
            raise InvalidArgument(f"{origin} {table_name}: a write has no valid kind")
    engine.clock.observe(version)
    local_time = engine.clock.now()
    lt = keys.u64(local_time)
    stamp = (version, origin)
    depth = engine.config.storage.max_nesting_depth
    loads = jsoninput.loads
    encode_key = keys.encode_key
    state_prefix = b"[%d,%s,false," % (version, orjson.dumps(origin))
    put = writer.batch.put
    for table_name, group in groups.items():
        table = tables.get(table_name) or engine.catalog.find_table(database, table_name)
        if table is None:
            default = types_pb2.TableSchema(name=table_name, primary_key="id", replicate=True)
            table = engine._ensure_table(writer, database, default)
        try:
            encoded = [encode_key(loads(w.id, depth)) for w in group]
        except (jsoninput.Refused, keys.InvalidKey) as exc:
            raise InvalidArgument(f"{origin} {table_name}: invalid record id ({exc})") from None
        states = writer.load(table, encoded)
        audit = keys.audit_prefix(database, table_name)
        for w, key, old in zip(group, encoded, states, strict=True):
            kind = w.kind
            if w.residents:
                _apply_resident(engine, writer, table, key, old, w, stamp)
            elif kind == DELETE:
                writer.set_state(table, key, old, merge.delete(old, stamp))
            else:
                raw = w.value
                try:
                    doc = loads(raw, depth)
                except jsoninput.Refused as exc:
                    raise InvalidArgument(f"{origin} {table_name}: value {exc}") from None
                if type(doc) is not dict:
                    raise InvalidArgument(f"{origin} {table_name}: value is not an object")
                if kind == PUT and old is None:
                    writer.put_new(table, key, doc, state_prefix + raw + b",{}]")
                else:
                    writer.set_state(table, key, old, apply_write(old, stamp, kind, doc))
            if old is not None and old.visible:
                w.prior = merge.doc_json(old.doc)
            elif w.prior:
                w.prior = b""
            put(audit + key + lt, b"", writer.logkey)
    writer.log(txn, local_time)
    writer.set_position(database, origin, version)


def _apply_resident(
    engine: Engine,
    writer: BatchWriter,
    table: Table,
    key: bytes,
    old: merge.RecordState | None,
    write: types_pb2.Write,
    stamp: merge.Stamp,
) -> None:
    """Merge a write of a record with residents: its full form here on a resident,
    its stub elsewhere (services/storage/residency.py)."""
    residents = tuple(write.residents)
    writer.mark_residency(table.database)
    depth = engine.config.storage.max_nesting_depth
    theirs: merge.RecordState | None = None
    if write.whole:
        try:
            theirs = merge.decode_incoming_state(write.value, depth)
        except ValueError as exc:
            raise InvalidArgument(f"{table.name}: a re-homing's state is invalid: {exc}") from None
        new = residency.merge_whole(old, theirs, engine.node_name)
    elif write.kind == DELETE:
        new = merge.delete(old, stamp)
        theirs = residency.write_state(write.kind, stamp, {})
    else:
        try:
            doc = jsoninput.loads(write.value, depth)
        except jsoninput.Refused as exc:
            raise InvalidArgument(f"{table.name}: value {exc}") from None
        if type(doc) is not dict:
            raise InvalidArgument(f"{table.name}: value is not an object")
        new = apply_write(old, stamp, write.kind, doc)
        theirs = residency.write_state(write.kind, stamp, doc)
    chosen = (write.residents_version, write.residents_origin) if write.residents_version else stamp
    node = engine.node_name
    # A stub of a write that a newer whole-record write here supersedes lacks nothing.
    superseded = not write.whole and old is not None and stamp <= old.base
    settled = residency.settle(
        table,
        node,
        old,
        new,
        residents,
        chosen,
        write.stub and not superseded,
        None if write.whole else stamp,
    )
    # Sent whole because its sender counted this node a resident: the residents the
    # record has now may have received it only as a stub.
    whole_to_me = theirs if not write.stub and node in residents else None
    payload = residency.handover_payload(
        node, old, settled, whole_to_me, theirs if write.whole and not write.stub else None
    )
    if payload is not None:
        writer.hand_over(table, key, payload)
    if settled.stub and node in settled.residents:
        engine.stubs_on_residents += 1  # the residency worker heals it (repair.py)
    writer.set_state(table, key, old, settled)
