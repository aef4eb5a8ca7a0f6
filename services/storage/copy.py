"""The receive side of a copy (MergeSnapshot): snapshot rows merged into this node, the
copy's progress, and the removal of rows the source deleted while this node was away.
The send side is ``snapshot.py``.

Progress is kept per (database, source). A copy is a sequence of parts, one Snapshot
stream each, named by a token the receiver chooses; every request names the key its rows
follow, and a request that does not continue its copy exactly is refused before anything
is written. The key range a request covers is therefore always one its own source has
sent completely, which is what makes removing a row for its absence safe (the invariant
is in the MergeSnapshot contract and in DESIGN.md, "Snapshots and copies").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from shoal.storage.v1 import storage_pb2, types_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, shown
from services.storage import keys, limited, merge, residency
from services.storage.commit import BatchWriter
from services.storage.schema import check_name

if TYPE_CHECKING:
    from services.storage.engine import Engine

COPY_PREFIX = b"copy/"  # copy/<database>\0<source> -> CopyState JSON
PARTIAL_PREFIX = b"partial/"  # partial/<database> -> empty: positions are partial
# catchup/<database> -> u64: restored below this node's own last write to it (that version)
CATCHING_UP_PREFIX = b"catchup/"
OUT_OF_ORDER = "COPY_OUT_OF_ORDER"
RESTORING = "RESTORING"  # a Restore stream is writing the database

# A position in the source's order: (table name, encoded primary key).
Key = tuple[str, bytes]


def copy_key(database: str, source: str) -> bytes:
    """Meta key of a copy's progress."""
    return COPY_PREFIX + database.encode() + b"\x00" + source.encode()


@dataclass
class CopyState:
    """A copy into this node from one source that has started and not completed."""

    database: str
    source: str
    positions: dict[str, int]  # per origin: the lowest of the parts' snapshot positions
    part: int = 0
    partial: bool = False
    rows: int = 0
    merged_bytes: int = 0
    estimated_rows: int = 0
    last_table: str = ""
    last_id: bytes = b""  # the primary key as JSON, as the source sent it
    tables: list[str] = field(default_factory=list)  # the source's replicated tables
    # The tables copied (MergeSnapshotRequest.copied_tables), over every part; None: all.
    copied: list[str] | None = None

    @property
    def last_key(self) -> Key | None:
        """The last merged key, or None before the first row."""
        if not self.last_table:
            return None
        return self.last_table, keys.encode_key(orjson.loads(self.last_id))

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "source": self.source,
                "positions": self.positions,
                "part": self.part,
                "partial": self.partial,
                "rows": self.rows,
                "bytes": self.merged_bytes,
                "estimatedRows": self.estimated_rows,
                "lastTable": self.last_table,
                "lastId": self.last_id.decode(),
                "tables": self.tables,
                "copied": self.copied,
            }
        )

    @staticmethod
    def decode(database: str, raw: bytes) -> CopyState:
        data = orjson.loads(raw)
        return CopyState(
            database=database,
            source=data["source"],
            positions={k: int(v) for k, v in data["positions"].items()},
            part=int(data.get("part", 0)),
            partial=bool(data.get("partial", False)),
            rows=data["rows"],
            merged_bytes=data["bytes"],
            estimated_rows=data["estimatedRows"],
            last_table=data["lastTable"],
            last_id=data["lastId"].encode(),
            tables=list(data.get("tables", [])),
            copied=data.get("copied"),
        )


