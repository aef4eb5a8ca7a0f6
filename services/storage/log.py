"""The transaction log: reading it (by time, for audit, for replication) and purging it.

The log column family is keyed by the 8-byte local commit time (a hybrid-clock value, so
keys are unique and increase with every commit, local or applied). Values are serialized
``Transaction`` messages. Two secondary column families point into it:

    logidx  database 00 origin 00 version(8) -> local_time   (where an origin resumes)
    logkey  database 00 table 00 enc(pk) local_time(8)        (audit by record)

For every (database, origin) the log holds that origin's transactions in increasing
version order: local commits get increasing versions, and Apply skips anything at or
below the stored position. Subscribe relies on this: per origin, "everything after
version v" is a suffix of the log.

Purging removes entries committed before a time, with their secondary entries, and
raises the horizon of each (database, origin) to the highest version it removed, so a
subscriber asking for anything older is told to copy instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import orjson
from shoal.storage.v1 import storage_pb2, types_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.hlc import format_version
from services.storage import keys, merge, residency
from services.storage.commit import HORIZON_PREFIX, position_key
from services.storage.engine import Engine
from services.storage.schema import Table

log = logging.getLogger("shoal.storage.log")

DEFAULT_BATCH_TRANSACTIONS = 1000
DEFAULT_BATCH_BYTES = 1024 * 1024
DEFAULT_HEARTBEAT_MS = 10_000
PURGE_CHUNK = 1000


def read_transactions(
    engine: Engine, database: str, table: str, start: int, end: int | None, limit: int
) -> Iterator[types_pb2.Transaction]:
    """Transactions of a database committed locally in [start, end), oldest first."""
    count = 0
    upper = keys.u64(end) if end is not None else None
    for _, value in engine.store.scan("log", keys.u64(start), upper):
        txn = types_pb2.Transaction.FromString(value)
        if txn.database != database:
            continue
        if (
            table
            and not any(w.table == table for w in txn.writes)
            and not any(t.name == table for t in txn.tables)
        ):
            continue
        yield txn
        count += 1
        if limit and count >= limit:
            return


def read_audit(
    engine: Engine,
    database: str,
    table: str,
    encoded_ids: list[bytes],
    users: set[str],
    start: int,
    end: int | None,
    limit: int,
) -> Iterator[types_pb2.Transaction]:
    """Transactions touching a table, reduced to its writes, filtered as ReadAuditLog says."""
    if encoded_ids:
        times: set[int] = set()
        base = database.encode() + b"\x00" + table.encode() + b"\x00"
        for encoded in encoded_ids:
            prefix = base + encoded
            for key, _ in engine.store.scan("logkey", prefix, keys.prefix_end(prefix)):
                if len(key) == len(prefix) + 8:
                    times.add(keys.read_u64(key, len(prefix)))
        wanted_ids = set(encoded_ids)
        candidates: Iterator[tuple[int, bytes | None]] = (
            (t, engine.store.log.get(keys.u64(t))) for t in sorted(times)
        )
    else:
        wanted_ids = set()
        candidates = (
            (keys.read_u64(k), v)
            for k, v in engine.store.scan(
                "log", keys.u64(start), keys.u64(end) if end is not None else None
            )
        )
    count = 0
    for local_time, value in candidates:
        if value is None or local_time < start or (end is not None and local_time >= end):
            continue
        txn = types_pb2.Transaction.FromString(value)
        if txn.database != database or (users and txn.user not in users):
            continue
        matching = [
            w
            for w in txn.writes
            if w.table == table and (not wanted_ids or _encoded_id(w.id) in wanted_ids)
        ]
        if not matching:
            continue
        del txn.writes[:]
        txn.writes.extend(matching)
        del txn.tables[:]
        yield txn
        count += 1
        if limit and count >= limit:
            return


def _encoded_id(raw: bytes) -> bytes:
    try:
        return keys.encode_key(orjson.loads(raw))
    except (ValueError, orjson.JSONDecodeError):
        return b""


@dataclass
class SubscribeSpec:
    """A validated Subscribe request."""

    databases: set[str] | None
    tables: set[tuple[str, str]] | None
    positions: dict[tuple[str, str], int]
    exclude: set[str]
    exclude_databases: set[str]
    default_version: int
    max_transactions: int
    max_bytes: int
    heartbeat_s: float
    linger_s: float
    subscriber: str = ""
    # (database, origin, version) withheld from the subscriber, to report (see subscribe)
    withheld: list[types_pb2.Position] = field(default_factory=list)


def subscribe_spec(request: storage_pb2.SubscribeRequest) -> SubscribeSpec:
    """Validate a SubscribeRequest."""
    if request.max_batch_transactions > 100_000:
        raise InvalidArgument("max_batch_transactions must be at most 100000")
    if request.max_batch_bytes > 64 * 1024 * 1024:
        raise InvalidArgument("max_batch_bytes must be at most 64 MiB")
    positions: dict[tuple[str, str], int] = {}
    for p in request.positions:
        if not p.database or not p.origin:
            raise InvalidArgument("every position needs a database and an origin")
        positions[(p.database, p.origin)] = p.version
    return SubscribeSpec(
        databases=set(request.databases) or None,
        tables={(t.database, t.table) for t in request.tables} or None,
        positions=positions,
        exclude=set(request.exclude_origins),
        exclude_databases=set(request.exclude_databases),
        default_version=request.default_version,
        max_transactions=request.max_batch_transactions or DEFAULT_BATCH_TRANSACTIONS,
        max_bytes=request.max_batch_bytes or DEFAULT_BATCH_BYTES,
        heartbeat_s=(request.heartbeat_interval_ms or DEFAULT_HEARTBEAT_MS) / 1000,
        linger_s=min(request.linger_ms, 1000) / 1000,
        subscriber=request.subscriber,
    )


def logged_origins(engine: Engine, database: str) -> list[str]:
    """Origins that have entries in the log of a database."""
    origins: list[str] = []
    base = database.encode() + b"\x00"
    it = engine.store.logidx.iter()
    it.seek(base)
    while it.valid():
        key = it.key()
        if not key.startswith(base):
            break
        origin = key[len(base) :].split(b"\x00", 1)[0]
        origins.append(origin.decode())
        it.seek(base + origin + b"\x01")
    return origins


def _truncated(
    engine: Engine, database: str, origin: str, position: int, horizon: int
) -> FailedPrecondition:
    return FailedPrecondition(
        f"the log of {database!r} on {engine.node_name} no longer holds"
        f" transactions of {origin} after {format_version(position)} (retained"
        f" from {format_version(horizon)}); a copy is needed",
        reason="LOG_TRUNCATED",
        metadata={"database": database, "origin": origin, "horizon": str(horizon)},
    )


def start_time(engine: Engine, spec: SubscribeSpec) -> int:
    """The local time to start scanning from, or FAILED_PRECONDITION if truncated."""
    databases = spec.databases if spec.databases is not None else set(engine.catalog.databases)
    start: int | None = None
    for database in databases - spec.exclude_databases:
        known = set(logged_origins(engine, database))
        known.update(o for (d, o) in engine.horizons if d == database)
        for origin in known:
            if origin in spec.exclude:
                continue
            asked = spec.positions.get((database, origin))
            position = spec.default_version if asked is None else asked
            horizon = engine.horizons.get((database, origin), 0)
            checked = asked is not None or spec.default_version == 0
            if checked and position < horizon:
                raise _truncated(engine, database, origin, position, horizon)
            prefix = database.encode() + b"\x00" + origin.encode() + b"\x00"
            for _, value in engine.store.scan(
                "logidx", prefix + keys.u64(position + 1), keys.prefix_end(prefix)
            ):
                first = keys.read_u64(value)
                start = first if start is None else min(start, first)
                break
    if start is None:
        # Nothing pending: start at the end of the log.
        for key, _ in engine.store.scan("log", b"", None, reverse=True):
            return keys.read_u64(key) + 1
        return 0
    return start


def _withheld(engine: Engine, txn: types_pb2.Transaction, subscriber: str) -> bool:
    """Shape a transaction's writes with residents for ``subscriber``: stubs for records
    it is not a resident of, neither by the write nor by the record as this node holds it
    now (a re-homing this node already knows of counts). True when the transaction must
    not reach it at all: this node holds only a stub of a write the subscriber is a
    resident of (it received it by relay), and a stub must never stand in for the record
    on a resident."""
    for w in txn.writes:
        if not w.residents:
            continue
        if subscriber in w.residents:
            if w.stub:
                return True
            continue
        if w.stub:
            continue
        table = engine.catalog.find_table(txn.database, w.table)
        if table is None:
            continue
        if subscriber not in _current_residents(engine, table, w.id):
            residency.stub_write(table, w)
    return False


def _current_residents(engine: Engine, table: Table, id_json: bytes) -> tuple[str, ...]:
    """The residents of a record as this node holds it now (empty when unknown)."""
    try:
        key = keys.encode_key(orjson.loads(id_json))
    except (orjson.JSONDecodeError, keys.InvalidKey):
        return ()
    raw = engine.store.data.get(table.prefix + key)
    return merge.decode_state(raw).residents if raw is not None else ()


def _filter(engine: Engine, txn: types_pb2.Transaction, spec: SubscribeSpec) -> bool:
    """Drop what must not travel; False when nothing is left to send."""
    local = {t.name for t in txn.tables if not t.replicate}
    for name in {w.table for w in txn.writes}:
        table = engine.catalog.find_table(txn.database, name)
        if table is not None and not table.replicate:
            local.add(name)
    if spec.tables is not None:
        local.update(w.table for w in txn.writes if (txn.database, w.table) not in spec.tables)
        local.update(t.name for t in txn.tables if (txn.database, t.name) not in spec.tables)
    if local:
        kept = [w for w in txn.writes if w.table not in local]
        kept_tables = [t for t in txn.tables if t.name not in local]
        del txn.writes[:]
        txn.writes.extend(kept)
        del txn.tables[:]
        txn.tables.extend(kept_tables)
    return bool(txn.writes) or bool(txn.tables)


async def subscribe(
    engine: Engine, spec: SubscribeSpec
) -> AsyncIterator[types_pb2.Transaction | None]:
    """Transactions to send, in commit order; ``None`` marks "caught up" (or a heartbeat).

    Tails the log forever: after catching up it waits for the next commit (or the
    heartbeat interval) and continues after the last entry it read.
    """
    positions = dict(spec.positions)
    withheld: set[tuple[str, str]] = set()
    cursor = start_time(engine, spec)
    last_wake = 0.0
    # Where the first transaction of a database being restored was passed over: once no
    # such restore runs any more, the scan goes back there (what was sent meanwhile is
    # within ``positions`` and skipped), so nothing written during a restore is lost.
    rewind: int | None = None
    while not engine.closing:
        event = engine.commit_event
        if rewind is not None and not engine.restoring:
            cursor, rewind = rewind, None
        for key, value in engine.store.scan("log", keys.u64(cursor)):
            local_time = keys.read_u64(key)
            cursor = local_time + 1
            txn = types_pb2.Transaction.FromString(value)
            if spec.databases is not None and txn.database not in spec.databases:
                continue
            if txn.database in spec.exclude_databases:
                continue
            if txn.database in engine.restoring:
                rewind = local_time if rewind is None else rewind
                continue
            if txn.origin in spec.exclude:
                continue
            pkey = (txn.database, txn.origin)
            if pkey in withheld:
                continue
            if txn.version <= positions.get(pkey, spec.default_version):
                continue
            if spec.subscriber and _withheld(engine, txn, spec.subscriber):
                # Not a word more of this origin on this stream: the subscriber's
                # position stays before this transaction, and it gets it (and the
                # rest) from the origin itself or from another relay holding it whole.
                withheld.add(pkey)
                spec.withheld.append(
                    types_pb2.Position(
                        database=txn.database, origin=txn.origin, version=txn.version
                    )
                )
                log.warning(
                    "not relaying %s's transactions of %r to %s from %s on: this node holds"
                    " only stubs of records %s is a resident of",
                    txn.origin,
                    txn.database,
                    spec.subscriber,
                    format_version(txn.version),
                    spec.subscriber,
                )
                continue
            if pkey not in positions and spec.default_version == 0:
                # First of its origin in this stream and the subscriber holds nothing of
                # it: when this node's history of it starts later (a copy arrived after
                # the subscription began) the subscriber needs a copy, not this tail.
                horizon = engine.horizons.get(pkey, 0)
                if horizon > 0:
                    raise _truncated(engine, txn.database, txn.origin, 0, horizon)
            positions[pkey] = txn.version
            if _filter(engine, txn, spec):
                yield txn
        yield None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=spec.heartbeat_s)
        now = time.monotonic()
        if spec.linger_s and now - last_wake < 4 * spec.linger_s:
            await asyncio.sleep(spec.linger_s)  # busy: let concurrent commits join
        last_wake = now


def purge_before(engine: Engine, cutoff: int, database: str) -> tuple[int, int]:
    """Delete log entries committed before ``cutoff`` and tombstones older than it.

    Runs in bounded chunks (one atomic write each). Returns (entries, tombstones).
    """
    store = engine.store
    deleted = 0
    resume = b""
    while True:
        batch = store.batch()
        horizons: dict[tuple[str, str], int] = {}
        n = 0
        for key, value in store.scan("log", resume, keys.u64(cutoff)):
            resume = key + b"\x00"
            txn = types_pb2.Transaction.FromString(value)
            if database and txn.database != database:
                continue
            db = txn.database.encode()
            batch.delete(key, store.handle["log"])
            batch.delete(
                db + b"\x00" + txn.origin.encode() + b"\x00" + keys.u64(txn.version),
                store.handle["logidx"],
            )
            for w in txn.writes:
                batch.delete(
                    db + b"\x00" + w.table.encode() + b"\x00" + _encoded_id(w.id) + key,
                    store.handle["logkey"],
                )
            hkey = (txn.database, txn.origin)
            horizons[hkey] = max(horizons.get(hkey, 0), txn.version)
            n += 1
            if n >= PURGE_CHUNK:
                break
        if n == 0:
            break
        for (db_name, origin), version in horizons.items():
            if version > engine.horizons.get((db_name, origin), 0):
                batch.put(
                    position_key(HORIZON_PREFIX, db_name, origin),
                    keys.u64(version),
                    store.handle["meta"],
                )
        store.write(batch)
        for hkey, version in horizons.items():
            engine.horizons[hkey] = max(engine.horizons.get(hkey, 0), version)
        deleted += n
        if n < PURGE_CHUNK:
            break
    return deleted, purge_tombstones(engine, cutoff, database)


def purge_tombstones(engine: Engine, cutoff: int, database: str) -> int:
    """Remove tombstones whose delete is older than ``cutoff`` (and still a tombstone)."""
    store = engine.store
    wanted = None
    if database:
        db = engine.catalog.databases.get(database)
        wanted = {t.table_id for t in db.tables.values()} if db else set()
    purged = 0
    batch = store.batch()
    pending = 0
    for key, _ in store.scan("tomb", b"", keys.u64(cutoff)):
        version = keys.read_u64(key)
        dkey = key[8:]
        table_id = int.from_bytes(dkey[:4], "big")
        if wanted is not None and table_id not in wanted:
            continue
        batch.delete(key, store.handle["tomb"])
        raw = store.data.get(dkey)
        if raw is not None:
            state = merge.decode_state(raw)
            if state.deleted and not state.doc and state.base[0] == version:
                batch.delete(dkey, store.handle["data"])
                purged += 1
        pending += 1
        if pending >= PURGE_CHUNK:
            store.write(batch)
            batch = store.batch()
            pending = 0
    if pending:
        store.write(batch)
    return purged
