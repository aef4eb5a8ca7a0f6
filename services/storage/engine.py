"""The storage engine of one node: the open RocksDB, the catalog, the clock, positions,
and every operation that changes data. Reads live in ``search.py``, ``log.py`` and
``snapshot.py``; the gRPC edge in ``server.py``.

All methods run on the service's event loop. Write methods are synchronous from the
first read to the batch write, so writes never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable, Mapping

from shoal.storage.v1 import types_pb2

from services.common import analytics
from services.common.auth import load_or_create_node_secret
from services.common.config import ShoalConfig
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.hlc import HybridClock, format_version, wall_clock_ms
from services.common.tokens import TokenLifetimes
from services.storage import attribute_types, copy, fence, keys, limited, merge
from services.storage.apply import ApplyResult, apply_transactions
from services.storage.commit import (
    COUNT_PREFIX,
    HANDOVER_PREFIX,
    HLC_KEY,
    HORIZON_PREFIX,
    POSITION_PREFIX,
    RESIDENCY_PREFIX,
    UPDATED_PREFIX,
    BatchWriter,
    index_values,
    parse_handover_key,
    table_schema,
)
from services.storage.copy import CopyState
from services.storage.db import Store
from services.storage.schema import (
    NEXT_TABLE_ID_KEY,
    SCHEMA_PREFIX,
    Catalog,
    Database,
    Table,
    check_name,
)
from services.storage.throttle import ThrottleSettings
from services.storage.transaction import LocalTransaction
from services.storage.users import UserStore

log = logging.getLogger("shoal.storage")

NODE_NAME_KEY = b"node_name"
CHUNK = 10_000
RESERVED_DATABASES = ("system",)
SYSTEM_DATABASE = "system"
# Replicated system tables every node has (Harper's names): cluster membership and the
# certificates nodes trust. Their primary key is the node or certificate name.
SYSTEM_TABLES = (("hdb_nodes", "name"), ("hdb_certificate", "name"))
# Node-local system tables (replicate: false, written outside the log): analytics history.
LOCAL_SYSTEM_TABLES = ((analytics.RAW_TABLE, "id"), (analytics.AGGREGATE_TABLE, "id"))


class Engine:
    """A node's data: open it with ``open()``, close with ``close()``."""

    def __init__(self, config: ShoalConfig) -> None:
        self.config = config
        self.node_name = config.node_name
        self.store = Store(config.storage_path, config.storage.sync_writes)
        self.catalog = Catalog()
        self.counts: dict[int, int] = {}
        # When this node last wrote a record of each table (hybrid clock), by table id.
        self.updated: dict[int, int] = {}
        self.positions: dict[tuple[str, str], int] = {}
        self.horizons: dict[tuple[str, str], int] = {}
        # Copies into this node that have started and not completed, per (database, source).
        self.copies: dict[tuple[str, str], CopyState] = {}
        # Databases whose positions do not stand for every write they cover (copy.py).
        self.partial_databases: set[str] = set()
        # Copies completed since start: the residency worker heals stubs a copy left on
        # records this node is a resident of (repair.py).
        self.copies_completed = 0
        # Writes that reached this node as stubs of records it is a resident of.
        self.stubs_on_residents = 0
        # Databases restored below this node's own last write to them, until a copy from
        # a peer brings those writes back: database -> that last own position (copy.py).
        self.catching_up: dict[str, int] = {}
        # Positions (database, origin) that stand only for these tables (limited.py).
        self.limited: dict[tuple[str, str], frozenset[str]] = {}
        # Databases a Restore stream is writing (backup.py): replication leaves them alone.
        self.restoring: set[str] = set()
        # Changes when a restore changes positions (and at every start): a subscription
        # made from positions read under another epoch starts again (ApplyRequest.epoch).
        self.positions_epoch = secrets.randbits(62) + 1
        # Databases that received records with residents since start (see has_residents).
        self.resident_databases: set[str] = set()
        # Databases being handed over (a shard change): writes and copies refused.
        self.fences = fence.Fences()
        # Counters since the process started, read by the metrics collector at scrape time.
        self.commits = 0  # atomic writes (local transactions, applies, copies, schema)
        self.local_transactions = 0
        self.applied_transactions = 0  # transactions of other origins applied
        self.skipped_transactions = 0  # ... and skipped as already applied
        # Records written by local transactions, per (database, table), for analytics.
        self.records_written: dict[tuple[str, str], int] = {}
        # Records read by searches (each visible record met), per (database, table).
        self.records_read: dict[tuple[str, str], int] = {}
        self.clock = HybridClock(wall_clock_ms(config.testing.clock_offset_ms))
        self._commit_event = asyncio.Event()
        self.closing = False
        self.node_secret = load_or_create_node_secret(config.keys_path)
        authentication = config.authentication
        self.users = UserStore(
            self.store,
            self.node_name,
            self.node_secret,
            ThrottleSettings(
                attempts=authentication.lockout_attempts,
                source_attempts=authentication.source_lockout_attempts,
                initial_backoff_s=authentication.initial_backoff_s,
                max_backoff_s=authentication.lockout_duration_s,
                capacity=authentication.tracked_failures,
            ),
            authentication.max_concurrent_verifications,
            TokenLifetimes.of(authentication),
        )

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Check the data belongs to this node and load catalog, positions and clock."""
        meta = self.store.meta
        owner = meta.get(NODE_NAME_KEY)
        if owner is None:
            meta.put(NODE_NAME_KEY, self.node_name.encode(), self.store.write_options)
        elif owner.decode() != self.node_name:
            raise FailedPrecondition(
                f"the data in {self.store.path} belongs to node {owner.decode()!r}, but"
                f" replication.hostname is {self.node_name!r}; a node's name cannot change",
                reason="NODE_NAME_MISMATCH",
            )
        self.reload_catalog()
        for prefix, target in ((POSITION_PREFIX, self.positions), (HORIZON_PREFIX, self.horizons)):
            for key, value in self.store.scan("meta", prefix, keys.prefix_end(prefix)):
                db_name, _, origin = key[len(prefix) :].partition(b"\x00")
                target[(db_name.decode(), origin.decode())] = keys.read_u64(value)
        copy.load(self)
        limited.load(self)
        for key, _ in self.store.scan("meta", RESIDENCY_PREFIX, keys.prefix_end(RESIDENCY_PREFIX)):
            self.resident_databases.add(key[len(RESIDENCY_PREFIX) :].decode())
        stored = meta.get(HLC_KEY)
        last = keys.read_u64(stored) if stored else 0
        self.clock = HybridClock(wall_clock_ms(self.config.testing.clock_offset_ms), last)
        self._ensure_system_tables()
        self.hand_over(self._queued_handovers())
        self.users.bootstrap(
            self.config.admin.username, self.config.admin.password, self.config.keys_path
        )
        log.info(
            "opened %s: %d databases, clock at %s",
            self.store.path,
            len(self.catalog.databases),
            format_version(last),
        )

    def _ensure_system_tables(self) -> None:
        for name, primary_key in SYSTEM_TABLES:
            if self.catalog.find_table(SYSTEM_DATABASE, name) is None:
                self.create_table(SYSTEM_DATABASE, name, primary_key, (), True, "system", True)
        # Node-local tables are created without a log entry: nothing about them travels.
        writer = BatchWriter(self)
        for name, primary_key in LOCAL_SYSTEM_TABLES:
            if self.catalog.find_table(SYSTEM_DATABASE, name) is None:
                self.catalog.add_table(SYSTEM_DATABASE, name, primary_key, (), False)
                writer.mark_schema(SYSTEM_DATABASE)
        writer.commit()

    def reload_catalog(self) -> None:
        raw_next = self.store.meta.get(NEXT_TABLE_ID_KEY)
        self.catalog.load(
            self.store.scan("meta", SCHEMA_PREFIX, keys.prefix_end(SCHEMA_PREFIX)),
            keys.read_u64(raw_next) if raw_next else 1,
        )
        self.counts = {}
        for key, value in self.store.scan("meta", COUNT_PREFIX, keys.prefix_end(COUNT_PREFIX)):
            self.counts[int.from_bytes(key[len(COUNT_PREFIX) :], "big")] = keys.read_u64(value)
        self.updated = {}
        for key, value in self.store.scan("meta", UPDATED_PREFIX, keys.prefix_end(UPDATED_PREFIX)):
            self.updated[int.from_bytes(key[len(UPDATED_PREFIX) :], "big")] = keys.read_u64(value)

    def begin_shutdown(self) -> None:
        """Make long-lived streams (Subscribe) end, so the server can stop promptly."""
        self.closing = True
        self.notify_commit()

    def close(self) -> None:
        self.store.flush()
        self.store.close()

    # -- commit notification ---------------------------------------------------------

    def notify_commit(self) -> None:
        """Wake every waiter of ``commit_event`` (Subscribe streams)."""
        event = self._commit_event
        self._commit_event = asyncio.Event()
        event.set()

    @property
    def commit_event(self) -> asyncio.Event:
        """An event set at the next commit. Take it *before* reading the log."""
        return self._commit_event

    # -- schema ----------------------------------------------------------------------

    def _guard(self, database: str, internal: bool) -> None:
        if database in RESERVED_DATABASES and not internal:
            raise PermissionDenied(f"database {database!r} is reserved for Shoal itself")
        self.fences.check_write(database)

    def create_database(self, name: str, internal: bool = False) -> Database:
        check_name("database", name)
        self._guard(name, internal)
        db = self.catalog.add_database(name)
        writer = BatchWriter(self)
        writer.mark_schema(name)
        writer.commit()
        return db

    def drop_database(self, name: str, internal: bool = False) -> int:
        self._guard(name, internal)
        return self.remove_database(name)

    def remove_database(self, name: str) -> int:
        """Drop a database, unchecked (``drop_database`` checks; a hand-over forgets a
        fenced one)."""
        db = self.catalog.database(name)
        dropped = 0
        for table_name in list(db.tables):
            dropped += self._remove_table(name, table_name)
        batch = self.store.batch()
        batch.delete(SCHEMA_PREFIX + name.encode(), self.store.handle["meta"])
        self.store.write(batch)
        del self.catalog.databases[name]
        return dropped

    def create_table(
        self,
        database: str,
        name: str,
        primary_key: str,
        indexed: Iterable[str],
        replicate: bool,
        user: str,
        internal: bool = False,
        types: Mapping[str, str] | None = None,
        schema_defined: bool = False,
        timestamps: bool = False,
    ) -> Table:
        """Create a table; ``types`` are declared attribute types in any case (Harper's
        names, ``attribute_types``)."""
        check_name("database", database)
        self._guard(database, internal)
        declared = {a: attribute_types.type_name(t, a) for a, t in (types or {}).items()}
        table = self.catalog.add_table(
            database,
            name,
            primary_key or "id",
            indexed,
            replicate,
            declared,
            schema_defined,
            timestamps,
        )
        txn = LocalTransaction(self, database, user)
        txn.writer.mark_schema(database)
        try:
            txn.commit(extra_schema=[table])
        except Exception:
            self.reload_catalog()
            raise
        return table

    def drop_table(self, database: str, name: str, internal: bool = False) -> int:
        self._guard(database, internal)
        return self._remove_table(database, name)

    def _remove_table(self, database: str, name: str) -> int:
        table = self.catalog.table(database, name)
        prefix = keys.table_prefix(table.table_id)
        end = keys.prefix_end(prefix)
        assert end is not None
        dropped = self.counts.get(table.table_id, 0)
        batch = self.store.batch()
        batch.delete_range(prefix, end, self.store.handle["data"])
        batch.delete_range(prefix, end, self.store.handle["index"])
        batch.delete(COUNT_PREFIX + prefix, self.store.handle["meta"])
        batch.delete(UPDATED_PREFIX + prefix, self.store.handle["meta"])
        db = self.catalog.database(database)
        del db.tables[name]
        batch.put(SCHEMA_PREFIX + database.encode(), db.encode(), self.store.handle["meta"])
        try:
            self.store.write(batch)
        except Exception:
            self.reload_catalog()
            raise
        self.counts.pop(table.table_id, None)
        return dropped

    def create_attribute(
        self,
        database: str,
        table_name: str,
        attribute: str,
        indexed: bool,
        user: str,
        internal: bool = False,
    ) -> tuple[Table, int]:
        self._guard(database, internal)
        table = self.catalog.table(database, table_name)
        check_name("attribute", attribute)
        exists = attribute in table.attributes
        already_indexed = attribute in table.indexed or attribute == table.primary_key
        if exists and (not indexed or already_indexed):
            raise AlreadyExists(f"attribute {database}.{table_name}.{attribute} already exists")
        table.attributes.add(attribute)
        built = 0
        if indexed and not already_indexed:
            built = self._add_index(table, attribute)
        txn = LocalTransaction(self, database, user)
        txn.writer.mark_schema(database)
        try:
            txn.commit(extra_schema=[table])
        except Exception:
            self.reload_catalog()
            raise
        return table, built

    def _add_index(self, table: Table, attribute: str) -> int:
        """Declare an index and build it over existing records (chunked writes)."""
        table.indexed = (*table.indexed, attribute)
        writer = BatchWriter(self)
        writer.mark_schema(table.database)
        writer.commit()
        prefix = keys.table_prefix(table.table_id)
        iprefix = keys.index_prefix(table.table_id, attribute)
        built = 0
        batch = self.store.batch()
        pending = 0
        for key, value in self.store.scan("data", prefix, keys.prefix_end(prefix)):
            state = merge.decode_state(value)
            if attribute not in state.doc:
                continue
            encoded = key[len(prefix) :]
            for entry in index_values(state.doc[attribute]):
                batch.put(iprefix + entry + encoded, b"", self.store.handle["index"])
            built += 1
            pending += 1
            if pending >= CHUNK:
                self.store.write(batch)
                batch = self.store.batch()
                pending = 0
        if pending:
            self.store.write(batch)
        return built

    def drop_attribute(
        self, database: str, table_name: str, attribute: str, internal: bool = False
    ) -> int:
        self._guard(database, internal)
        table = self.catalog.table(database, table_name)
        check_name("attribute", attribute)
        if attribute == table.primary_key:
            raise InvalidArgument(f"{attribute!r} is the primary key of {database}.{table_name}")
        if attribute not in table.attributes:
            raise NotFound(f"attribute {database}.{table_name}.{attribute} does not exist")
        table.attributes.discard(attribute)
        table.types.pop(attribute, None)
        table.indexed = tuple(a for a in table.indexed if a != attribute)
        handle = self.store.handle
        iprefix = keys.index_prefix(table.table_id, attribute)
        iend = keys.prefix_end(iprefix)
        assert iend is not None
        batch = self.store.batch()
        batch.delete_range(iprefix, iend, handle["index"])
        batch.put(
            SCHEMA_PREFIX + database.encode(),
            self.catalog.database(database).encode(),
            handle["meta"],
        )
        self.store.write(batch)
        prefix = keys.table_prefix(table.table_id)
        updated = 0
        batch = self.store.batch()
        pending = 0
        for key, value in self.store.scan("data", prefix, keys.prefix_end(prefix)):
            state = merge.decode_state(value)
            if attribute not in state.doc:
                continue
            state.doc.pop(attribute)
            state.versions.pop(attribute, None)
            batch.put(key, merge.encode_state(state), handle["data"])
            updated += 1
            pending += 1
            if pending >= CHUNK:
                self.store.write(batch)
                batch = self.store.batch()
                pending = 0
        if pending:
            self.store.write(batch)
        return updated

    # -- writes ----------------------------------------------------------------------

    def transaction(self, database: str, user: str, internal: bool = False) -> LocalTransaction:
        """Start a local transaction on an existing database."""
        self._guard(database, internal)
        self.catalog.database(database)
        return LocalTransaction(self, database, user)

    def _ensure_table(
        self, writer: BatchWriter, database: str, schema: types_pb2.TableSchema
    ) -> Table:
        """The local table for a replicated schema, created or extended as needed."""
        check_name("table", schema.name)
        table = self.catalog.find_table(database, schema.name)
        if table is None:
            if database not in self.catalog.databases:
                self.catalog.add_database(database)
            table = self.catalog.add_table(
                database,
                schema.name,
                schema.primary_key or "id",
                schema.indexed_attributes,
                schema.replicate,
                {a: _known_type(t) for a, t in schema.attribute_types.items()},
                schema.schema_defined,
                schema.record_timestamps,
            )
            table.attributes.update(schema.attributes)
            writer.mark_schema(database)
            return table
        for attribute, given in schema.attribute_types.items():
            if attribute not in table.types:
                table.types[check_name("attribute", attribute)] = _known_type(given)
                writer.mark_schema(database)
        # Flags only ever turn on, so nodes converge whichever schema arrives first.
        if (schema.record_timestamps and not table.timestamps) or (
            schema.schema_defined and not table.schema_defined
        ):
            table.timestamps = table.timestamps or schema.record_timestamps
            table.schema_defined = table.schema_defined or schema.schema_defined
            writer.mark_schema(database)
        for attribute in schema.indexed_attributes:
            if attribute not in table.indexed and attribute != table.primary_key:
                check_name("attribute", attribute)
                self._add_index(table, attribute)
                writer.mark_schema(database)
        if not table.attributes.issuperset(schema.attributes):
            table.attributes.update(schema.attributes)
            writer.mark_schema(database)
        return table

    def apply(
        self,
        transactions: list[types_pb2.Transaction],
        max_clock_skew_ms: int,
        partial: bool = False,
        tables: set[tuple[str, str]] | None = None,
    ) -> ApplyResult:
        """Apply transactions committed elsewhere (see the Apply RPC contract); with
        ``partial``, their databases' positions are marked partial, and with ``tables``
        (a subscription to those tables only) limited to them (copy.py). The work is in
        ``apply.py``."""
        return apply_transactions(self, transactions, max_clock_skew_ms, partial, tables)

    def hand_over(self, handovers: list[tuple[Table, bytes, bytes]]) -> None:
        """Log handovers queued by a batch that was just written (``BatchWriter.hand_over``,
        persisted under ``handover/`` in that batch): each goes to the record's residents
        as a whole write, and its queue entry is deleted in the same write. Whatever a
        crash left queued is logged when storage opens (``open``)."""
        by_database: dict[str, list[tuple[Table, bytes, bytes]]] = {}
        for item in handovers:
            by_database.setdefault(item[0].database, []).append(item)
        for database, items in by_database.items():
            txn = LocalTransaction(self, database, self.node_name)
            for table, key, meta_key in items:
                raw = self.store.meta.get(meta_key)
                if raw is not None:
                    txn.hand_over(table, key, merge.decode_state(raw), meta_key)
            txn.commit()

    def _queued_handovers(self) -> list[tuple[Table, bytes, bytes]]:
        """Handovers a crash left queued (their batch was written, their log entry not)."""
        found: list[tuple[Table, bytes, bytes]] = []
        for meta_key, _ in self.store.scan(
            "meta", HANDOVER_PREFIX, keys.prefix_end(HANDOVER_PREFIX)
        ):
            database, table_name, key = parse_handover_key(meta_key)
            table = self.catalog.find_table(database, table_name)
            if table is not None:
                found.append((table, key, meta_key))
        return found

    def has_residents(self, table: Table) -> bool:
        """True when records of the table may have residents (reads then look for stubs)."""
        return self.database_has_residents(table.database)

    def database_has_residents(self, database: str) -> bool:
        """The database has ``replicateTo``, or a write with residents reached it since
        this process started."""
        return (
            self.config.replication.replicate_to(database) is not None
            or database in self.resident_databases
        )

    def schema_of(self, table: Table) -> types_pb2.TableSchema:
        return table_schema(table, with_attributes=True)


def _known_type(given: str) -> str:
    """A replicated attribute type: a type this node does not know (a newer node's) is
    kept as Any, never refused: replication must not stop over it."""
    try:
        return attribute_types.type_name(given, "")
    except InvalidArgument:
        return "Any"
