"""Building one atomic RocksDB write: record states, index entries, the log entry,
positions, counters, the clock and any schema change, all in a single WriteBatch.

Two producers use it:
  * a local transaction (``LocalTransaction``, ``transaction.py``): operations from a
    client are validated, combined per key (a transaction logs at most one write per
    record), merged at one new version, and logged with this node as origin;
  * remote transactions (Apply) and snapshot rows (MergeSnapshot), which merge states
    written elsewhere, keeping their origin and version.

Nothing here awaits: a batch is built and written in one synchronous step on the event
loop, so no other write can interleave between reading a record and writing it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from shoal.storage.v1 import types_pb2

from services.common.errors import DataLoss, shown
from services.storage import keys, merge
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