def load(engine: Engine) -> None:
    """Read every unfinished copy and the partial marks into ``engine``.

    Progress stored by older code under ``copy/<database>`` (one per database) is moved
    to its (database, source) key in one write.
    """
    store = engine.store
    meta = store.handle["meta"]
    batch = store.batch()
    moved = False
    for key, value in store.scan("meta", COPY_PREFIX, keys.prefix_end(COPY_PREFIX)):
        name, sep, _source = key[len(COPY_PREFIX) :].partition(b"\x00")
        database = name.decode()
        state = CopyState.decode(database, value)
        engine.copies[(database, state.source)] = state
        if not sep:
            batch.delete(key, meta)
            batch.put(copy_key(database, state.source), state.encode(), meta)
            moved = True
    if moved:
        store.write(batch)
    for key, _ in store.scan("meta", PARTIAL_PREFIX, keys.prefix_end(PARTIAL_PREFIX)):
        engine.partial_databases.add(key[len(PARTIAL_PREFIX) :].decode())
    for key, value in store.scan("meta", CATCHING_UP_PREFIX, keys.prefix_end(CATCHING_UP_PREFIX)):
        engine.catching_up[key[len(CATCHING_UP_PREFIX) :].decode()] = keys.read_u64(value)


def mark_partial(engine: Engine, writer: BatchWriter, database: str) -> None:
    """Record (in ``writer``'s batch) that the database's positions are partial."""
    if database not in engine.partial_databases and database not in writer.partial_marks:
        writer.batch.put(PARTIAL_PREFIX + database.encode(), b"", writer.store.handle["meta"])
        writer.partial_marks.add(database)
        writer.empty = False


def _request_key(raw: types_pb2.SnapshotKey, what: str) -> Key | None:
    if not raw.table:
        return None
    try:
        return raw.table, keys.encode_key(orjson.loads(raw.id))
    except (orjson.JSONDecodeError, keys.InvalidKey) as exc:
        raise InvalidArgument(f"{what}.id is not a valid key: {exc}") from exc


def _show(key: Key | None, raw_id: bytes = b"") -> str:
    if key is None:
        return "the start of the database"
    return f"{key[0]} id {raw_id.decode(errors='replace')}" if raw_id else key[0]


def _out_of_order(message: str, database: str, source: str) -> FailedPrecondition:
    return FailedPrecondition(
        message + "; start the copy again",
        reason=OUT_OF_ORDER,
        metadata={"database": database, "source": source},
    )


def _next_state(engine: Engine, request: storage_pb2.MergeSnapshotRequest) -> CopyState:
    """The copy this request continues (or begins), checked; not yet installed."""
    database, source = request.database, request.source
    after = _request_key(request.after, "after")
    current = engine.copies.get((database, source))
    incoming = {p.origin: p.version for p in request.positions if p.database in ("", database)}
    asked = sorted(set(request.copied_tables)) if request.copied_tables else None
    if request.begins_part and after is None:
        return CopyState(database, source, incoming, request.part, request.partial, copied=asked)
    if current is None:
        raise _out_of_order(
            f"no copy of {database!r} from {source} is in progress to continue", database, source
        )
    if current.last_key != after:
        raise _out_of_order(
            f"the copy of {database!r} from {source} stopped after"
            f" {_show(current.last_key, current.last_id)}, not after"
            f" {_show(after, request.after.id)}",
            database,
            source,
        )
    if request.begins_part:
        positions = {o: min(v, incoming[o]) for o, v in current.positions.items() if o in incoming}
        return dataclasses.replace(
            current,
            part=request.part,
            positions=positions,
            partial=current.partial or request.partial,
            copied=_both(current.copied, asked),
        )
    if current.part != request.part:
        raise _out_of_order(
            f"part {request.part} of the copy of {database!r} from {source} is not the"
            f" current one ({current.part})",
            database,
            source,
        )
    return dataclasses.replace(current)


def _both(first: list[str] | None, second: list[str] | None) -> list[str] | None:
    """The tables two parts of a copy both copied (None: every table)."""
    if first is None:
        return second
    if second is None:
        return first
    return sorted(set(first) & set(second))


Parsed = tuple[str, Any, bytes, merge.RecordState]  # (table, pk, encoded pk, state)


