"""Backups, storage side: the consistent Backup stream and Restore.

Backup reads one database from one consistent point: an iterator over the data column
family and one over the log are created in the same synchronous step that reads the
positions, horizons, schema and clock (no write can run in between: writes happen on
this event loop). It streams the rows of every table, ``replicate: false`` ones
included, then the database's retained log, in bounded batches.

Restore writes such a stream back into a database that does not exist or has no rows.
Rows are merged as they are (their versions and origins kept). A logged transaction at
or below the restored position of its origin is already reflected by the rows: it is
only appended to this node's log (under a new local time, keeping its origin and
version), so the audit log, revert and relaying keep working. A transaction above it and
at or below ``replay_until`` is applied exactly as Apply does (point-in-time replay).
Positions become the restored ones only at the end, so a node never claims data it does
not hold yet; horizons are set at the start, so no subscriber is served a log with a gap.

A restore marks the database (``meta: restore/<database>``) in its first write and clears
the mark in its last. A dry run checks the whole stream and writes nothing; the admin
service runs one before every restore, so a rejected archive changes nothing. A restore
interrupted after that (the process stopped) leaves the mark, and the next restore of
the database drops the partial database and starts over.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import orjson
import rocksdict
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.common import jsoninput
from services.common.errors import FailedPrecondition, InvalidArgument, shown
from services.common.hlc import MAX_VERSION, format_version
from services.storage import keys, limited, merge
from services.storage import log as txlog
from services.storage.commit import (
    DELETE,
    HORIZON_PREFIX,
    PATCH,
    POSITION_PREFIX,
    PUT,
    BatchWriter,
    position_key,
    table_schema,
)
from services.storage.copy import CATCHING_UP_PREFIX
from services.storage.engine import RESERVED_DATABASES, Engine
from services.storage.schema import Table, check_name
from services.storage.snapshot import row_batches

log = logging.getLogger("shoal.storage.backup")

RESTORE_PREFIX = b"restore/"
DEFAULT_ITEMS = 1000
DEFAULT_BYTES = 1024 * 1024
# Log entries of other databases skipped between two (possibly empty) batches, so a long
# stretch of them does not hold the event loop.
SCAN_SLICE = 10_000
_KINDS = frozenset((PUT, PATCH, DELETE))


def _not_reserved(database: str) -> None:
    if database in RESERVED_DATABASES:
        raise InvalidArgument(
            f"database {database!r} is Shoal's own; it cannot be backed up or restored"
        )


# -- Backup ------------------------------------------------------------------------------


@dataclass
class BackupPlan:
    """What a Backup stream sends: the header, then row batches, then log batches (a log
    batch may be empty: a pause in a long scan)."""

    header: pb.BackupHeader
    rows: Iterator[list[types_pb2.SnapshotRow]]
    transactions: Iterator[list[types_pb2.Transaction]]


def plan_backup(engine: Engine, request: pb.BackupRequest) -> BackupPlan:
    """Fix the consistent point and describe the stream."""
    check_name("database", request.database)
    _not_reserved(request.database)
    database = engine.catalog.database(request.database)
    if request.max_batch_items > 100_000 or request.max_batch_bytes > 64 * 1024 * 1024:
        raise InvalidArgument(
            "max_batch_items must be at most 100000 and max_batch_bytes at most 64 MiB"
        )
    max_items = request.max_batch_items or DEFAULT_ITEMS
    max_bytes = request.max_batch_bytes or DEFAULT_BYTES
    tables = sorted(database.tables.values(), key=lambda t: t.name)
    # The consistent point: both iterators, then everything else, with no await between.
    data = engine.store.data.iter()
    log_iterator = engine.store.log.iter()
    start = _first_local_time(engine, database.name)

    def pick(items: dict[tuple[str, str], int]) -> list[types_pb2.Position]:
        return [
            types_pb2.Position(database=d, origin=o, version=v)
            for (d, o), v in sorted(items.items())
            if d == database.name
        ]

    header = pb.BackupHeader(
        database=database.name,
        node_name=engine.node_name,
        node_time=engine.clock.peek(),
        positions=pick(engine.positions),
        horizons=pick(engine.horizons),
        tables=[table_schema(t, with_attributes=True) for t in tables],
        estimated_rows=sum(engine.counts.get(t.table_id, 0) for t in tables),
    )
    return BackupPlan(
        header,
        row_batches(data, tables, "", b"", max_items, max_bytes),
        _log_batches(log_iterator, database.name, start, max_items, max_bytes),
    )


def _first_local_time(engine: Engine, database: str) -> int | None:
    """The earliest local time of the database's log entries (None: it has none).

    An origin's entries are logged in version order, so its first ``logidx`` entry is
    also its earliest in the log: one seek per origin.
    """
    prefix = database.encode() + b"\x00"
    first: int | None = None
    iterator = engine.store.logidx.iter()
    iterator.seek(prefix)
    while iterator.valid() and iterator.key().startswith(prefix):
        local_time = keys.read_u64(iterator.value())
        first = local_time if first is None else min(first, local_time)
        origin = iterator.key()[len(prefix) :].split(b"\x00", 1)[0]
        iterator.seek(prefix + origin + b"\x01")
    return first


def _log_batches(
    iterator: rocksdict.RdictIter,
    database: str,
    start: int | None,
    max_items: int,
    max_bytes: int,
) -> Iterator[list[types_pb2.Transaction]]:
    if start is None:
        return
    iterator.seek(keys.u64(start))
    batch: list[types_pb2.Transaction] = []
    size = 0
    scanned = 0
    while iterator.valid():
        value = iterator.value()
        txn = types_pb2.Transaction.FromString(value)
        if txn.database == database:
            batch.append(txn)
            size += len(value)
        scanned += 1
        if len(batch) >= max_items or size >= max_bytes or scanned >= SCAN_SLICE:
            yield batch
            batch = []
            size = 0
            scanned = 0
        iterator.next()
    if batch:
        yield batch


# -- Restore -----------------------------------------------------------------------------


@dataclass
class RestoreOutcome:
    """What a restore did (or, in a dry run, would do)."""

    rows: int = 0
    logged: int = 0
    applied: int = 0
    skipped: int = 0
    positions: dict[str, int] = field(default_factory=dict)

    def response(self, database: str) -> pb.RestoreResponse:
        return pb.RestoreResponse(
            rows=self.rows,
            logged_transactions=self.logged,
            applied_transactions=self.applied,
            skipped_transactions=self.skipped,
            positions=[
                types_pb2.Position(database=database, origin=o, version=v)
                for o, v in sorted(self.positions.items())
            ],
        )


def _versions(items: Iterable[types_pb2.Position], database: str, what: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in items:
        if not p.origin or p.database not in ("", database):
            raise InvalidArgument(
                f"every {what} needs an origin and the restored database (got"
                f" {p.database!r}/{p.origin!r})"
            )
        out[p.origin] = max(out.get(p.origin, 0), p.version)
    return out


def _has_rows(engine: Engine, table: Table) -> bool:
    iterator = engine.store.data.iter()
    iterator.seek(table.prefix)
    return bool(iterator.valid() and iterator.key().startswith(table.prefix))


class RestoreSession:
    """One Restore stream: created from its header, fed rows then transactions."""

    def __init__(self, engine: Engine, header: pb.RestoreHeader) -> None:
        self.engine = engine
        self._depth = engine.config.storage.max_nesting_depth
        self.database = header.database
        self.dry_run = header.dry_run
        self.replay_until = header.replay_until
        self.source = header.source or "a backup"
        self._running = engine.restoring
        self._registered = False
        # This node's own last position of the database before the restore (a dropped
        # database keeps its positions): its writes after the backup are only on peers.
        self.own_before = 0
        self.tables: dict[str, types_pb2.TableSchema] = {}
        self.interrupted = False  # an earlier restore of the database did not finish
        self._check_header(header)
        self.positions = _versions(header.positions, self.database, "position")
        self.horizons = _versions(header.horizons, self.database, "horizon")
        self.outcome = RestoreOutcome(positions=dict(self.positions))
        self._last_row: tuple[str, bytes] | None = None
        self._last_version: dict[str, int] = {}
        self._in_log = False
        self._transactions_seen = 0
        self._rows_seen = 0
        if not self.dry_run:
            self._running.add(self.database)
            self._registered = True
            try:
                self._begin()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Release the database for other restores (call once the stream is over)."""
        if self._registered:
            self._running.discard(self.database)
            self._registered = False

    # -- checks ----------------------------------------------------------------------

    def _check_header(self, header: pb.RestoreHeader) -> None:
        name = self.database
        check_name("database", name)
        _not_reserved(name)
        for schema in header.tables:
            check_name("table", schema.name)
            check_name("primary key attribute", schema.primary_key)
            for attribute in (*schema.indexed_attributes, *schema.attributes):
                check_name("attribute", attribute)
            if schema.name in self.tables:
                raise InvalidArgument(f"table {schema.name!r} appears twice in the header")
            self.tables[schema.name] = schema
        engine = self.engine
        if name in self._running:
            raise FailedPrecondition(f"a restore of database {name!r} is already running")
        copy = next((c for (d, _), c in engine.copies.items() if d == name), None)
        if copy is not None:
            raise FailedPrecondition(
                f"a copy of database {name!r} from {copy.source} into this node is in"
                " progress; restore after it completes, or under another name"
            )
        database = engine.catalog.databases.get(name)
        self.interrupted = engine.store.meta.get(RESTORE_PREFIX + name.encode()) is not None
        if database is None or self.interrupted:
            return
        for table in sorted(database.tables.values(), key=lambda t: t.name):
            if _has_rows(engine, table):
                raise FailedPrecondition(
                    f"database {name!r} is not empty (table {table.name!r} has rows): a"
                    " backup is restored only into a database that does not exist or has"
                    " no rows; drop it first, or restore under another name",
                    reason="DATABASE_NOT_EMPTY",
                )
            wanted = self.tables.get(table.name)
            if wanted is not None and wanted.primary_key != table.primary_key:
                raise FailedPrecondition(
                    f"table {name}.{table.name} exists with primary key"
                    f" {table.primary_key!r}, the backup's has {wanted.primary_key!r}"
                )

    def _check_rows(
        self, rows: list[types_pb2.SnapshotRow]
    ) -> list[tuple[str, bytes, merge.RecordState, bytes]]:
        parsed: list[tuple[str, bytes, merge.RecordState, bytes]] = []
        for row in rows:
            self._rows_seen += 1
            where = f"row {self._rows_seen} (table {row.table!r})"
            if row.table not in self.tables:
                raise InvalidArgument(f"{where}: the table is not in the header")
            try:
                encoded = keys.encode_key(orjson.loads(row.id))
            except (orjson.JSONDecodeError, keys.InvalidKey) as exc:
                raise InvalidArgument(
                    f"{where}: invalid primary key {shown(row.id)}: {exc}"
                ) from None
            try:
                state = merge.decode_incoming_state(row.state, self._depth)
            except ValueError as exc:
                raise InvalidArgument(f"{where}: {exc}") from None
            order = (row.table, encoded)
            if self._last_row is not None and order <= self._last_row:
                raise InvalidArgument(f"{where}: rows are not in key order, or repeat a key")
            self._last_row = order
            parsed.append((row.table, encoded, state, row.state))
        return parsed

    def _check_transaction(self, txn: types_pb2.Transaction) -> None:
        self._transactions_seen += 1
        where = f"transaction {self._transactions_seen}"
        if not txn.origin or txn.version == 0:
            raise InvalidArgument(f"{where}: origin and version are required")
        if txn.database and txn.database != self.database:
            raise InvalidArgument(f"{where} is of database {txn.database!r}, not {self.database!r}")
        txn.database = self.database
        last = self._last_version.get(txn.origin, 0)
        if txn.version <= last:
            raise InvalidArgument(
                f"{where}: versions of origin {txn.origin} must increase along the log"
                f" ({txn.version} after {last})"
            )
        self._last_version[txn.origin] = txn.version
        for schema in txn.tables:
            check_name("table", schema.name)
        for w in txn.writes:
            check_name("table", w.table)
            if w.kind not in _KINDS:
                raise InvalidArgument(f"{where}: a write to {w.table!r} has no valid kind")
            try:
                keys.encode_key(orjson.loads(w.id))
            except (orjson.JSONDecodeError, keys.InvalidKey) as exc:
                raise InvalidArgument(f"{where}: invalid record id {shown(w.id)}: {exc}") from None
            try:
                self._check_values(w)
            except jsoninput.Refused as exc:
                raise InvalidArgument(f"{where}: a write to {w.table!r}: {exc}") from None

    def _check_values(self, w: types_pb2.Write) -> None:
        """A logged write's value and prior, held to the JSON limits: the log RPCs return
        them as they are (jsoninput.Refused when they break one, or are not JSON)."""
        if w.kind != DELETE:
            if w.whole:
                merge.decode_incoming_state(w.value, self._depth)
            elif type(jsoninput.loads(w.value, self._depth)) is not dict:
                raise jsoninput.NotJson("its value is not a JSON object")
        if w.prior and type(jsoninput.loads(w.prior, self._depth)) is not dict:
            raise jsoninput.NotJson("its prior record is not a JSON object")

    # -- writes ----------------------------------------------------------------------

    def _begin(self) -> None:
        """First write: clear the database's stale positions and horizons, set the
        restored horizons, mark the restore, create the database and its tables."""
        engine = self.engine
        name = self.database
        if self.interrupted and name in engine.catalog.databases:
            log.info("restore of %s: dropping the partial database of an earlier restore", name)
            engine.drop_database(name, internal=True)
        if _first_local_time(engine, name) is not None:
            # The log of a dropped (or emptied) database of that name: the restored log
            # replaces it, as the restored positions replace its positions.
            removed, _ = txlog.purge_before(engine, MAX_VERSION, name)
            log.info("restore of %s: removed %d log entries of its earlier life", name, removed)
        stale = [k for k in (*engine.positions, *engine.horizons) if k[0] == name]
        self.own_before = max(
            engine.positions.get((name, engine.node_name), 0),
            engine.catching_up.get(name, 0),
        )
        writer = BatchWriter(engine)
        meta = engine.store.handle["meta"]
        limited.forget(engine, writer, name)
        for _, origin in stale:
            writer.batch.delete(position_key(POSITION_PREFIX, name, origin), meta)
            writer.batch.delete(position_key(HORIZON_PREFIX, name, origin), meta)
        mark = orjson.dumps({"source": self.source, "startedAt": engine.clock.physical_ms()})
        writer.batch.put(RESTORE_PREFIX + name.encode(), mark, meta)
        for origin, version in self.horizons.items():
            if version:
                writer.batch.put(
                    position_key(HORIZON_PREFIX, name, origin), keys.u64(version), meta
                )
        try:
            if name not in engine.catalog.databases:
                engine.catalog.add_database(name)
            writer.mark_schema(name)
            for schema in self.tables.values():
                engine._ensure_table(writer, name, schema)
        except Exception:
            engine.reload_catalog()
            raise
        writer.commit()
        for key in stale:
            engine.positions.pop(key, None)
            engine.horizons.pop(key, None)
        for origin, version in self.horizons.items():
            if version:
                engine.horizons[(name, origin)] = version
        # Subscriptions made from the positions before the restore start again.
        engine.positions_epoch += 1
        log.info("restore of %s from %s started", name, self.source)

    def rows(self, rows: list[types_pb2.SnapshotRow]) -> None:
        if self._in_log:
            raise InvalidArgument("rows must come before the first transaction")
        parsed = self._check_rows(rows)
        self.outcome.rows += len(parsed)
        if self.dry_run or not parsed:
            return
        engine = self.engine
        writer = BatchWriter(engine)
        by_table: dict[str, list[tuple[bytes, merge.RecordState, bytes]]] = {}
        newest = 0
        for table_name, encoded, state, raw in parsed:
            by_table.setdefault(table_name, []).append((encoded, state, raw))
            newest = max(newest, state.newest()[0])
        for table_name, items in by_table.items():
            table = engine.catalog.table(self.database, table_name)
            olds = writer.load(table, [encoded for encoded, _, _ in items])
            for (encoded, theirs, raw), old in zip(items, olds, strict=True):
                if old is None and theirs.base != merge.ZERO and not theirs.deleted:
                    writer.put_new(table, encoded, theirs.doc, raw)
                else:
                    writer.set_state(table, encoded, old, merge.merge_states(old, theirs))
        if newest:
            engine.clock.observe(newest)
            writer.last_version = max(writer.last_version, engine.clock.last)
        writer.empty = False
        writer.commit()

    def transactions(self, transactions: list[types_pb2.Transaction]) -> None:
        self._in_log = True
        for txn in transactions:
            self._check_transaction(txn)
        run: list[types_pb2.Transaction] = []
        applying = False
        for txn in transactions:
            if txn.version <= self.positions.get(txn.origin, 0):
                kind = "log"
                self.outcome.logged += 1
            elif txn.version <= self.replay_until:
                kind = "apply"
                self.outcome.applied += 1
                origin = txn.origin
                self.outcome.positions[origin] = max(
                    self.outcome.positions.get(origin, 0), txn.version
                )
            else:
                self.outcome.skipped += 1
                continue
            if self.dry_run:
                continue
            if run and applying != (kind == "apply"):
                self._write(run, applying)
                run = []
            applying = kind == "apply"
            run.append(txn)
        if run:
            self._write(run, applying)

    def _write(self, run: list[types_pb2.Transaction], apply: bool) -> None:
        engine = self.engine
        if apply:
            engine.apply(run, 0)
            return
        writer = BatchWriter(engine)
        for txn in run:
            local_time = engine.clock.observe(txn.version)
            lt = keys.u64(local_time)
            for w in txn.writes:
                encoded = keys.encode_key(orjson.loads(w.id))
                audit = keys.audit_prefix(self.database, w.table)
                writer.batch.put(audit + encoded + lt, b"", writer.logkey)
            writer.log(txn, local_time)
        writer.commit()

    def finish(self) -> RestoreOutcome:
        """Last write: adopt the positions, raise the horizons to them, note a catch-up
        when this node's own writes after the backup are missing, clear the mark."""
        if self.dry_run:
            return self.outcome
        engine = self.engine
        name = self.database
        me = engine.node_name
        meta = engine.store.handle["meta"]
        writer = BatchWriter(engine)
        for origin, version in self.positions.items():
            writer.set_position(name, origin, version)
        if self.positions:
            engine.clock.observe(max(self.positions.values()))
            writer.last_version = max(writer.last_version, engine.clock.last)
        # The rows came from a backup, and the log here is history re-written by this
        # restore: a peer that holds less of the database than these positions must copy
        # it (LOG_TRUNCATED), not build it from a log tail. Applied positions include
        # what was replayed.
        final = {o: v for (d, o), v in engine.positions.items() if d == name}
        final.update({o: v for (d, o), v in writer.positions.items() if d == name})
        for origin, version in final.items():
            writer.raise_horizon(name, origin, version)
        if self.own_before > final.get(me, 0):
            # This node wrote to the database after the backup: those writes are only on
            # peers now, and this node's log no longer holds them.
            writer.raise_horizon(name, me, self.own_before)
            writer.batch.put(CATCHING_UP_PREFIX + name.encode(), keys.u64(self.own_before), meta)
        writer.batch.delete(RESTORE_PREFIX + name.encode(), meta)
        writer.empty = False
        writer.commit()
        if self.own_before > final.get(me, 0):
            engine.catching_up[name] = self.own_before
            log.info(
                "restore of %s: this node wrote to it after the backup (up to %s); it"
                " catches up by a copy from a peer",
                name,
                format_version(self.own_before),
            )
        engine.positions_epoch += 1
        self.outcome.positions = {o: v for (d, o), v in engine.positions.items() if d == name}
        log.info(
            "restored %s from %s: %d rows, %d transactions logged, %d replayed, %d skipped",
            name,
            self.source,
            self.outcome.rows,
            self.outcome.logged,
            self.outcome.applied,
            self.outcome.skipped,
        )
        return self.outcome
