"""Fencing and forgetting a database (a shard change's hand-over) on real engines (RocksDB
in temporary folders, no processes): a fence refuses writes and leaves applies unapplied
without moving positions; forgetting removes nothing while this node holds a write the
others do not, and everything of the database otherwise, so that it can be received
afresh (services/storage/handover.py, the FenceDatabases and ForgetDatabase contracts)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from shoal.storage.v1 import types_pb2

from services.common.config import parse_config
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.storage import handover, keys, merge
from services.storage.engine import Engine

DB, TABLE, OTHER = "metrics", "m", "shared"


def open_engine(root: Path, name: str) -> Engine:
    config = parse_config(
        {
            "rootPath": str(root / name),
            "replication": {"hostname": name},
            "admin": {"password": "x"},
        },
        env={},
    )
    engine = Engine(config)
    engine.open()
    return engine


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[Engine]]:
    """Engines A and B (a test may replace one with a reopened engine)."""
    engines = [open_engine(tmp_path, "A"), open_engine(tmp_path, "B")]
    for engine in engines:
        engine.create_table(DB, TABLE, "id", (), True, "test")
        engine.create_table(OTHER, TABLE, "id", (), True, "test")
    try:
        yield engines
    finally:
        for engine in engines:
            engine.close()


def write(engine: Engine, database: str, ids: range) -> None:
    txn = engine.transaction(database, "test")
    txn.upsert(engine.catalog.table(database, TABLE), [orjson.dumps({"id": i}) for i in ids])
    txn.commit()


def log_of(engine: Engine, database: str) -> list[types_pb2.Transaction]:
    txns = [types_pb2.Transaction.FromString(raw) for _, raw in engine.store.scan("log", b"")]
    return [t for t in txns if t.database == database]


def ids(engine: Engine, database: str) -> set[int]:
    """The visible records' ids, read from the engine's own data."""
    if database not in engine.catalog.databases:
        return set()
    table = engine.catalog.table(database, TABLE)
    found = set()
    for _, raw in engine.store.scan("data", table.prefix, keys.prefix_end(table.prefix)):
        state = merge.decode_state(raw)
        if state.visible:
            found.add(state.doc["id"])
    return found


def positions(engine: Engine, database: str) -> dict[str, int]:
    return {o: v for (d, o), v in engine.positions.items() if d == database}


def test_a_fence_refuses_writes_and_leaves_applies_unapplied(pair: list[Engine]) -> None:
    a, b = pair
    write(b, DB, range(0, 5))
    write(b, OTHER, range(0, 5))
    assert a.fences.set([DB], 60_000) == [DB]
    assert DB in a.fences and OTHER not in a.fences
    before = positions(a, DB)
    with pytest.raises(Unavailable) as refused:
        write(a, DB, range(10, 12))
    assert refused.value.reason == "SHARD_CHANGING"
    with pytest.raises(Unavailable):
        a.create_table(DB, "n", "id", (), True, "test")
    result = a.apply([*log_of(b, DB), *log_of(b, OTHER)], 0)
    # The fenced database's transactions were left, its positions did not move; the
    # other database's were applied.
    assert result.fenced == {DB}
    assert positions(a, DB) == before and ids(a, DB) == set()
    assert ids(a, OTHER) == set(range(5)) and positions(a, OTHER)["B"] == positions(b, OTHER)["B"]
    # Lifted: the same transactions apply, and writes are accepted again.
    assert a.fences.set([DB], 0) == []
    assert a.apply(log_of(b, DB), 0).fenced == set()
    write(a, DB, range(10, 12))
    assert ids(a, DB) == set(range(5)) | {10, 11}
    with pytest.raises(InvalidArgument):
        a.fences.set(["system"], 1000)


def test_forget_removes_nothing_while_this_node_holds_more(
    pair: list[Engine], tmp_path: Path
) -> None:
    a, b = pair
    write(a, DB, range(0, 10))
    b.apply(log_of(a, DB), 0)
    write(a, DB, range(10, 20))  # only A holds these
    logged = len(log_of(a, DB))
    with pytest.raises(FailedPrecondition) as not_fenced:
        handover.forget(a, DB, positions(b, DB))
    assert not_fenced.value.reason == "NOT_FENCED"
    a.fences.set([DB], 60_000)
    with pytest.raises(FailedPrecondition) as behind:
        handover.forget(a, DB, positions(b, DB))
    assert behind.value.reason == "NOT_HELD_ELSEWHERE" and "A" in behind.value.message
    assert ids(a, DB) == set(range(20)) and len(log_of(a, DB)) == logged

    # Once B holds everything A holds, A forgets the database, and only it.
    b.apply(log_of(a, DB), 0)
    assert handover.forget(a, DB, positions(b, DB))
    write(a, OTHER, range(3))
    assert ids(a, DB) == set() and DB not in a.catalog.databases
    assert positions(a, DB) == {} and log_of(a, DB) == []
    assert not any(d == DB for d, _ in a.horizons)
    assert ids(a, OTHER) == set(range(3))
    assert not handover.forget(a, DB, {})  # nothing held any more

    # It stays forgotten across a restart, and the database can be received afresh
    # (A's own writes included: they come back from B).
    pair.remove(a)
    a.close()
    del a, not_fenced, behind  # the errors' tracebacks hold the engine too
    gc.collect()  # the last references to the closed database go with it
    again = open_engine(tmp_path, "A")
    pair.append(again)
    assert DB not in again.catalog.databases and positions(again, DB) == {}
    assert log_of(again, DB) == []