def _parse_rows(
    rows: Iterable[types_pb2.SnapshotRow], after: Key | None, max_depth: int
) -> tuple[list[Parsed], list[bytes], int]:
    """Rows decoded, held to the JSON limits (records at most ``max_depth`` levels), and
    checked to follow ``after`` in strictly increasing key order."""
    parsed: list[Parsed] = []
    raw_states: list[bytes] = []
    max_version = 0
    previous = after
    for i, row in enumerate(rows):
        try:
            pk = orjson.loads(row.id)
            encoded = keys.encode_key(pk)
        except (orjson.JSONDecodeError, keys.InvalidKey) as exc:
            raise InvalidArgument(f"id {i}: invalid primary key {shown(row.id)}: {exc}") from None
        try:
            theirs = merge.decode_incoming_state(row.state, max_depth)
        except ValueError as exc:
            raise InvalidArgument(f"row {i} ({row.table} {shown(pk)}): {exc}") from None
        position = (row.table, encoded)
        if previous is not None and position <= previous:
            raise InvalidArgument(
                f"row {i} ({row.table} {pk!r}) does not follow the one before it in key order"
            )
        previous = position
        max_version = max(max_version, *(v for v, _ in (theirs.base, *theirs.versions.values())))
        parsed.append((row.table, pk, encoded, theirs))
        raw_states.append(row.state)
    return parsed, raw_states, max_version


def merge_snapshot(engine: Engine, request: storage_pb2.MergeSnapshotRequest) -> CopyState:
    """Merge copied rows and store the copy's progress in the same write (see the
    MergeSnapshot contract). Returns the progress after the merge."""
    database, source = request.database, request.source
    check_name("database", database)
    if not source:
        raise InvalidArgument("source is required")
    if not request.part:
        raise InvalidArgument("part is required (a non-zero token naming the copy's part)")
    if database in engine.restoring:
        raise FailedPrecondition(
            f"database {database!r} is being restored on {engine.node_name}; copy it once"
            " the restore is over",
            reason=RESTORING,
        )
    copy = _next_state(engine, request)
    start = _request_key(request.after, "after")
    parsed, raw_states, max_version = _parse_rows(
        request.rows, start, engine.config.storage.max_nesting_depth
    )
    if request.estimated_rows:
        copy.estimated_rows = request.estimated_rows
    if request.begins_part and request.tables:
        copy.tables = sorted(t.name for t in request.tables)
    writer = BatchWriter(engine)
    try:
        for schema in request.tables:
            engine._ensure_table(writer, database, schema)
        _merge_rows(engine, writer, database, parsed, raw_states)
        if parsed or request.complete:
            end = (parsed[-1][0], parsed[-1][2]) if parsed else start
            if not copy.partial:
                _drop_purged(engine, writer, copy, parsed, start, None if request.complete else end)
    except Exception:
        engine.reload_catalog()
        raise
    if parsed:
        copy.rows += len(parsed)
        copy.merged_bytes += sum(len(s) for s in raw_states)
        copy.last_table = request.rows[-1].table
        copy.last_id = request.rows[-1].id
    if max_version:
        engine.clock.observe(max_version)
        writer.last_version = max(writer.last_version, engine.clock.last)
    meta = engine.store.handle["meta"]
    finished: list[tuple[str, str]] = []
    caught_up = False
    if request.complete:
        copied = None if copy.copied is None else frozenset(copy.copied)
        limited.after_copy(engine, writer, database, copy.positions, copied)
        for origin, version in copy.positions.items():
            if version > engine.positions.get((database, origin), 0):
                writer.set_position(database, origin, version)
                writer.raise_horizon(database, origin, version)
        if copy.partial:
            mark_partial(engine, writer, database)
        # Every unfinished copy of the database is done with: what they merged stays
        # (merging only adds), and this node now holds the database at these positions.
        finished = [k for k in engine.copies if k[0] == database]
        for _, other in finished:
            writer.batch.delete(copy_key(database, other), meta)
        writer.batch.delete(copy_key(database, source), meta)
        # A restored database has its writes back: what a peer held of them is merged.
        if database in engine.catching_up:
            caught_up = True
            writer.batch.delete(CATCHING_UP_PREFIX + database.encode(), meta)
    else:
        writer.batch.put(copy_key(database, source), copy.encode(), meta)
    writer.empty = False
    writer.commit()
    engine.hand_over(writer.handovers)
    for key in finished:
        engine.copies.pop(key, None)
    if request.complete:
        engine.copies_completed += 1
    if caught_up:
        engine.catching_up.pop(database, None)
    if not request.complete:
        engine.copies[(database, source)] = copy
    return copy


