"""A local transaction: operations of one client request (insert, update, upsert, delete,
restores, re-homings and handovers), validated, combined per key (a transaction logs at
most one write per record), merged at one new version and logged with this node as
origin, all in one ``BatchWriter`` write (``commit.py``). Also the parsing of the JSON
records and ids a client gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from shoal.storage.v1 import types_pb2

from services.common import jsonbytes, jsoninput
from services.common.errors import InvalidArgument, ResourceExhausted, shown
from services.common.hlc import version_ms
from services.storage import assigned, attribute_types, keys, merge, residency
from services.storage.commit import DELETE, PATCH, PUT, BatchWriter, apply_write, table_schema
from services.storage.merge import RecordState, Stamp
from services.storage.schema import Table

if TYPE_CHECKING:
    from services.storage.engine import Engine


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
        moving = self._rehomed or self._handovers
        placement = self.placement if self.placement.active or moving else None
        if placement is not None:
            self.writer.mark_residency(self.database)
        self._log_handovers(txn)
        for table, pk, residents in self._rehomed.values():
            self._log_rehome(table, pk, residents, stamp, txn)
        written = self._write_pending(placement, stamp, txn)
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

    def _log_handovers(self, txn: types_pb2.Transaction) -> None:
        """Each queued handover as a whole write of its payload."""
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

    def _write_pending(
        self,
        placement: residency.Placement | None,
        stamp: Stamp,
        txn: types_pb2.Transaction,
    ) -> dict[str, int]:
        """Store and log each record the transaction writes; the records written per
        table."""
        engine = self.engine
        version = stamp[0]
        writer = self.writer
        add = txn.writes.add
        put = writer.batch.put
        dumps = orjson.dumps
        lt = keys.u64(version)
        state_prefix = b"[%d,%s,false," % (version, dumps(engine.node_name))
        audit = {name: keys.audit_prefix(self.database, name) for name in self._tables}
        written: dict[str, int] = {}
        for p in self._pending.values():
            name = p.table.name
            written[name] = written.get(name, 0) + 1
            if placement is not None:
                self._write_placed(p, placement, stamp, txn)
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
        return written

    def _write_placed(
        self,
        p: _Pending,
        placement: residency.Placement,
        stamp: Stamp,
        txn: types_pb2.Transaction,
    ) -> None:
        """Store and log one record's write with the residents the placement gives it."""
        residents = placement.residents(p.table, p.encoded, p.old)
        # The stamp of the choice: this write when it places the record, else
        # the one that chose the residents it keeps.
        chosen: Stamp = stamp
        if p.old is not None and p.old.residents:
            chosen = p.old.residents_stamp
        state = apply_write(p.old, stamp, p.kind, p.doc)
        state = residency.settle(
            p.table, self.engine.node_name, p.old, state, residents, chosen, False
        )
        self.writer.set_state(p.table, p.encoded, p.old, state)
        write = txn.writes.add(
            table=p.table.name,
            kind=p.kind,
            operation=p.operation,
            id=p.id_json,
            residents=residents,
            residents_version=chosen[0],
            residents_origin=chosen[1],
        )
        if p.kind != DELETE:
            write.value = p.raw if p.raw is not None else orjson.dumps(p.doc)
        if p.old is not None and p.old.visible:
            write.prior = merge.doc_json(p.old.doc)


def _visible(state: RecordState | None) -> bool:
    return state is not None and state.visible


# A placeholder version newer than anything stored, used only to compute the visible
# view of a record inside a transaction before its real version is assigned.
_PROVISIONAL: Stamp = (1 << 64, "")
