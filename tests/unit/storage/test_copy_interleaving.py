"""Copies of one database from two sources at once, merged in any interleaving, with
local writes, restarts and resumed parts in between, on real engines (RocksDB in
temporary folders, no processes): no acknowledged write is lost and no deleted key
comes back (services/storage/copy.py, the MergeSnapshot contract).

The history: three nodes A, B and R write and exchange everything; R is cut off while
all three go on writing and deleting (A and B exchange); A and B purge their logs and
tombstones, so R must copy; then R copies the database from A and from B at once.
"""

from __future__ import annotations

import gc
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shoal.storage.v1 import storage_pb2, types_pb2

from services.common.config import parse_config
from services.common.errors import FailedPrecondition
from services.storage import keys, log, merge
from services.storage.commit import apply_write
from services.storage.copy import merge_snapshot
from services.storage.engine import Engine
from services.storage.snapshot import plan_snapshot
from services.storage.transaction import LocalTransaction
from tests.harness.copying import CopyFeed

DB, TABLE = "db", "t"
KEYS = 24

# A write: (kind, key, value) with kind 0 = PUT (upsert), 1 = PATCH, 2 = DELETE.
write_ops = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, KEYS - 1), st.integers(0, 9)), max_size=14
)


def open_engine(root: Path, name: str) -> Engine:
    config = parse_config(
        {
            "rootPath": str(root / name),
            "replication": {"hostname": name},
            "admin": {"password": "secret"},
        },
        env={},
    )
    engine = Engine(config)
    engine.open()
    return engine


class World:
    """The three engines, and every transaction ever committed (the ground truth)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes = {name: open_engine(root, name) for name in ("A", "B", "R")}
        self.history: dict[tuple[str, int], types_pb2.Transaction] = {}
        self.deleted_in_cut: set[int] = set()  # keys A or B deleted while R was away
        self.r_unseen: set[int] = set()  # keys R wrote that neither source has seen
        for engine in self.nodes.values():
            engine.create_table(DB, TABLE, "id", (), True, "test")

    def close(self) -> None:
        for engine in self.nodes.values():
            engine.close()

    def restart(self, name: str) -> None:
        """Close and reopen a node's engine (everything it knows comes from disk)."""
        self.nodes.pop(name).close()
        gc.collect()  # the last references to the closed database go with it
        self.nodes[name] = open_engine(self.root, name)

    def write(self, name: str, kind: int, key: int, value: int) -> bool:
        engine = self.nodes[name]
        table = engine.catalog.table(DB, TABLE)
        txn = LocalTransaction(engine, DB, "test")
        record = orjson.dumps({"id": key, f"a{value % 3}": value, "by": name})
        if kind == 0:
            result = txn.upsert(table, [record])
        elif kind == 1:
            result = txn.merge_upsert(table, [record])
        else:
            result = txn.delete(table, [orjson.dumps(key)])
        txn.commit()
        self._record(name)
        return bool(result.written)

    def _record(self, name: str) -> None:
        for _, raw in self.nodes[name].store.scan("log", b""):
            txn = types_pb2.Transaction.FromString(raw)
            if txn.database == DB:
                self.history[(txn.origin, txn.version)] = txn

    def sync(self, source: str, target: str) -> None:
        """``target`` applies ``source``'s whole log of the database."""
        txns = [
            types_pb2.Transaction.FromString(raw)
            for _, raw in self.nodes[source].store.scan("log", b"")
        ]
        self.nodes[target].apply([t for t in txns if t.database == DB], 0)
        self._record(target)

    def purge(self, name: str) -> None:
        engine = self.nodes[name]
        log.purge_before(engine, engine.clock.now(), "")

    def truth(self) -> dict[int, dict[str, Any]]:
        """Every key's visible record after every write ever committed."""
        states: dict[int, merge.RecordState] = {}
        for txn in self.history.values():
            for w in txn.writes:
                key = orjson.loads(w.id)
                doc = orjson.loads(w.value) if w.value else {}
                states[key] = apply_write(states.get(key), (txn.version, txn.origin), w.kind, doc)
        return {k: s.doc for k, s in states.items() if s.visible}

    def records(self, name: str) -> dict[int, dict[str, Any]]:
        engine = self.nodes[name]
        table = engine.catalog.table(DB, TABLE)
        out = {}
        for _, raw in engine.store.scan("data", table.prefix, keys.prefix_end(table.prefix)):
            state = merge.decode_state(raw)
            if state.visible:
                out[state.doc["id"]] = state.doc
        return out

    def has_row(self, name: str, key: int) -> bool:
        engine = self.nodes[name]
        table = engine.catalog.table(DB, TABLE)
        return engine.store.data.get(table.prefix + keys.encode_key(key)) is not None


@contextmanager
def world() -> Iterator[World]:
    # RocksDB's background threads may still be removing files of a closed database.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as folder:
        w = World(Path(folder))
        try:
            yield w
        finally:
            w.close()
            gc.collect()


def feed(w: World, source: str, after: types_pb2.SnapshotKey | None) -> CopyFeed:
    """One part of a copy from ``source`` into R (whichever engine R is by then)."""
    request = storage_pb2.SnapshotRequest(database=DB, max_batch_rows=3)
    if after is not None:
        request.start_after.CopyFrom(after)
    plan = plan_snapshot(w.nodes[source], request)
    messages: list[Any] = [plan.header]
    messages.extend(storage_pb2.SnapshotResponse(rows=rows) for rows in plan.batches)
    return CopyFeed(lambda r: merge_snapshot(w.nodes["R"], r), source, DB, messages, after)


