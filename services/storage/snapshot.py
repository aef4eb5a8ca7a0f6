"""The send side of a copy: every row of a database, in key order, from one consistent
point, with the positions that point corresponds to.

Consistency: one iterator over the data column family is created in the same
synchronous step that reads the positions, before the first await. A RocksDB iterator
reads a fixed point-in-time view (rocksdict's ``snapshot()`` objects do not pin
iteration, so we rely on the iterator's own view; ``tests/assumptions`` checks this),
and no write can run in between because writes happen on this same event loop.

Order: tables by name, rows by primary-key encoding; a resumed snapshot starts after
``start_after`` (table name, id), which means the same thing on every node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import rocksdict
from shoal.storage.v1 import storage_pb2, types_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.storage import copy, keys, residency
from services.storage.commit import table_schema
from services.storage.engine import Engine
from services.storage.schema import Table

DEFAULT_ROWS = 1000
DEFAULT_BYTES = 1024 * 1024


@dataclass
class SnapshotPlan:
    """What a Snapshot stream will send."""

    header: storage_pb2.SnapshotResponse
    batches: Iterator[list[types_pb2.SnapshotRow]]


def plan_snapshot(engine: Engine, request: storage_pb2.SnapshotRequest) -> SnapshotPlan:
    """Fix the consistent point (iterator + positions) and describe the stream."""
    database = engine.catalog.database(request.database)
    if database.name in engine.restoring:
        raise FailedPrecondition(
            f"database {database.name!r} is being restored on {engine.node_name}; copy it"
            " once the restore is over",
            reason=copy.RESTORING,
        )
    if request.max_batch_rows > 100_000 or request.max_batch_bytes > 64 * 1024 * 1024:
        raise InvalidArgument(
            "max_batch_rows must be at most 100000 and max_batch_bytes at most 64 MiB"
        )
    start_table = ""
    start_key = b""
    if request.HasField("start_after"):
        start_table = request.start_after.table
        try:
            start_key = keys.encode_key(orjson.loads(request.start_after.id))
        except (orjson.JSONDecodeError, keys.InvalidKey) as exc:
            raise InvalidArgument(f"start_after.id is not a valid key: {exc}") from exc
    wanted = set(request.tables)
    replicated = [
        t for t in database.tables.values() if t.replicate and (not wanted or t.name in wanted)
    ]
    tables = sorted((t for t in replicated if t.name >= start_table), key=lambda t: t.name)
    iterator = engine.store.data.iter()  # the consistent point
    positions = [
        types_pb2.Position(database=db, origin=origin, version=version)
        for (db, origin), version in sorted(engine.positions.items())
        if db == database.name
    ]
    header = storage_pb2.SnapshotResponse(
        positions=positions,
        tables=[table_schema(t, with_attributes=True) for t in replicated],
        estimated_rows=sum(engine.counts.get(t.table_id, 0) for t in tables),
        partial=database.name in engine.partial_databases or database.name in engine.catching_up,
    )
    batches = row_batches(
        iterator,
        tables,
        start_table,
        start_key,
        request.max_batch_rows or DEFAULT_ROWS,
        request.max_batch_bytes or DEFAULT_BYTES,
        request.subscriber,
    )
    return SnapshotPlan(header, batches)


def row_batches(
    iterator: rocksdict.RdictIter,
    tables: list[Table],
    start_table: str,
    start_key: bytes,
    max_rows: int,
    max_bytes: int,
    subscriber: str = "",
) -> Iterator[list[types_pb2.SnapshotRow]]:
    """Rows of ``tables`` (in the order given) read through one data-CF iterator, in
    batches bounded in count and bytes; ``start_table`` resumes after ``start_key``."""
    batch: list[types_pb2.SnapshotRow] = []
    size = 0
    for table in tables:
        prefix = keys.table_prefix(table.table_id)
        resume = table.name == start_table and start_key
        iterator.seek(prefix + start_key if resume else prefix)
        if resume and iterator.valid() and iterator.key() == prefix + start_key:
            iterator.next()
        while iterator.valid():
            key = iterator.key()
            if not key.startswith(prefix):
                break
            pk, _ = keys.decode_value(key, len(prefix))
            state = iterator.value()
            if subscriber:
                state = residency.stub_row(table, state, subscriber)
            batch.append(types_pb2.SnapshotRow(table=table.name, id=orjson.dumps(pk), state=state))
            size += len(state) + len(key)
            if len(batch) >= max_rows or size >= max_bytes:
                yield batch
                batch = []
                size = 0
            iterator.next()
    if batch:
        yield batch
