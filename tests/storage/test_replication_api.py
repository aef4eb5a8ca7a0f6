"""The replicator-facing RPCs (Subscribe, Apply, Snapshot, MergeSnapshot, GetPositions),
called with the node identity, against real processes."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.client import StorageClient, error_info
from tests.harness.copying import merge_request, until_caught_up
from tests.harness.node import Node
from tests.harness.wait import wait_for

PEER = "peer-a.example"
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- helpers -------------------------------------------------------------------------------


def now_version(offset_ms: int = 0) -> int:
    return (time.time_ns() // 1_000_000 + offset_ms) << 16


def sent(messages: list[Any]) -> list[types_pb2.Transaction]:
    return [t for m in messages for t in m.transactions]


def keyed(txns: list[types_pb2.Transaction]) -> list[tuple[str, int]]:
    return [(t.origin, t.version) for t in txns]


def put(table: str, key: Any, doc: dict[str, Any]) -> types_pb2.Write:
    return types_pb2.Write(
        table=table,
        kind=types_pb2.WRITE_KIND_PUT,
        operation=types_pb2.OPERATION_INSERT,
        id=orjson.dumps(key),
        value=orjson.dumps(doc),
    )


def patch(table: str, key: Any, doc: dict[str, Any]) -> types_pb2.Write:
    return types_pb2.Write(
        table=table,
        kind=types_pb2.WRITE_KIND_PATCH,
        operation=types_pb2.OPERATION_UPDATE,
        id=orjson.dumps(key),
        value=orjson.dumps(doc),
    )


def remote(
    version: int,
    *writes: types_pb2.Write,
    origin: str = PEER,
    database: str = "dev",
    tables: tuple[types_pb2.TableSchema, ...] = (),
) -> types_pb2.Transaction:
    return types_pb2.Transaction(
        origin=origin,
        version=version,
        user="remote-user",
        database=database,
        writes=writes,
        tables=tables,
    )


def apply(
    internal: StorageClient, *txns: types_pb2.Transaction, skew_ms: int = 60_000
) -> pb.ApplyResponse:
    return internal.call("Apply", pb.ApplyRequest(transactions=txns, max_clock_skew_ms=skew_ms))


def positions(internal: StorageClient, database: str = "") -> dict[tuple[str, str], int]:
    reply = internal.call("GetPositions", pb.GetPositionsRequest(database=database))
    return {(p.database, p.origin): p.version for p in reply.positions}


def snapshot(internal: StorageClient, database: str = "dev", **kwargs: Any) -> list[Any]:
    return internal.stream("Snapshot", pb.SnapshotRequest(database=database, **kwargs))


def rows_of(messages: list[Any]) -> list[types_pb2.SnapshotRow]:
    return [r for m in messages for r in m.rows]


def row_keys(rows: list[types_pb2.SnapshotRow]) -> list[tuple[str, Any]]:
    return [(r.table, orjson.loads(r.id)) for r in rows]


# -- Subscribe -----------------------------------------------------------------------------


def test_subscribe_sends_the_log_then_tails_new_commits(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    for i in range(12):
        client.insert("dev", "dog", [{"id": i}])
    logged = client.transactions("dev")
    assert len(logged) == 13

    request = pb.SubscribeRequest(
        databases=["dev"], max_batch_transactions=5, heartbeat_interval_ms=60_000
    )
    stream = internal.node_stub.Subscribe(request, metadata=internal.metadata, timeout=60)
    received: list[types_pb2.Transaction] = []
    sizes: list[int] = []
    try:
        for message in stream:
            sizes.append(len(message.transactions))
            received.extend(message.transactions)
            assert message.node_time > 0
            if message.caught_up:
                break
        # Existing transactions first, in commit order, in bounded batches.
        assert keyed(received) == keyed(logged)
        assert max(sizes) == 5
        assert len(sizes) >= 3
        assert received[1].writes[0].id == b"0"

        # Then new commits of a concurrent writer arrive as they happen. The heartbeat is a
        # minute and the call's deadline shorter, so nothing here relies on a timer.
        writer = node.client()
        acked: list[int] = []

        def write() -> None:
            for i in range(100, 130):
                acked.append(writer.insert("dev", "dog", [{"id": i}]).version)

        thread = threading.Thread(target=write)
        thread.start()
        tail: list[types_pb2.Transaction] = []
        try:
            for message in stream:
                assert len(message.transactions) <= 5
                tail.extend(message.transactions)
                if len(tail) >= 30:
                    break
        finally:
            thread.join(30)
        assert [t.version for t in tail] == acked
        assert [orjson.loads(t.writes[0].id) for t in tail] == list(range(100, 130))
        assert all(t.origin == node.name and t.user == "admin" for t in tail)
    finally:
        stream.cancel()


def test_subscribe_positions_exclusions_and_filters(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    client.create_table("dev", "cat")
    client.create_table("other", "dog")
    mine = [client.insert("dev", "dog", [{"id": i}]).version for i in range(4)]
    base = now_version(-10_000)
    theirs = [base + i for i in range(1, 4)]
    reply = apply(internal, *[remote(v, put("dog", f"p{v}", {"id": f"p{v}"})) for v in theirs])
    assert reply.applied == 3
    cat = client.insert("dev", "cat", [{"id": 1}]).version
    client.insert("other", "dog", [{"id": 1}])

    everything = sent(until_caught_up(internal, pb.SubscribeRequest(databases=["dev"])))
    local = [t for t in everything if t.origin == node.name]
    assert [t.version for t in local if t.writes] == [*mine, cat]
    assert [t.version for t in everything if t.origin == PEER] == theirs
    assert all(t.database == "dev" for t in everything)
    # The applied transactions are relayed with their origin, after the local ones before them.
    assert keyed(everything) == keyed(client.transactions("dev"))

    after_two = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(
                databases=["dev"],
                positions=[
                    types_pb2.Position(database="dev", origin=node.name, version=mine[1]),
                    types_pb2.Position(database="dev", origin=PEER, version=theirs[0]),
                ],
            ),
        )
    )
    assert keyed(after_two) == [
        (node.name, mine[2]),
        (node.name, mine[3]),
        (PEER, theirs[1]),
        (PEER, theirs[2]),
        (node.name, cat),
    ]

    excluded = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(
                databases=["dev"],
                exclude_origins=[node.name],
                positions=[types_pb2.Position(database="dev", origin=PEER, version=theirs[1])],
            ),
        )
    )
    assert keyed(excluded) == [(PEER, theirs[2])]

    # default_version applies to (database, origin) pairs without a position.
    from_default = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(
                databases=["dev"],
                default_version=mine[3],
                positions=[types_pb2.Position(database="dev", origin=PEER, version=0)],
            ),
        )
    )
    assert keyed(from_default) == [(PEER, v) for v in theirs] + [(node.name, cat)]

    only_cat = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(tables=[types_pb2.TableRef(database="dev", table="cat")]),
        )
    )
    assert [t.version for t in only_cat if t.writes] == [cat]
    assert all(w.table == "cat" for t in only_cat for w in t.writes)
    assert all(s.name == "cat" for t in only_cat for s in t.tables)

    every_database = sent(until_caught_up(internal, pb.SubscribeRequest()))
    assert {t.database for t in every_database} == {"dev", "other", "system"}

    # Nothing pending: the first message says so at once.
    latest = positions(internal)
    idle = until_caught_up(
        internal,
        pb.SubscribeRequest(
            positions=[
                types_pb2.Position(database=d, origin=o, version=v) for (d, o), v in latest.items()
            ]
        ),
    )
    assert len(idle) == 1
    assert idle[0].caught_up
    assert list(idle[0].transactions) == []

    internal.expect(
        INVALID,
        "Subscribe",
        pb.SubscribeRequest(positions=[types_pb2.Position(database="dev", version=1)]),
        "position",
    )
    internal.expect(
        INVALID, "Subscribe", pb.SubscribeRequest(max_batch_transactions=10_000_000), "max_batch"
    )


def test_replicate_false_tables_never_travel(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    local = client.create_table("dev", "local", replicate=False)
    assert local.replicate is False
    client.create_table("dev", "shared")
    client.insert("dev", "local", [{"id": 1, "secret": True}])
    client.insert("dev", "shared", [{"id": 1}])
    both = client.call(
        "Transact",
        pb.TransactRequest(
            database="dev",
            operations=[
                pb.TransactOperation(
                    table="local", operation=types_pb2.OPERATION_INSERT, records=[b'{"id": 2}']
                ),
                pb.TransactOperation(
                    table="shared", operation=types_pb2.OPERATION_INSERT, records=[b'{"id": 2}']
                ),
            ],
        ),
    ).version

    def mentions_local(txns: list[types_pb2.Transaction]) -> bool:
        return any(w.table == "local" for t in txns for w in t.writes) or any(
            s.name == "local" for t in txns for s in t.tables
        )

    request = pb.SubscribeRequest(databases=["dev"], heartbeat_interval_ms=60_000)
    stream = internal.node_stub.Subscribe(request, metadata=internal.metadata, timeout=30)
    try:
        backlog: list[types_pb2.Transaction] = []
        for message in stream:
            backlog.extend(message.transactions)
            if message.caught_up:
                break
        assert not mentions_local(backlog)
        shared_writes = [(t.version, orjson.loads(w.id)) for t in backlog for w in t.writes]
        assert shared_writes[-1] == (both, 2)
        assert len(shared_writes) == 2
        # Even asked for by name, the table is not sent; live writes to it neither.
        client.insert("dev", "local", [{"id": 3}])
        last = client.insert("dev", "shared", [{"id": 3}]).version
        for message in stream:
            assert not mentions_local(list(message.transactions))
            if any(t.version == last for t in message.transactions):
                break
    finally:
        stream.cancel()
    named = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(tables=[types_pb2.TableRef(database="dev", table="local")]),
        )
    )
    assert named == []
    header = snapshot(internal)[0]
    assert [t.name for t in header.tables] == ["shared"]
    assert {t for t, _ in row_keys(rows_of(snapshot(internal)))} == {"shared"}


def test_subscribe_heartbeats_byte_bounds_and_relays_applied(
    node: Node, client: StorageClient
) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    for i in range(6):
        client.insert("dev", "dog", [{"id": i, "pad": "x" * 200}])
    # A message holds whole transactions: with a tiny byte bound, one per message.
    tiny = until_caught_up(internal, pb.SubscribeRequest(databases=["dev"], max_batch_bytes=1))
    assert [len(m.transactions) for m in tiny[:-1]] == [1] * 6
    assert len(tiny[-1].transactions) == 1
    size = max(t.ByteSize() for t in sent(tiny))
    pairs = until_caught_up(
        internal, pb.SubscribeRequest(databases=["dev"], max_batch_bytes=2 * size + 1)
    )
    assert keyed(sent(pairs)) == keyed(sent(tiny))
    assert all(len(m.transactions) <= 2 for m in pairs)
    assert len(pairs) < len(tiny)

    stream = internal.node_stub.Subscribe(
        pb.SubscribeRequest(databases=["dev"], heartbeat_interval_ms=100),
        metadata=internal.metadata,
        timeout=30,
    )
    try:
        backlog = next(stream)
        assert backlog.caught_up
        assert len(backlog.transactions) == 7
        # Idle: empty caught_up heartbeats, spaced by the interval.
        started = time.monotonic()
        beats = [next(stream) for _ in range(3)]
        assert all(b.caught_up and not b.transactions for b in beats)
        assert time.monotonic() - started >= 0.15
        assert beats[0].node_time <= beats[1].node_time <= beats[2].node_time
        # A transaction applied from elsewhere is relayed with its origin.
        version = now_version(-1_000)
        apply(internal, remote(version, put("dog", "relayed", {"id": "relayed"})))
        for message in stream:
            if message.transactions:
                assert keyed(list(message.transactions)) == [(PEER, version)]
                assert message.transactions[0].local_time > version
                break
    finally:
        stream.cancel()


# -- Apply ---------------------------------------------------------------------------------


def test_apply_transactions_from_another_origin(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog", indexed=["breed"])
    client.insert("dev", "dog", [{"id": 1, "name": "local", "breed": "pug"}])
    log_before = client.transactions("dev")
    v = now_version(1_000)  # newer than the local writes: the remote writes win
    batch = [
        remote(v + 1, put("dog", 2, {"id": 2, "name": "remote", "breed": "lab"})),
        remote(v + 2, patch("dog", 1, {"id": 1, "breed": "lab"}), put("dog", 3, {"id": 3})),
        remote(
            v + 3,
            types_pb2.Write(table="dog", kind=types_pb2.WRITE_KIND_DELETE, id=b"3"),
        ),
    ]
    reply = apply(internal, *batch)
    assert (reply.applied, reply.skipped) == (3, 0)
    assert [(p.database, p.origin, p.version) for p in reply.positions] == [("dev", PEER, v + 3)]
    assert client.get("dev", "dog", [1, 2, 3]) == [
        {"id": 1, "name": "local", "breed": "lab"},
        {"id": 2, "name": "remote", "breed": "lab"},
    ]
    assert [r["id"] for r in client.by_value("dev", "dog", "breed", "lab")] == [1, 2]
    assert client.by_value("dev", "dog", "breed", "pug") == []
    assert client.describe("dev", "dog").record_count == 2

    # Re-logged with the origin, version and user kept, and this node's local time.
    relogged = client.transactions("dev")[len(log_before) :]
    assert keyed(relogged) == [(PEER, v + 1), (PEER, v + 2), (PEER, v + 3)]
    assert all(t.user == "remote-user" for t in relogged)
    assert all(t.local_time > t.version for t in relogged)
    assert relogged[0].local_time < relogged[1].local_time < relogged[2].local_time
    # Prior values are this node's view before each write.
    priors = {
        (t.version, orjson.loads(w.id)): orjson.loads(w.prior) if w.prior else None
        for t in relogged
        for w in t.writes
    }
    assert priors == {
        (v + 1, 2): None,
        (v + 2, 1): {"id": 1, "name": "local", "breed": "pug"},
        (v + 2, 3): None,
        (v + 3, 3): {"id": 3},
    }
    assert positions(internal)[("dev", PEER)] == v + 3
    assert positions(internal, "dev")[("dev", node.name)] == log_before[-1].version

    # Applying the same batch again is a no-op.
    state_before = (client.all_records("dev", "dog"), client.transactions("dev"))
    again = apply(internal, *batch)
    assert (again.applied, again.skipped) == (0, 3)
    assert [(p.origin, p.version) for p in again.positions] == [(PEER, v + 3)]
    assert (client.all_records("dev", "dog"), client.transactions("dev")) == state_before
    # Partly new: only the new one is applied.
    newer = remote(v + 4, put("dog", 4, {"id": 4}))
    mixed = apply(internal, batch[2], newer)
    assert (mixed.applied, mixed.skipped) == (1, 1)
    assert client.get("dev", "dog", [4]) == [{"id": 4}]

    # A write older than the record's current state is logged but changes nothing.
    stale = apply(
        internal, remote(now_version(-30_000), patch("dog", 1, {"breed": "old"}), origin="b")
    )
    assert stale.applied == 1
    assert client.get("dev", "dog", [1]) == [{"id": 1, "name": "local", "breed": "lab"}]
    assert client.transactions("dev")[-1].origin == "b"

    # A local write after the apply is newer than anything applied.
    local = client.insert("dev", "dog", [{"id": 5}]).version
    assert local > v + 4


def test_apply_refuses_versions_too_far_ahead(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    before = (client.all_records("dev", "dog"), client.transactions("dev"), positions(internal))
    ok = remote(now_version(-1_000), put("dog", 1, {"id": 1}))
    ahead = remote(now_version(120_000), put("dog", 2, {"id": 2}), origin="fast-clock")
    error = internal.expect(
        PRECONDITION,
        "Apply",
        pb.ApplyRequest(transactions=[ok, ahead], max_clock_skew_ms=60_000),
        "ahead",
        "fast-clock",
    )
    info = error_info(error)
    assert (info.domain, info.reason) == ("shoal", "CLOCK_SKEW")
    assert info.metadata["origin"] == "fast-clock"
    assert int(info.metadata["ahead_ms"]) > 100_000
    # Nothing of the request was applied, not even the transaction before.
    assert (client.all_records("dev", "dog"), client.transactions("dev"), positions(internal)) == (
        before
    )
    # With the check disabled it applies, and this node's clock moves past it.
    reply = apply(internal, ok, ahead, skew_ms=0)
    assert reply.applied == 2
    local = client.insert("dev", "dog", [{"id": 3}]).version
    assert local > ahead.version
    status = internal.call("GetPositions", pb.GetPositionsRequest())
    assert status.node_time >= local


def test_apply_creates_missing_databases_tables_and_attributes(
    node: Node, client: StorageClient
) -> None:
    internal = node.internal_client()
    v = now_version(-2_000)
    schema = types_pb2.TableSchema(
        name="cat",
        primary_key="cid",
        indexed_attributes=["colour"],
        replicate=True,
        attributes=["cid", "colour", "declared"],
    )
    reply = apply(
        internal,
        remote(
            v, put("cat", "tom", {"cid": "tom", "colour": "grey"}), database="zoo", tables=(schema,)
        ),
        remote(v + 1, put("bird", 1, {"id": 1, "wings": 2}), database="zoo"),
    )
    assert reply.applied == 2
    cat = client.describe("zoo", "cat")
    assert cat.primary_key == "cid"
    assert cat.replicate is True
    assert {a.name: a.indexed for a in cat.attributes} == {
        "cid": True,
        "colour": True,
        "declared": False,
    }
    assert client.by_value("zoo", "cat", "colour", "grey") == [{"cid": "tom", "colour": "grey"}]
    # A table without a schema in the transaction gets the defaults.
    bird = client.describe("zoo", "bird")
    assert bird.primary_key == "id"
    assert client.get("zoo", "bird", [1]) == [{"id": 1, "wings": 2}]
    # A later schema adds an index to the existing table, built over its records.
    indexed = types_pb2.TableSchema(
        name="bird", primary_key="id", indexed_attributes=["wings"], replicate=True
    )
    apply(
        internal,
        remote(v + 2, put("bird", 2, {"id": 2, "wings": 2}), database="zoo", tables=(indexed,)),
    )
    assert [r["id"] for r in client.by_value("zoo", "bird", "wings", 2)] == [1, 2]
    assert {a.name: a.indexed for a in client.describe("zoo", "bird").attributes}["wings"] is True


def test_apply_rejects_malformed_transactions_whole(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    v = now_version(-2_000)
    good = remote(v, put("dog", 1, {"id": 1}))
    before = (client.all_records("dev", "dog"), client.transactions("dev"), positions(internal))
    bad_value = types_pb2.Write(table="dog", kind=types_pb2.WRITE_KIND_PUT, id=b"2", value=b"{x")
    not_object = types_pb2.Write(table="dog", kind=types_pb2.WRITE_KIND_PUT, id=b"2", value=b"[1]")
    cases: list[tuple[types_pb2.Transaction, list[str]]] = [
        (remote(v + 1, bad_value), ["json"]),
        (remote(v + 1, not_object), ["object"]),
        (remote(v + 1, types_pb2.Write(table="dog", id=b"2", value=b"{}")), ["kind"]),
        (remote(v + 1, put("dog", True, {"id": True})), ["primary key"]),
        (remote(v + 1, put("bad name", 2, {"id": 2})), ["table name"]),
        (remote(v + 1, put("dog", 2, {"id": 2}), origin=""), ["origin"]),
        (remote(0, put("dog", 2, {"id": 2})), ["version"]),
        (remote(v + 1, put("dog", 2, {"id": 2}), database=""), ["database"]),
        (
            remote(
                v + 1, put("new_table", 2, {"id": 2}), tables=(types_pb2.TableSchema(name="x y"),)
            ),
            ["table name"],
        ),
    ]
    for txn, words in cases:
        internal.expect(INVALID, "Apply", pb.ApplyRequest(transactions=[good, txn]), *words)
        assert (
            client.all_records("dev", "dog"),
            client.transactions("dev"),
            positions(internal),
        ) == before, words
        assert [
            t.name
            for t in client.call(
                "DescribeDatabase", pb.DescribeDatabaseRequest(database="dev")
            ).database.tables
        ] == ["dog"]


# -- Snapshot ------------------------------------------------------------------------------


def test_snapshot_is_ordered_consistent_and_resumable(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "b_table", indexed=["n"])
    client.create_table("dev", "a_table", primary_key="key")
    client.insert("dev", "a_table", [{"key": k} for k in [10, "x", 2, "a", -1, 2.5, "ab"]])
    client.delete("dev", "a_table", ["x"])
    client.insert("dev", "b_table", [{"id": i, "n": i % 3} for i in range(20)])
    last = client.update("dev", "b_table", [{"id": 5, "n": 100}]).version

    messages = snapshot(internal, max_batch_rows=3)
    header = messages[0]
    assert [(p.database, p.origin, p.version) for p in header.positions] == [
        ("dev", node.name, last)
    ]
    schemas = {t.name: t for t in header.tables}
    assert set(schemas) == {"a_table", "b_table"}
    assert schemas["a_table"].primary_key == "key"
    assert list(schemas["b_table"].indexed_attributes) == ["n"]
    assert set(schemas["b_table"].attributes) == {"id", "n"}
    assert header.estimated_rows == 26
    assert all(len(m.rows) <= 3 for m in messages)
    rows = rows_of(messages)
    expected_keys = [("a_table", k) for k in [-1, 2, 2.5, 10, "a", "ab", "x"]] + [
        ("b_table", i) for i in range(20)
    ]
    assert row_keys(rows) == expected_keys
    states = {key: orjson.loads(r.state) for key, r in zip(expected_keys, rows, strict=True)}
    assert states[("a_table", "x")][2:4] == [True, {}]  # the tombstone travels
    assert states[("b_table", 5)][3] == {"id": 5, "n": 100}
    assert states[("b_table", 5)][4] == {"id": [last, node.name], "n": [last, node.name]}
    assert states[("b_table", 6)][:4] == [
        states[("b_table", 6)][0],
        node.name,
        False,
        {"id": 6, "n": 0},
    ]

    # Messages are bounded in bytes too (a single row is still sent).
    small = snapshot(internal, max_batch_bytes=1)
    assert [len(m.rows) for m in small[1:]] == [1] * len(rows)
    assert rows_of(small) == rows
    internal.expect(
        INVALID, "Snapshot", pb.SnapshotRequest(database="dev", max_batch_rows=200_000), "max"
    )

    # Resuming after any row yields exactly the rows after it.
    for k in [0, 1, 6, 7, 15, len(rows) - 1]:
        after = rows[k]
        resumed = snapshot(
            internal,
            start_after=types_pb2.SnapshotKey(table=after.table, id=after.id),
            max_batch_rows=4,
        )
        assert rows_of(resumed) == rows[k + 1 :], k
    # A key between two rows resumes at the next one; a table before all starts at the top.
    between = snapshot(internal, start_after=types_pb2.SnapshotKey(table="a_table", id=b"3"))
    assert row_keys(rows_of(between)) == expected_keys[3:]
    before_all = snapshot(internal, start_after=types_pb2.SnapshotKey(table="A", id=b"0"))
    assert row_keys(rows_of(before_all)) == expected_keys

    internal.expect(
        grpc.StatusCode.NOT_FOUND, "Snapshot", pb.SnapshotRequest(database="nope"), "nope"
    )
    internal.expect(
        INVALID,
        "Snapshot",
        pb.SnapshotRequest(
            database="dev", start_after=types_pb2.SnapshotKey(table="a_table", id=b"true")
        ),
        "start_after",
    )


def test_snapshot_reads_one_consistent_point(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    pad = "p" * 400
    for start in range(0, 4000, 1000):
        client.insert("dev", "dog", [{"id": i, "pad": pad} for i in range(start, start + 1000)])
    version = client.transactions("dev")[-1].version
    stream = internal.node_stub.Snapshot(
        pb.SnapshotRequest(database="dev", max_batch_rows=50),
        metadata=internal.metadata,
        timeout=60,
    )
    try:
        header = next(stream)
        first = next(stream)
        # Writes while the copy streams: none of them may show up in it.
        client.delete("dev", "dog", list(range(3000, 3100)))
        client.update("dev", "dog", [{"id": i, "pad": "changed"} for i in range(3500, 3600)])
        client.insert("dev", "dog", [{"id": i} for i in range(5000, 5100)])
        rest = list(stream)
    finally:
        stream.cancel()
    assert [(p.origin, p.version) for p in header.positions] == [(node.name, version)]
    rows = [*first.rows, *(r for m in rest for r in m.rows)]
    assert [orjson.loads(r.id) for r in rows] == list(range(4000))
    assert all(orjson.loads(r.state)[3] == {"id": orjson.loads(r.id), "pad": pad} for r in rows)


# -- MergeSnapshot -------------------------------------------------------------------------


def test_merge_snapshot_into_another_node_survives_kill(make_node: MakeNode) -> None:
    source, target = make_node(), make_node()
    src, dst = source.client(), target.client()
    src_internal, dst_internal = source.internal_client(), target.internal_client()

    dst.create_table("dev", "dog")
    dst.insert("dev", "dog", [{"id": 8, "name": "target-old"}])
    dst.insert("dev", "dog", [{"id": 1000 + i, "name": f"only-target-{i}"} for i in range(10)])
    src.create_table("dev", "dog", indexed=["name"])
    src.create_table("dev", "cat")
    src.insert("dev", "dog", [{"id": i, "name": f"dog-{i}"} for i in range(300)])
    src.update("dev", "dog", [{"id": 8, "name": "source-new"}])
    src.delete("dev", "dog", list(range(250, 260)))
    src.insert("dev", "cat", [{"id": i} for i in range(40)])
    dst.update("dev", "dog", [{"id": 1000, "name": "target-newest"}])
    # Key 7 exists on both; the target's write is newer and must win.
    dst.insert("dev", "dog", [{"id": 7, "name": "target-newer"}])

    messages = snapshot(src_internal, max_batch_rows=50)
    header = messages[0]
    all_rows = rows_of(messages)
    assert len(all_rows) == 40 + 300
    source_version = positions(src_internal)[("dev", source.name)]

    part = 11
    after: types_pb2.SnapshotKey | None = None

    def merge(rows: list[types_pb2.SnapshotRow], complete: bool = False, header: Any = None) -> Any:
        nonlocal after
        progress = dst_internal.call(
            "MergeSnapshot",
            merge_request(
                source.name, "dev", part, rows, header=header, after=after, complete=complete
            ),
        ).progress
        if rows:
            after = types_pb2.SnapshotKey(table=rows[-1].table, id=rows[-1].id)
        return progress

    first = merge(all_rows[:60], header=header)
    assert (first.rows, first.estimated_rows, first.complete) == (60, 330, False)
    assert (first.last_key.table, first.last_key.id) == (all_rows[59].table, all_rows[59].id)
    second = merge(all_rows[60:120])
    assert second.rows == 120
    assert second.bytes == sum(len(r.state) for r in all_rows[:120])

    # The receiving storage dies hard; its copy progress survives with the data.
    target.kill("storage")
    target.start_service("storage")
    progress = dst_internal.call("GetPositions", pb.GetPositionsRequest(database="dev"))
    [copy] = progress.copies
    assert (copy.database, copy.source, copy.rows, copy.complete) == (
        "dev",
        source.name,
        120,
        False,
    )
    assert (copy.last_key.table, copy.last_key.id) == (all_rows[119].table, all_rows[119].id)
    assert copy.estimated_rows == 330
    assert ("dev", source.name) not in {(p.database, p.origin) for p in progress.positions}
    merged_so_far = dst.get("dev", "dog", [orjson.loads(r.id) for r in all_rows[40:120]])
    assert len(merged_so_far) == 80

    # Resume from the stored key with a new snapshot, finishing in several parts.
    resumed = snapshot(
        src_internal,
        start_after=types_pb2.SnapshotKey(table=copy.last_key.table, id=copy.last_key.id),
        max_batch_rows=100,
    )
    rest = rows_of(resumed)
    assert rest == all_rows[120:]
    part = 12
    merge(rest[:100], header=resumed[0])
    done = merge(rest[100:], complete=True)
    assert done.complete
    assert done.rows == len(all_rows)

    final = dst_internal.call("GetPositions", pb.GetPositionsRequest(database="dev"))
    assert list(final.copies) == []
    adopted = {(p.database, p.origin): p.version for p in final.positions}
    assert adopted[("dev", source.name)] == source_version
    horizons = {(p.database, p.origin): p.version for p in final.horizons}
    assert horizons[("dev", source.name)] == source_version

    dogs = {r["id"]: r for r in dst.all_records("dev", "dog")}
    expected_ids = set(range(250)) | set(range(260, 300)) | set(range(1000, 1010))
    assert set(dogs) == expected_ids
    assert dogs[7]["name"] == "target-newer"
    assert dogs[8]["name"] == "source-new"
    assert dogs[1000]["name"] == "target-newest"
    assert dogs[1005]["name"] == "only-target-5"
    assert dogs[100]["name"] == "dog-100"
    assert dst.describe("dev", "dog").record_count == len(expected_ids)
    assert [r["id"] for r in dst.all_records("dev", "cat")] == list(range(40))
    # The schema came with the data: the index exists and answers.
    prefixed = dst.by_value("dev", "dog", "name", "dog-1*")
    assert sorted(r["id"] for r in prefixed) == sorted(
        i for i in expected_ids if i < 1000 and str(i).startswith("1")
    )
    assert [r["id"] for r in dst.by_value("dev", "dog", "name", "dog-12")] == [12]
    # A local write after the copy is newer than everything copied.
    assert dst.insert("dev", "dog", [{"id": 5000}]).version > source_version


def test_merge_snapshot_keeps_the_lowest_positions_of_its_parts(node: Node) -> None:
    internal = node.internal_client()
    client = node.client()
    base = now_version(-60_000)
    schema = types_pb2.TableSchema(name="dog", primary_key="id", replicate=True)

    def row(key: int, version: int, origin: str) -> types_pb2.SnapshotRow:
        state = orjson.dumps([version, origin, False, {"id": key, "from": origin}, {}])
        return types_pb2.SnapshotRow(table="dog", id=orjson.dumps(key), state=state)

    after: types_pb2.SnapshotKey | None = None

    def merge(part: dict[str, int], rows: list[types_pb2.SnapshotRow], complete: bool) -> Any:
        """Each call is one part of the copy (a resumed Snapshot with its own positions)."""
        nonlocal after
        header = pb.SnapshotResponse(
            positions=[
                types_pb2.Position(database="dev", origin=o, version=v) for o, v in part.items()
            ],
            tables=[schema],
        )
        progress = internal.call(
            "MergeSnapshot",
            merge_request(
                "src", "dev", len(rows) + 1, rows, header=header, after=after, complete=complete
            ),
        ).progress
        after = types_pb2.SnapshotKey(table=rows[-1].table, id=rows[-1].id)
        return progress

    merge({"a": base + 100, "b": base + 50}, [row(1, base + 10, "a")], False)
    merge({"a": base + 90, "b": base + 70, "c": base + 5}, [row(2, base + 20, "b")], False)
    copies = internal.call("GetPositions", pb.GetPositionsRequest()).copies
    assert [(c.rows, c.last_key.id) for c in copies] == [(2, b"2")]
    done = merge({"a": base + 95, "b": base + 80, "c": base + 6}, [row(3, base + 30, "c")], True)
    assert done.complete
    assert done.rows == 3
    adopted = positions(internal, "dev")
    assert adopted == {("dev", "a"): base + 90, ("dev", "b"): base + 50}
    assert client.all_records("dev", "dog") == [
        {"id": 1, "from": "a"},
        {"id": 2, "from": "b"},
        {"id": 3, "from": "c"},
    ]
    # A second, older copy never lowers adopted positions.
    after = None
    merge({"a": base + 1}, [row(1, base + 1, "a")], True)
    assert positions(internal, "dev")[("dev", "a")] == base + 90
    assert client.get("dev", "dog", [1]) == [{"id": 1, "from": "a"}]


def test_merge_snapshot_errors_change_nothing(node: Node) -> None:
    internal = node.internal_client()
    node.client().create_table("dev", "dog")
    good = types_pb2.SnapshotRow(table="dog", id=b"1", state=b'[5,"x",false,{"id":1},{}]')
    two = types_pb2.SnapshotRow(table="dog", id=b"2", state=b'[5,"x",false,{"id":2},{}]')
    cases: list[tuple[pb.MergeSnapshotRequest, list[str]]] = [
        (
            pb.MergeSnapshotRequest(database="dev", rows=[good], part=7, begins_part=True),
            ["source"],
        ),
        (
            pb.MergeSnapshotRequest(
                source="x", database="bad name", rows=[good], part=7, begins_part=True
            ),
            ["database name"],
        ),
        (pb.MergeSnapshotRequest(source="x", database="dev", rows=[good]), ["part"]),
        (
            pb.MergeSnapshotRequest(
                source="x",
                database="dev",
                rows=[good, types_pb2.SnapshotRow(table="dog", id=b"2", state=b"[1,2]")],
                part=7,
                begins_part=True,
            ),
            ["row 1"],
        ),
        (
            pb.MergeSnapshotRequest(
                source="x",
                database="dev",
                rows=[good, types_pb2.SnapshotRow(table="dog", id=b"null", state=good.state)],
                part=7,
                begins_part=True,
            ),
            ["id 1"],
        ),
        (
            pb.MergeSnapshotRequest(
                source="x", database="dev", rows=[two, good], part=7, begins_part=True
            ),
            ["row 1", "key order"],
        ),
        (
            pb.MergeSnapshotRequest(
                source="x", database="dev", rows=[good, good], part=7, begins_part=True
            ),
            ["row 1", "key order"],
        ),
    ]
    for request, words in cases:
        internal.expect(INVALID, "MergeSnapshot", request, *words)
    # Requests that do not continue a copy: refused before anything is merged.
    out_of_order = [
        (pb.MergeSnapshotRequest(source="x", database="dev", part=7, rows=[good]), ["no copy"]),
        (
            pb.MergeSnapshotRequest(
                source="x",
                database="dev",
                part=7,
                begins_part=True,
                after=types_pb2.SnapshotKey(table="dog", id=b"1"),
                rows=[two],
            ),
            ["no copy"],
        ),
    ]
    for request, words in out_of_order:
        error = internal.expect(PRECONDITION, "MergeSnapshot", request, *words)
        assert error_info(error).reason == "COPY_OUT_OF_ORDER"
    assert node.client().all_records("dev", "dog") == []
    reply = internal.call("GetPositions", pb.GetPositionsRequest())
    assert list(reply.copies) == []


# -- log truncation ------------------------------------------------------------------------


def test_subscribe_below_the_log_horizon_is_log_truncated(
    node: Node, client: StorageClient
) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    first = client.insert("dev", "dog", [{"id": 1}]).version
    second = client.insert("dev", "dog", [{"id": 2}]).version
    cutoff = wait_for(
        lambda: (ms := time.time_ns() // 1_000_000) > (second >> 16) and ms,
        5,
        "the clock to pass the last write",
    )
    ts = Timestamp()
    ts.FromMilliseconds(cutoff)
    purged = client.call("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=ts, database="dev"))
    assert purged.deleted_transactions == 3
    third = client.insert("dev", "dog", [{"id": 3}]).version

    for request in [
        pb.SubscribeRequest(
            positions=[types_pb2.Position(database="dev", origin=node.name, version=first)]
        ),
        pb.SubscribeRequest(databases=["dev"]),
        pb.SubscribeRequest(
            positions=[types_pb2.Position(database="dev", origin=node.name, version=0)]
        ),
    ]:
        error = internal.expect(PRECONDITION, "Subscribe", request, "copy")
        info = error_info(error)
        assert (info.domain, info.reason) == ("shoal", "LOG_TRUNCATED")
        assert info.metadata["database"] == "dev"
        assert info.metadata["origin"] == node.name
        assert int(info.metadata["horizon"]) == second

    # At the horizon, or with a later default start, the log can still serve.
    at_horizon = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(
                databases=["dev"],
                positions=[types_pb2.Position(database="dev", origin=node.name, version=second)],
            ),
        )
    )
    assert [t.version for t in at_horizon] == [third]
    later = sent(
        until_caught_up(internal, pb.SubscribeRequest(databases=["dev"], default_version=first))
    )
    assert [t.version for t in later] == [third]
    horizons = internal.call("GetPositions", pb.GetPositionsRequest(database="dev")).horizons
    assert [(h.database, h.origin, h.version) for h in horizons] == [("dev", node.name, second)]
