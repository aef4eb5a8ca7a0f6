"""Building one atomic RocksDB write: record states, index entries, the log entry,
positions, counters, the clock and any schema change, all in a single WriteBatch.

Two producers use it:
  * a local transaction (``LocalTransaction``): operations from a client are validated,
    combined per key (a transaction logs at most one write per record), merged at one
    new version, and logged with this node as origin;
  * remote transactions (Apply) and snapshot rows (MergeSnapshot), which merge states
    written elsewhere, keeping their origin and version.

Nothing here awaits: a batch is built and written in one synchronous step on the event
loop, so no other write can interleave between reading a record and writing it back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from shoal.storage.v1 import types_pb2

from services.common import jsonbytes, jsoninput
from services.common.errors import DataLoss, InvalidArgument, ResourceExhausted, shown
from services.common.hlc import version_ms
from services.storage import assigned, attribute_types, keys, merge, residency
from services.storage.merge import RecordState, Stamp
from services.storage.schema import SCHEMA_PREFIX, Table

if TYPE_CHECKING:
    from services.storage.engine import Engine

PUT = types_pb2.WRITE_KIND_PUT
PATCH = types_pb2.WRITE_KIND_PATCH
DELETE = types_pb2.WRITE_KIND_DELETE

HLC_KEY = b"hlc"
POSITION_PREFIX = b"pos/"
HORIZON_PREFIX = b"hzn/"
COUNT_PREFIX = b"count/"
UPDATED_PREFIX = b"updated/"  # updated/<tid> -> when this node last wrote a record of it
RESIDENCY_PREFIX = b"residency/"  # databases that hold records with residents
HANDOVER_PREFIX = b"handover/"  # handover/<db>\0<table>\0<key> -> state to hand over


def handover_key(table: Table, encoded_pk: bytes) -> bytes:
    """Meta key of a queued handover of a record."""
    return HANDOVER_PREFIX + f"{table.database}\0{table.name}\0".encode() + encoded_pk


def parse_handover_key(meta_key: bytes) -> tuple[str, str, bytes]:
    """(database, table, encoded key) of a queued handover's meta key."""
    database, table, key = meta_key[len(HANDOVER_PREFIX) :].split(b"\0", 2)
    return database.decode(), table.decode(), key


def position_key(prefix: bytes, database: str, origin: str) -> bytes:
    """Meta key of a position or horizon."""
    return prefix + database.encode() + b"\x00" + origin.encode()


def index_values(value: Any) -> set[bytes]:
    """Encoded index entries for an attribute value (each scalar element of an array)."""
    if isinstance(value, str | int | float) or value is None:
        return {keys.encode_value(value)}
    if isinstance(value, list):
        out: set[bytes] = set()
        for item in value:
            if not isinstance(item, dict | list):
                out.add(keys.encode_value(item))
        return out
    if isinstance(value, dict):
        return set()
    return {keys.encode_value(value)}


def apply_write(
    state: RecordState | None, stamp: Stamp, kind: int, doc: dict[str, Any]
) -> RecordState:
    """Merge one write into a state (dispatch on kind)."""
    if kind == PUT:
        return merge.put(state, stamp, doc)
    if kind == PATCH:
        return merge.patch(state, stamp, doc)
    return merge.delete(state, stamp)