def resume(w: World, source: str) -> CopyFeed:
    """A new part from ``source``: after R's stored progress, or a fresh copy."""
    progress = w.nodes["R"].copies.get((DB, source))
    after = None
    if progress is not None and progress.last_table:
        after = types_pb2.SnapshotKey(table=progress.last_table, id=progress.last_id)
    return feed(w, source, after)


# One step of the copy phase: 0 = A's next request, 1 = B's, 2 = a write on R,
# 3 = R's storage restarts (the copies go on), 4 = A's copy is cut off and resumed in a
# new part, 5 = the same for B.
copy_steps = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 2), st.integers(0, KEYS - 1), st.integers(0, 9)),
    min_size=10,
    max_size=60,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    before=write_ops,
    cut_a=write_ops,
    cut_b=write_ops,
    cut_r=write_ops,
    b_saw_r=st.booleans(),
    steps=copy_steps,
    seed=st.integers(0, 2**32),
)
def test_two_interleaved_copies_lose_nothing(
    before: list[tuple[int, int, int]],
    cut_a: list[tuple[int, int, int]],
    cut_b: list[tuple[int, int, int]],
    cut_r: list[tuple[int, int, int]],
    b_saw_r: bool,
    steps: list[tuple[int, int, int, int]],
    seed: int,
) -> None:
    random.seed(seed)
    with world() as w:
        # Together: every node writes, and everything is exchanged.
        for i, (kind, key, value) in enumerate(before):
            w.write("ABR"[i % 3], kind, key, value)
        for source in "ABR":
            for target in "ABR":
                if source != target:
                    w.sync(source, target)
        # The cut: all three write; A and B exchange, R is away.
        for kind, key, value in cut_a:
            if w.write("A", kind, key, value) and kind == 2:
                w.deleted_in_cut.add(key)
        for kind, key, value in cut_b:
            if w.write("B", kind, key, value) and kind == 2:
                w.deleted_in_cut.add(key)
        for kind, key, value in cut_r:
            if w.write("R", kind, key, value) and not b_saw_r:
                w.r_unseen.add(key)
        w.sync("A", "B")
        w.sync("B", "A")
        if b_saw_r:
            # B heard from R (R's log outlived the cut), A did not: B has seen every
            # write of the cut, so its copy decides those keys like the truth does.
            w.sync("R", "B")
        # Retention passes on the sources: R's positions are below their logs.
        w.purge("A")
        w.purge("B")
        # R copies from both at once, writing meanwhile.
        feeds = {"A": feed(w, "A", None), "B": feed(w, "B", None)}

        def advance(source: str) -> None:
            """The source's next request; a copy refused because the other one completed
            (which forgets every unfinished copy) starts again, as the replicator does
            when the source's log no longer reaches R's new positions."""
            try:
                feeds[source].step()
            except FailedPrecondition as refused:
                assert refused.reason == "COPY_OUT_OF_ORDER"
                assert (DB, source) not in w.nodes["R"].copies
                feeds[source] = resume(w, source)

        for action, kind, key, value in steps:
            if action in (0, 1):
                if not feeds["AB"[action]].done:
                    advance("AB"[action])
            elif action == 2:
                if w.write("R", kind, key, value):
                    w.r_unseen.add(key)
            elif action == 3:
                w.restart("R")
            else:
                source = "AB"[action - 4]
                if not feeds[source].done:
                    feeds[source] = resume(w, source)
        for source in "AB":
            while not feeds[source].done:
                advance(source)

        r = w.nodes["R"]
        assert r.copies == {}
        for source in "AB":
            for (database, origin), version in w.nodes[source].positions.items():
                if database == DB:
                    assert r.positions.get((DB, origin), 0) >= version
        truth = w.truth()
        records = w.records("R")
        # A key that A or B deleted (and purged) while R wrote it, unseen by both, is the
        # one place where a purged tombstone leaves no way to order the two: R keeps it.
        ambiguous = w.deleted_in_cut & w.r_unseen
        for key in range(KEYS):
            if key in ambiguous:
                assert w.has_row("R", key), f"key {key}: R's unseen write was dropped"
            else:
                assert records.get(key) == truth.get(key), f"key {key}"


def test_a_stale_part_is_refused_and_changes_nothing() -> None:
    """A request of a part that a resumed part replaced (a replicator's call still in
    flight when its session was replaced) is refused before anything is written."""
    with world() as w:
        for i in range(20):
            w.write("A", 0, i, i)
        old = feed(w, "A", None)
        old.step()  # header
        old.step()  # rows 0..2
        new = resume(w, "A")
        new.step()  # the resumed part's header
        stale = old.messages[old.sent]
        before = w.records("R")
        request = storage_pb2.MergeSnapshotRequest(
            source="A", database=DB, part=old.part, rows=stale.rows
        )
        assert old.after is not None
        request.after.CopyFrom(old.after)
        with pytest.raises(FailedPrecondition) as refused:
            merge_snapshot(w.nodes["R"], request)
        assert refused.value.reason == "COPY_OUT_OF_ORDER"
        assert w.records("R") == before
        while not new.done:
            new.step()
        assert sorted(w.records("R")) == list(range(20))