def _merge_rows(
    engine: Engine,
    writer: BatchWriter,
    database: str,
    parsed: list[Parsed],
    raw_states: list[bytes],
) -> None:
    by_table: dict[str, list[int]] = {}
    for i, item in enumerate(parsed):
        by_table.setdefault(item[0], []).append(i)
    for table_name, positions_in_chunk in by_table.items():
        table = engine.catalog.find_table(database, table_name) or engine._ensure_table(
            writer,
            database,
            types_pb2.TableSchema(name=table_name, primary_key="id", replicate=True),
        )
        olds = writer.load(table, [parsed[i][2] for i in positions_in_chunk])
        for i, old in zip(positions_in_chunk, olds, strict=True):
            _, _, encoded, theirs = parsed[i]
            if old is None and _already_seen(engine, database, theirs):
                continue  # deleted here, tombstone purged: do not resurrect it
            if old is None and theirs.base != merge.ZERO and not theirs.deleted:
                # A row this node lacks: store the sender's state bytes as they are.
                writer.put_new(table, encoded, theirs.doc, raw_states[i])
            else:
                new = merge.merge_states(old, theirs)
                node = engine.node_name
                brought = None if theirs.stub else theirs
                payload = residency.handover_payload(node, old, new, None, brought)
                if payload is not None:
                    # This node held it whole and the copy says it is no longer a
                    # resident: its data goes to the residents (Engine.hand_over).
                    writer.hand_over(table, encoded, payload)
                if new.residents and node not in new.residents and not new.stub:
                    new = residency.to_stub(table, new)
                writer.set_state(table, encoded, old, new)


def _stamps(state: merge.RecordState) -> list[merge.Stamp]:
    stamps = list(state.versions.values())
    if state.base != merge.ZERO:
        stamps.append(state.base)
    return stamps


def _already_seen(engine: Engine, database: str, state: merge.RecordState) -> bool:
    """True when this node has applied every write the state reflects (all its versions
    are within this node's positions, and those positions are not partial)."""
    if database in engine.partial_databases:
        return False
    stamps = _stamps(state)
    positions = engine.positions
    return bool(stamps) and all(v <= positions.get((database, o), 0) for v, o in stamps)


def _drop_purged(
    engine: Engine,
    writer: BatchWriter,
    copy: CopyState,
    parsed: list[Parsed],
    start: Key | None,
    end: Key | None,
) -> None:
    """Remove rows the source deleted and purged (see the MergeSnapshot contract).

    In the key range this request covers (after ``start``, through ``end``; to the end
    of the database when ``end`` is None), a row of ours that the source did not send,
    and whose every write the source has already applied (all its versions are within
    the copy's positions), was deleted on the source and its tombstone purged: keeping
    it would resurrect it. Rows with any write the source has not seen survive. Tables
    the source lacks are untouched.
    """
    incoming: dict[str, set[bytes]] = {}
    for table_name, _pk, encoded, _state in parsed:
        incoming.setdefault(table_name, set()).add(encoded)
    start_table, start_key = start if start is not None else ("", b"")
    for name in copy.tables:
        if name < start_table or (end is not None and name > end[0]):
            continue
        table = engine.catalog.find_table(copy.database, name)
        if table is None:
            continue
        low = table.prefix + (start_key + b"\x00" if name == start_table and start_key else b"")
        high = table.prefix + end[1] + b"\x00" if end is not None and name == end[0] else None
        seen = incoming.get(name, set())
        n = len(table.prefix)
        for key, value in engine.store.scan("data", low, high or keys.prefix_end(table.prefix)):
            encoded = key[n:]
            if encoded in seen or key in writer.overlay:
                continue
            state = merge.decode_state(value)
            stamps = _stamps(state)
            if stamps and all(v <= copy.positions.get(o, 0) for v, o in stamps):
                writer.remove(table, encoded, state)