class BatchWriter:
    """Accumulates one atomic write and the in-memory changes to install after it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        self.batch = self.store.batch()
        self._h = self.store.handle
        self._data = self._h["data"]
        self._index = self._h["index"]
        # States written by this batch, for later reads in it. A fresh PUT stores its
        # encoded state and is decoded only if read again (rare), keeping the hot path lean.
        self.overlay: dict[bytes, RecordState | bytes | None] = {}
        self.logkey = self._h["logkey"]
        self.count_delta: dict[int, int] = {}
        self.touched: set[int] = set()  # tables whose records this batch writes
        self.dirty_databases: set[str] = set()
        self.positions: dict[tuple[str, str], int] = {}
        self.horizons: dict[tuple[str, str], int] = {}
        self.last_version = 0
        self.empty = True
        self.residency_marks: set[str] = set()
        self.partial_marks: set[str] = set()
        # Records to hand over to their residents once this batch is written: (table,
        # encoded key, the meta key queuing the state). See Engine.hand_over.
        self.handovers: list[tuple[Table, bytes, bytes]] = []
        self._handover_states: dict[bytes, RecordState] = {}
        # Positions (database, origin) that now stand only for these tables (None: every
        # table; limited.py).
        self.limited_marks: dict[tuple[str, str], frozenset[str] | None] = {}

    # -- records -------------------------------------------------------------------

    def load(self, table: Table, encoded: list[bytes]) -> list[RecordState | None]:
        """Current states of records (this batch's own changes first)."""
        prefix = table.prefix
        overlay = self.overlay
        dkeys = [prefix + e for e in encoded]
        missing = [k for k in dkeys if k not in overlay] if overlay else dkeys
        raw = self.store.multi_get("data", missing)
        fetched = dict(zip(missing, raw, strict=True))
        decode = merge.decode_state
        out: list[RecordState | None] = []
        for k in dkeys:
            if k in overlay:
                mine = overlay[k]
                out.append(decode(mine) if isinstance(mine, bytes) else mine)
            else:
                value = fetched[k]
                out.append(None if value is None else decode(value))
        return out

    def set_state(
        self,
        table: Table,
        encoded_pk: bytes,
        old: RecordState | None,
        new: RecordState,
        encoded_state: bytes | None = None,
    ) -> None:
        """Store a record's new state with its index, tombstone and count effects."""
        if new is old:
            return
        self.empty = False
        self.touched.add(table.table_id)
        dkey = table.prefix + encoded_pk
        self.overlay[dkey] = new
        put = self.batch.put
        put(dkey, encoded_state or _encoded(table, encoded_pk, new), self._data)
        new_doc = new.doc
        if old is None:
            # A record this node never had: add index entries, no diff needed.
            for attribute in table.indexed:
                if attribute in new_doc:
                    iprefix = table.index_prefix(attribute)
                    for entry in index_values(new_doc[attribute]):
                        put(iprefix + entry + encoded_pk, b"", self._index)
            if new_doc:
                self.count_delta[table.table_id] = self.count_delta.get(table.table_id, 0) + 1
        else:
            self._index_diff(table, encoded_pk, old.doc, new_doc)
            if old.visible != new.visible:
                delta = 1 if new.visible else -1
                self.count_delta[table.table_id] = self.count_delta.get(table.table_id, 0) + delta
        if new.deleted and (old is None or old.base != new.base):
            put(keys.u64(new.base[0]) + dkey, b"", self._h["tomb"])
        if new_doc and not table.attributes.issuperset(new_doc):
            table.attributes.update(new_doc)
            self.dirty_databases.add(table.database)

    def put_new(
        self, table: Table, encoded_pk: bytes, doc: dict[str, Any], encoded_state: bytes
    ) -> None:
        """Store a PUT of a record this node does not have (the hot path of inserts and
        Apply): no diff, no tombstone, just the state, its index entries and the count."""
        self.touched.add(table.table_id)
        dkey = table.prefix + encoded_pk
        self.overlay[dkey] = encoded_state
        put = self.batch.put
        put(dkey, encoded_state, self._data)
        for attribute in table.indexed:
            if attribute in doc:
                iprefix = table.index_prefix(attribute)
                value = doc[attribute]
                if type(value) in _SCALARS:
                    put(iprefix + keys.encode_value(value) + encoded_pk, b"", self._index)
                else:
                    for entry in index_values(value):
                        put(iprefix + entry + encoded_pk, b"", self._index)
        self.count_delta[table.table_id] = self.count_delta.get(table.table_id, 0) + 1
        if not table.attributes.issuperset(doc):
            table.attributes.update(doc)
            self.dirty_databases.add(table.database)

    def remove(self, table: Table, encoded_pk: bytes, old: RecordState) -> None:
        """Delete a record outright (no tombstone), with its index entries."""
        self.empty = False
        self.touched.add(table.table_id)
        dkey = table.prefix + encoded_pk
        self.overlay[dkey] = None
        self.batch.delete(dkey, self._data)
        self._index_diff(table, encoded_pk, old.doc, {})
        if old.visible:
            self.count_delta[table.table_id] = self.count_delta.get(table.table_id, 0) - 1

    def _index_diff(
        self, table: Table, encoded_pk: bytes, old_doc: dict[str, Any], new_doc: dict[str, Any]
    ) -> None:
        for attribute in table.indexed:
            old_value = old_doc.get(attribute, _MISSING)
            new_value = new_doc.get(attribute, _MISSING)
            if (
                old_value == new_value
                and type(old_value) is type(new_value)
                and not isinstance(old_value, list)
            ):
                # Unchanged. Arrays always take the diff below: [1] == [True] in Python,
                # yet they index differently.
                continue
            old_entries = index_values(old_value) if old_value is not _MISSING else set()
            new_entries = index_values(new_value) if new_value is not _MISSING else set()
            iprefix = table.index_prefix(attribute)
            for entry in old_entries - new_entries:
                self.batch.delete(iprefix + entry + encoded_pk, self._index)
            for entry in new_entries - old_entries:
                self.batch.put(iprefix + entry + encoded_pk, b"", self._index)

    # -- log and positions -----------------------------------------------------------

    def log(self, txn: types_pb2.Transaction, local_time: int) -> None:
        """Append a transaction to the log with its (database, origin) entry. The callers
        add the audit-by-key entries (``logkey``) themselves, with ``audit_prefix``."""
        self.empty = False
        txn.local_time = local_time
        lt = keys.u64(local_time)
        self.batch.put(lt, txn.SerializeToString(), self._h["log"])
        self.batch.put(
            txn.database.encode() + b"\x00" + txn.origin.encode() + b"\x00" + keys.u64(txn.version),
            lt,
            self._h["logidx"],
        )
        self.last_version = max(self.last_version, local_time, txn.version)

    def set_position(self, database: str, origin: str, version: int) -> None:
        key = (database, origin)
        current = self.positions.get(key, self.engine.positions.get(key, 0))
        if version > current:
            self.positions[key] = version
            self.batch.put(
                position_key(POSITION_PREFIX, database, origin), keys.u64(version), self._h["meta"]
            )
            self.empty = False

    def raise_horizon(self, database: str, origin: str, version: int) -> None:
        key = (database, origin)
        current = self.horizons.get(key, self.engine.horizons.get(key, 0))
        if version > current:
            self.horizons[key] = version
            self.batch.put(
                position_key(HORIZON_PREFIX, database, origin), keys.u64(version), self._h["meta"]
            )
            self.empty = False

    def hand_over(self, table: Table, encoded_pk: bytes, payload: RecordState) -> None:
        """Queue, durably in this batch, a handover of a record to its residents (merged
        with one already queued for it)."""
        meta_key = handover_key(table, encoded_pk)
        queued = self._handover_states.get(meta_key)
        if queued is None:
            raw = self.store.meta.get(meta_key)
            queued = merge.decode_state(raw) if raw is not None else None
            self.handovers.append((table, encoded_pk, meta_key))
        if queued is not None:
            merged = merge.merge_states(merge.copy_state(queued), payload)
            merged.residents, merged.residents_stamp = payload.residents, payload.residents_stamp
            payload = merged
        self._handover_states[meta_key] = payload
        self.batch.put(meta_key, merge.encode_state(payload), self._h["meta"])
        self.empty = False

    def mark_residency(self, database: str) -> None:
        """Remember (durably, in this batch) that the database holds records with residents."""
        if database in self.engine.resident_databases or database in self.residency_marks:
            return
        self.residency_marks.add(database)
        self.batch.put(RESIDENCY_PREFIX + database.encode(), b"", self._h["meta"])

    def mark_schema(self, database: str) -> None:
        self.dirty_databases.add(database)
        self.empty = False

    # -- commit ------------------------------------------------------------------------

    def commit(self) -> bool:
        """Write everything atomically; False when there was nothing to write."""
        if self.empty:
            return False
        engine = self.engine
        meta = self._h["meta"]
        for table_id, delta in self.count_delta.items():
            table_count = engine.counts.get(table_id, 0) + delta
            self.batch.put(
                COUNT_PREFIX + keys.table_prefix(table_id), keys.u64(max(0, table_count)), meta
            )
        updated = keys.u64(max(self.last_version, engine.clock.last))
        for table_id in self.touched:
            self.batch.put(UPDATED_PREFIX + keys.table_prefix(table_id), updated, meta)
        for name in self.dirty_databases:
            db = engine.catalog.databases.get(name)
            if db is not None:
                self.batch.put(SCHEMA_PREFIX + name.encode(), db.encode(), meta)
        self.batch.put(b"next_table_id", keys.u64(engine.catalog.next_table_id), meta)
        if self.last_version:
            self.batch.put(HLC_KEY, keys.u64(max(self.last_version, engine.clock.last)), meta)
        try:
            self.store.write(self.batch)
        except Exception:
            engine.reload_catalog()
            raise
        for table_id, delta in self.count_delta.items():
            engine.counts[table_id] = max(0, engine.counts.get(table_id, 0) + delta)
        for table_id in self.touched:
            engine.updated[table_id] = keys.read_u64(updated)
        engine.positions.update(self.positions)
        engine.horizons.update(self.horizons)
        engine.resident_databases.update(self.residency_marks)
        engine.partial_databases.update(self.partial_marks)
        for key, tables in self.limited_marks.items():
            if tables is None:
                engine.limited.pop(key, None)
            else:
                engine.limited[key] = tables
        engine.commits += 1
        engine.notify_commit()
        return True


_MISSING: Any = object()
_SCALARS = frozenset((str, int, float, bool, type(None)))


@dataclass(slots=True)
class _Pending:
    """The combined effect of a transaction on one record."""

    table: Table
    encoded: bytes
    id_json: bytes  # the primary key as JSON
    old: RecordState | None
    kind: int
    operation: int
    doc: dict[str, Any]
    raw: bytes | None  # the client's JSON when the write was not combined with another


@dataclass
class OperationResult:
    """Keys written and skipped by one operation, as JSON scalars."""

    written: list[bytes] = field(default_factory=list)
    skipped: list[bytes] = field(default_factory=list)


Parsed = tuple[dict[str, Any], Any, bytes, bytes]  # (doc, pk, encoded pk, raw JSON)


def parse_record(
    raw: bytes, table: Table, position: int, max_depth: int, generate: bool = False
) -> Parsed:
    """(doc, pk, encoded pk, raw) of a JSON record, held to the nesting and integer
    limits (``jsoninput``) and to the table's attribute types (``attribute_types``);
    INVALID_ARGUMENT naming the record. With ``generate``, a record without its primary
    key gets a generated one (``assigned``)."""
    try:
        doc = jsoninput.loads(raw, max_depth)
    except jsoninput.Refused as exc:
        raise InvalidArgument(f"record {position}: {exc}") from None
    if type(doc) is not dict:
        raise InvalidArgument(f"record {position}: must be a JSON object")
    if table.types:
        attribute_types.check(doc, table.types)
    try:
        pk = doc[table.primary_key]
    except KeyError:
        declared = table.types.get(table.primary_key, "Any")
        if not generate or not attribute_types.accepts(declared, ""):
            because = "" if not generate else f" (a key of type {declared} is not generated)"
            raise InvalidArgument(
                f"record {position}: missing primary key attribute {table.primary_key!r}" + because
            ) from None
        pk = assigned.generated_key()
        raw = assigned.extended(doc, raw, {table.primary_key: pk})
    try:
        encoded = keys.encode_key(pk)
    except keys.InvalidKey as exc:
        raise InvalidArgument(
            f"record {position}: invalid primary key {shown(pk)}: {exc}"
        ) from None
    return doc, pk, encoded, raw


def parse_id(raw: bytes, position: int) -> tuple[Any, bytes]:
    """(pk, encoded pk) of a JSON scalar id; INVALID_ARGUMENT naming it."""
    try:
        pk = jsoninput.loads(raw, jsoninput.MAX_NESTING_DEPTH, "an id is a string or a number")
    except jsoninput.Refused as exc:
        raise InvalidArgument(f"id {position}: {exc}") from None
    try:
        return pk, keys.encode_key(pk)
    except keys.InvalidKey as exc:
        raise InvalidArgument(f"id {position}: invalid primary key {shown(pk)}: {exc}") from None


class LocalTransaction:
    """Operations of one client request, committed with one version and this node as origin.

    Operations see earlier operations of the same transaction. Validation errors raise
    before anything is written; ``commit`` writes everything or nothing.
    """

    def __init__(self, engine: Engine, database: str, user: str) -> None:
        self.engine = engine
        self.database = database
        self.user = user
        self.writer = BatchWriter(engine)
        self._pending: dict[bytes, _Pending] = {}
        self._tables: dict[str, Table] = {}
        self._records = 0  # records given so far, across the request's operations
        self.reverts: types_pb2.TransactionRef | None = None  # set by a revert
        self.placement = residency.Placement(engine, database)
        # data key -> (table, primary key, new residents), see rehome
        self._rehomed: dict[bytes, tuple[Table, Any, tuple[str, ...]]] = {}
        self._handovers: list[tuple[Table, bytes, RecordState]] = []

    def replicate_to(self, request: types_pb2.ReplicateTo | None) -> None:
        """The request's residency for records written for the first time."""
        self.placement.request(request)

    def _current(self, table: Table, encoded: list[bytes]) -> list[RecordState | None]:
        """Visible view: pre-transaction state with this transaction's writes applied."""
        if not self._pending:
            return self.writer.load(table, encoded)
        prefix = table.prefix
        need = [e for e in encoded if prefix + e not in self._pending]
        loaded = dict(zip(need, self.writer.load(table, need), strict=True))
        out: list[RecordState | None] = []
        for e in encoded:
            pending = self._pending.get(prefix + e)
            if pending is None:
                out.append(loaded[e])
            else:
                out.append(apply_write(pending.old, _PROVISIONAL, pending.kind, pending.doc))
        return out

    def _record(
        self,
        table: Table,
        item: Parsed,
        kind: int,
        operation: int,
        old: RecordState | None,
        id_json: bytes,
    ) -> None:
        doc, _, encoded, raw = item
        dkey = table.prefix + encoded
        pending = self._pending.get(dkey)
        if pending is None:
            self._pending[dkey] = _Pending(table, encoded, id_json, old, kind, operation, doc, raw)
            return
        # Combine with this transaction's earlier write of the same record.
        if kind == PATCH and pending.kind in (PUT, PATCH):
            pending.doc = {**pending.doc, **doc}
        else:
            pending.kind = kind
            pending.doc = doc
        pending.operation = operation
        pending.raw = None

    def _checked(
        self, records: Sequence[bytes], table: Table, generate: bool = False
    ) -> list[Parsed]:
        limit = self.engine.config.storage.max_records_per_request
        self._records += len(records)
        if self._records > limit:
            raise ResourceExhausted(
                f"{self._records} records in one request; the limit is {limit}"
                " (storage.maxRecordsPerRequest)"
            )
        self._tables[table.name] = table
        depth = self.engine.config.storage.max_nesting_depth
        parsed = [parse_record(r, table, i, depth, generate) for i, r in enumerate(records)]
        if len({p[2] for p in parsed}) != len(parsed):
            seen: set[bytes] = set()
            for i, (_, pk, encoded, _) in enumerate(parsed):
                if encoded in seen:
                    raise InvalidArgument(
                        f"record {i}: primary key {pk!r} appears twice in the request"
                    )
                seen.add(encoded)
        return parsed

    def _write(
        self,
        table: Table,
        records: Sequence[bytes],
        operation: int,
        choose: Callable[[RecordState | None], int | None],
        generate: bool = False,
    ) -> OperationResult:
        """Validate records, then record each as the write ``choose`` picks (None: skip).
        With ``generate``, records without a primary key get one (``assigned``)."""
        parsed = self._checked(records, table, generate)
        result = OperationResult()
        states = self._current(table, [p[2] for p in parsed])
        dumps = jsonbytes.dumps  # ids are kept for the response: exact-size bytes
        written = result.written
        now_ms = version_ms(self.engine.clock.peek()) if table.timestamps else 0
        for given, state in zip(parsed, states, strict=True):
            kind = choose(state)
            id_json = dumps(given[1])
            if kind is None:
                result.skipped.append(id_json)
                continue
            item = given
            if now_ms:
                stamps = assigned.timestamps(table, not _visible(state), now_ms)
                doc, pk, encoded, raw = given
                item = (doc, pk, encoded, assigned.extended(doc, raw, stamps))
            self._record(table, item, kind, operation, state, id_json)
            written.append(id_json)
        return result

    def insert(self, table: Table, records: Sequence[bytes]) -> OperationResult:
        """New records as PUTs; keys already visible are skipped."""
        return self._write(
            table,
            records,
            types_pb2.OPERATION_INSERT,
            lambda s: None if _visible(s) else PUT,
            generate=True,
        )

    def update(self, table: Table, records: Sequence[bytes]) -> OperationResult:
        """Attributes merged into visible records (PATCH); missing keys are skipped."""
        return self._write(
            table, records, types_pb2.OPERATION_UPDATE, lambda s: PATCH if _visible(s) else None
        )

    def upsert(self, table: Table, records: Sequence[bytes]) -> OperationResult:
        """PATCH visible records, PUT the others."""
        return self._write(
            table,
            records,
            types_pb2.OPERATION_UPSERT,
            lambda s: PATCH if _visible(s) else PUT,
            generate=True,
        )

    def merge_upsert(self, table: Table, records: Sequence[bytes]) -> OperationResult:
        """PATCH every record, present or not: concurrent upserts of a record new to
        their nodes then merge attribute by attribute instead of the newest replacing
        the whole record."""
        return self._write(
            table, records, types_pb2.OPERATION_UPSERT, lambda s: PATCH, generate=True
        )

    def delete(self, table: Table, ids: Sequence[bytes]) -> OperationResult:
        if not ids:
            raise InvalidArgument("no ids given")
        self._tables[table.name] = table
        parsed = [parse_id(raw, i) for i, raw in enumerate(ids)]
        result = OperationResult()
        states = self._current(table, [e for _, e in parsed])
        seen: set[bytes] = set()
        for (pk, encoded), state in zip(parsed, states, strict=True):
            id_json = jsonbytes.dumps(pk)
            if encoded in seen or state is None or not state.visible:
                result.skipped.append(id_json)
                continue
            seen.add(encoded)
            item: Parsed = ({}, pk, encoded, b"")
            self._record(table, item, DELETE, types_pb2.OPERATION_DELETE, state, id_json)
            result.written.append(id_json)
        return result

    def restore(
        self, table: Table, pk: Any, kind: int, operation: int, doc: dict[str, Any]
    ) -> None:
        """One write chosen by the caller whatever the record holds now (a revert setting
        a record back): a PUT of the whole ``doc``, a PATCH of its attributes, or a DELETE
        (``doc`` empty)."""
        self._tables[table.name] = table
        encoded = keys.encode_key(pk)
        old = self._current(table, [encoded])[0]
        raw = orjson.dumps(doc) if kind != DELETE else b""
        self._record(table, (doc, pk, encoded, raw), kind, operation, old, orjson.dumps(pk))

    def rehome(self, table: Table, pk: Any, residents: tuple[str, ...]) -> None:
        """Give a record new residents (the residency repair and rebalance). Its data does
        not change: the write carries the record's whole state (``Write.whole``, merged as
        a copied row is, keeping every attribute's version), so a new resident holding a
        stub holds the whole record after it and nothing newer is overwritten."""
        self._tables[table.name] = table
        self._rehomed[table.prefix + keys.encode_key(pk)] = (table, pk, residents)

    def hand_over(
        self, table: Table, encoded_pk: bytes, payload: RecordState, meta_key: bytes
    ) -> None:
        """Log a queued handover: the payload goes to the record's residents as a whole
        write under their own residency choice (nothing new is chosen), and its queue
        entry goes in the same write."""
        self._tables[table.name] = table
        self._handovers.append((table, encoded_pk, payload))
        self.writer.batch.delete(meta_key, self.writer.store.handle["meta"])

    def _log_rehome(
        self,
        table: Table,
        pk: Any,
        residents: tuple[str, ...],
        stamp: Stamp,
        txn: types_pb2.Transaction,
    ) -> None:
        """A re-homing: the record's state with its new residents, stored and logged."""
        encoded = keys.encode_key(pk)
        old = self.writer.load(table, [encoded])[0]
        if old is None or not old.visible:
            return  # deleted meanwhile: nothing to re-home
        new = residency.settle(
            table, self.engine.node_name, old, merge.copy_state(old), residents, stamp, False
        )
        self.writer.set_state(table, encoded, old, new)
        state = merge.copy_state(old)
        state.residents, state.residents_stamp, state.stub = residents, stamp, False
        txn.writes.add(
            table=table.name,
            kind=PATCH,
            operation=types_pb2.OPERATION_UPDATE,
            id=orjson.dumps(pk),
            value=merge.encode_state(state),
            residents=residents,
            whole=True,
            residents_version=stamp[0],
            residents_origin=stamp[1],
        )
        self.writer.batch.put(
            keys.audit_prefix(self.database, table.name) + encoded + keys.u64(stamp[0]),
            b"",
            self.writer.logkey,
        )

    def written_residency(self) -> list[tuple[str, tuple[str, ...], bool]]:
        """Before ``commit``, for write confirmation: each record the transaction writes,
        as (its table, the residents the commit gives it (empty: none), whether this node
        holds it whole after the commit). The residents are chosen as ``commit`` chooses
        them (the same placement, its member list read once)."""
        placement = self.placement if self.placement.active or self._rehomed else None
        me = self.engine.node_name
        out = []
        for p in self._pending.values():
            if placement is not None:
                residents = placement.residents(p.table, p.encoded, p.old)
            else:
                residents = p.old.residents if p.old is not None else ()
            stub_here = p.old is not None and p.old.stub
            whole = not residents or (me in residents and not stub_here)
            out.append((p.table.name, residents, whole))
        return out

    def commit(self, extra_schema: Iterable[Table] = ()) -> int:
        """Write the transaction; returns its version (0 when it wrote nothing). When it
        fails before the write (a record that cannot be stored), nothing is written and
        the in-memory schema is read back from the store."""
        try:
            return self._commit(list(extra_schema))
        except Exception:
            self.engine.reload_catalog()
            raise

    def _commit(self, schema_tables: list[Table]) -> int:
        if not self._pending and not schema_tables and not self._rehomed and not self._handovers:
            return 0
        engine = self.engine
        version = engine.clock.now()
        stamp: Stamp = (version, engine.node_name)
        txn = types_pb2.Transaction(
            origin=engine.node_name, version=version, user=self.user, database=self.database
        )
        if self.reverts is not None:
            txn.reverts.CopyFrom(self.reverts)
        writer = self.writer
        add = txn.writes.add
        put = writer.batch.put
        dumps = orjson.dumps
        lt = keys.u64(version)
        state_prefix = b"[%d,%s,false," % (version, dumps(engine.node_name))
        audit = {name: keys.audit_prefix(self.database, name) for name in self._tables}
        written: dict[str, int] = {}
        moving = self._rehomed or self._handovers
        placement = self.placement if self.placement.active or moving else None
        if placement is not None:
            writer.mark_residency(self.database)
        for table, encoded_pk, payload in self._handovers:
            txn.writes.add(
                table=table.name,
                kind=PATCH,
                operation=types_pb2.OPERATION_UPDATE,
                id=orjson.dumps(keys.decode_value(encoded_pk)[0]),
                value=merge.encode_state(payload),
                residents=payload.residents,
                whole=True,
                residents_version=payload.residents_stamp[0],
                residents_origin=payload.residents_stamp[1],
            )
        for table, pk, residents in self._rehomed.values():
            self._log_rehome(table, pk, residents, stamp, txn)
        for p in self._pending.values():
            name = p.table.name
            written[name] = written.get(name, 0) + 1
            if placement is not None:
                residents = placement.residents(p.table, p.encoded, p.old)
                # The stamp of the choice: this write when it places the record, else
                # the one that chose the residents it keeps.
                chosen: Stamp = stamp
                if p.old is not None and p.old.residents:
                    chosen = p.old.residents_stamp
                state = apply_write(p.old, stamp, p.kind, p.doc)
                state = residency.settle(
                    p.table, engine.node_name, p.old, state, residents, chosen, False
                )
                writer.set_state(p.table, p.encoded, p.old, state)
                write = add(
                    table=name,
                    kind=p.kind,
                    operation=p.operation,
                    id=p.id_json,
                    residents=residents,
                    residents_version=chosen[0],
                    residents_origin=chosen[1],
                )
                if p.kind != DELETE:
                    write.value = p.raw if p.raw is not None else dumps(p.doc)
                if p.old is not None and p.old.visible:
                    write.prior = merge.doc_json(p.old.doc)
            elif p.kind == PUT and p.old is None and p.raw is not None:
                # The common case of a new record: store the client's JSON as it came
                # (merge.encode_put_state, inlined).
                writer.put_new(p.table, p.encoded, p.doc, state_prefix + p.raw + b",{}]")
                add(table=name, kind=PUT, operation=p.operation, id=p.id_json, value=p.raw)
            else:
                writer.set_state(
                    p.table, p.encoded, p.old, apply_write(p.old, stamp, p.kind, p.doc)
                )
                write = add(table=name, kind=p.kind, operation=p.operation, id=p.id_json)
                if p.kind != DELETE:
                    write.value = p.raw if p.raw is not None else dumps(p.doc)
                if p.old is not None and p.old.visible:
                    write.prior = merge.doc_json(p.old.doc)
            put(audit[name] + p.encoded + lt, b"", writer.logkey)
        touched = dict(self._tables)
        for table in schema_tables:
            touched[table.name] = table
        for table in touched.values():
            with_attributes = any(table is t for t in schema_tables)
            txn.tables.append(table_schema(table, with_attributes=with_attributes))
        self.writer.log(txn, version)
        self.writer.set_position(self.database, engine.node_name, version)
        self.writer.commit()
        engine.local_transactions += 1
        by_table = engine.records_written
        for name, count in written.items():
            key = (self.database, name)
            by_table[key] = by_table.get(key, 0) + count
        return version


def _encoded(table: Table, encoded_pk: bytes, state: RecordState) -> bytes:
    """The stored form of a state; DATA_LOSS when it cannot be written: a record an older
    version stored nested deeper than JSON output allows, written again without
    replacing its deep attributes."""
    try:
        return merge.encode_state(state)
    except orjson.JSONEncodeError:
        pk = keys.decode_value(encoded_pk)[0]
        raise DataLoss(
            f"record {shown(pk)} of {table.database}.{table.name} nests deeper than JSON"
            " output allows (stored before storage.maxNestingDepth existed) and cannot be"
            " written back: delete it, or write new values for its deep attributes",
            reason="UNREADABLE_RECORDS",
        ) from None


def _visible(state: RecordState | None) -> bool:
    return state is not None and state.visible


# A placeholder version newer than anything stored, used only to compute the visible
# view of a record inside a transaction before its real version is assigned.
_PROVISIONAL: Stamp = (1 << 64, "")


def table_schema(table: Table, with_attributes: bool = False) -> types_pb2.TableSchema:
    """The replicated form of a table's schema."""
    return types_pb2.TableSchema(
        name=table.name,
        primary_key=table.primary_key,
        indexed_attributes=table.indexed,
        replicate=table.replicate,
        attributes=sorted(table.attributes) if with_attributes else (),
        attribute_types=table.types if with_attributes else {},
        schema_defined=table.schema_defined,
        record_timestamps=table.timestamps,
    )
