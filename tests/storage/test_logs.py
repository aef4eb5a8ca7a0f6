"""The transaction log, the audit log and purging them (DeleteLogsBefore)."""

from __future__ import annotations

import time
from typing import Any

import grpc
import orjson
from google.protobuf.timestamp_pb2 import Timestamp
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.common.hlc import version_ms
from tests.harness.client import StorageClient, ids
from tests.harness.node import Node
from tests.harness.wait import wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def stamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def next_millisecond(version: int) -> int:
    """Wait until the wall clock is past the millisecond of ``version``; returns now (ms)."""
    return wait_for(
        lambda: now_ms() if now_ms() > version_ms(version) else None,
        5,
        "the clock to pass a version's millisecond",
    )


def log(client: StorageClient, database: str = "dev", **kwargs: Any) -> list[types_pb2.Transaction]:
    chunks = client.stream(
        "ReadTransactionLog", pb.ReadTransactionLogRequest(database=database, **kwargs)
    )
    return [t for c in chunks for t in c.transactions]


def audit(
    client: StorageClient, table: str = "dog", keys: tuple[Any, ...] = (), **kwargs: Any
) -> list[types_pb2.Transaction]:
    chunks = client.stream(
        "ReadAuditLog",
        pb.ReadAuditLogRequest(database="dev", table=table, ids=ids(keys), **kwargs),
    )
    return [t for c in chunks for t in c.entries]


def writes(txns: list[types_pb2.Transaction]) -> list[list[tuple[str, Any]]]:
    return [[(w.table, orjson.loads(w.id)) for w in t.writes] for t in txns]


def snapshot_rows(node: Node, database: str = "dev") -> dict[tuple[str, Any], list[Any]]:
    chunks = node.internal_client().stream("Snapshot", pb.SnapshotRequest(database=database))
    return {(r.table, orjson.loads(r.id)): orjson.loads(r.state) for c in chunks for r in c.rows}


def test_read_transaction_log_by_time_table_and_limit(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    created = client.create_table("dev", "cat")
    client.create_table("other", "dog")
    first = client.transactions("dev")
    assert len(first) == 2
    assert [t.tables[0].name for t in first] == ["dog", "cat"]
    assert all(not t.writes for t in first)
    assert created.name == "cat"

    next_millisecond(first[-1].version)
    a = client.insert("dev", "dog", [{"id": 1, "name": "a"}]).version
    client.insert("other", "dog", [{"id": 1}])
    next_millisecond(a)
    b = client.insert("dev", "cat", [{"id": 1, "name": "b"}]).version
    next_millisecond(b)
    c = client.update("dev", "dog", [{"id": 1, "name": "c"}]).version

    everything = log(client)
    assert [t.version for t in everything] == [first[0].version, first[1].version, a, b, c]
    assert all(t.database == "dev" and t.user == "admin" for t in everything)
    assert [t.local_time for t in everything] == [t.version for t in everything]
    assert writes(everything[2:]) == [[("dog", 1)], [("cat", 1)], [("dog", 1)]]

    assert [t.version for t in log(client, table="dog")] == [first[0].version, a, c]
    assert [t.version for t in log(client, table="cat")] == [first[1].version, b]
    assert log(client, table="bird") == []

    b_ms, c_ms = version_ms(b), version_ms(c)
    assert [t.version for t in log(client, start_time=stamp(b_ms), end_time=stamp(c_ms))] == [b]
    assert [t.version for t in log(client, start_time=stamp(b_ms))] == [b, c]
    assert [t.version for t in log(client, end_time=stamp(b_ms))] == [
        first[0].version,
        first[1].version,
        a,
    ]
    assert [t.version for t in log(client, start_time=stamp(b_ms), table="dog")] == [c]
    assert log(client, start_time=stamp(c_ms + 1)) == []
    assert log(client, start_time=stamp(b_ms), end_time=stamp(b_ms)) == []
    assert [t.version for t in log(client, limit=2)] == [first[0].version, first[1].version]
    assert [t.version for t in log(client, start_time=stamp(b_ms), limit=1)] == [b]

    client.expect(
        INVALID,
        "ReadTransactionLog",
        pb.ReadTransactionLogRequest(database="dev", start_time=stamp(c_ms), end_time=stamp(b_ms)),
        "end_time",
        "before",
    )
    client.expect(
        grpc.StatusCode.NOT_FOUND,
        "ReadTransactionLog",
        pb.ReadTransactionLogRequest(database="nope"),
        "nope",
        "does not exist",
    )


def test_audit_log_carries_prior_values(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": 1, "name": "a", "age": 1}, {"id": 2, "name": "x"}])
    client.update("dev", "dog", [{"id": 1, "name": "b"}])
    client.upsert("dev", "dog", [{"id": 1, "age": 2}, {"id": 3, "name": "new"}])
    client.delete("dev", "dog", [1])
    client.insert("dev", "dog", [{"id": 1, "name": "again"}])

    entries = audit(client, keys=(1,))
    assert len(entries) == 5
    seen = [
        (
            w.operation,
            w.kind,
            orjson.loads(w.value) if w.value else None,
            orjson.loads(w.prior) if w.prior else None,
        )
        for t in entries
        for w in t.writes
    ]
    assert seen == [
        (
            types_pb2.OPERATION_INSERT,
            types_pb2.WRITE_KIND_PUT,
            {"id": 1, "name": "a", "age": 1},
            None,
        ),
        (
            types_pb2.OPERATION_UPDATE,
            types_pb2.WRITE_KIND_PATCH,
            {"id": 1, "name": "b"},
            {"id": 1, "name": "a", "age": 1},
        ),
        (
            types_pb2.OPERATION_UPSERT,
            types_pb2.WRITE_KIND_PATCH,
            {"id": 1, "age": 2},
            {"id": 1, "name": "b", "age": 1},
        ),
        (
            types_pb2.OPERATION_DELETE,
            types_pb2.WRITE_KIND_DELETE,
            None,
            {"id": 1, "name": "b", "age": 2},
        ),
        (types_pb2.OPERATION_INSERT, types_pb2.WRITE_KIND_PUT, {"id": 1, "name": "again"}, None),
    ]
    # Entries hold only the matching writes of their transaction.
    assert writes(entries) == [[("dog", 1)]] * 5
    assert all(t.user == "admin" and not t.tables for t in entries)
    assert writes(audit(client, keys=(1.0, 3))) == [
        [("dog", 1)],
        [("dog", 1)],
        [("dog", 1), ("dog", 3)],
        [("dog", 1)],
        [("dog", 1)],
    ]
    both = audit(client, keys=(3, 2))
    assert writes(both) == [[("dog", 2)], [("dog", 3)]]
    assert audit(client, keys=(99,)) == []
    assert audit(client, keys=("1",)) == []


def test_audit_log_filters_by_table_users_time_and_ids(node: Node, client: StorageClient) -> None:
    client.create_table("dev", "dog")
    client.create_table("dev", "cat")
    internal = node.internal_client()
    node_user = "node:" + node.name

    v1 = client.insert("dev", "dog", [{"id": 1}, {"id": 2}]).version
    next_millisecond(v1)
    v2 = internal.insert("dev", "dog", [{"id": 3}]).version
    next_millisecond(v2)
    v3 = client.call(
        "Transact",
        pb.TransactRequest(
            database="dev",
            operations=[
                pb.TransactOperation(
                    table="dog",
                    operation=types_pb2.OPERATION_UPDATE,
                    records=[b'{"id": 2, "a": 1}'],
                ),
                pb.TransactOperation(
                    table="cat", operation=types_pb2.OPERATION_INSERT, records=[b'{"id": 2}']
                ),
            ],
        ),
    ).version
    next_millisecond(v3)
    v4 = internal.delete("dev", "dog", [1]).version

    assert [t.version for t in audit(client)] == [v1, v2, v3, v4]
    assert writes(audit(client)) == [
        [("dog", 1), ("dog", 2)],
        [("dog", 3)],
        [("dog", 2)],
        [("dog", 1)],
    ]
    assert [t.user for t in audit(client)] == ["admin", node_user, "admin", node_user]
    # The cat table sees only its own write of the shared transaction.
    assert writes(audit(client, table="cat")) == [[("cat", 2)]]
    assert audit(client, table="cat")[0].version == v3

    assert [t.version for t in audit(client, users=["admin"])] == [v1, v3]
    assert [t.version for t in audit(client, users=[node_user])] == [v2, v4]
    assert [t.version for t in audit(client, users=["admin", node_user])] == [v1, v2, v3, v4]
    assert audit(client, users=["nobody"]) == []
    assert audit(client, users=["Admin"]) == []

    window: dict[str, Any] = {
        "start_time": stamp(version_ms(v2)),
        "end_time": stamp(version_ms(v4)),
    }
    assert [t.version for t in audit(client, **window)] == [v2, v3]
    assert [t.version for t in audit(client, keys=(2,), **window)] == [v3]
    assert [t.version for t in audit(client, keys=(1,), **window)] == []
    assert [t.version for t in audit(client, keys=(1,), start_time=stamp(version_ms(v2)))] == [v4]
    assert [t.version for t in audit(client, keys=(1, 3), users=[node_user])] == [v2, v4]
    assert [t.version for t in audit(client, keys=(1, 2), users=["admin"], **window)] == [v3]
    assert [t.version for t in audit(client, limit=3)] == [v1, v2, v3]
    assert [t.version for t in audit(client, keys=(1, 2), limit=2)] == [v1, v3]

    client.expect(
        grpc.StatusCode.NOT_FOUND,
        "ReadAuditLog",
        pb.ReadAuditLogRequest(database="dev", table="bird"),
        "dev.bird",
    )
    client.expect(
        INVALID,
        "ReadAuditLog",
        pb.ReadAuditLogRequest(database="dev", table="dog", ids=[b"true"]),
        "primary key",
    )
    client.expect(
        INVALID,
        "ReadAuditLog",
        pb.ReadAuditLogRequest(
            database="dev", table="dog", start_time=stamp(version_ms(v4)), end_time=stamp(1)
        ),
        "before",
    )


def test_delete_logs_before_purges_entries_and_tombstones(
    node: Node, client: StorageClient
) -> None:
    internal = node.internal_client()
    client.create_table("dev", "dog")
    client.create_table("keep", "dog")
    client.insert("keep", "dog", [{"id": 1}])
    client.insert("dev", "dog", [{"id": 1}, {"id": 2}, {"id": 3}])
    old_delete = client.delete("dev", "dog", [2]).version
    keep_delete = client.delete("keep", "dog", [1]).version
    assert snapshot_rows(node)[("dog", 2)][2] is True  # a tombstone
    cutoff = next_millisecond(keep_delete)
    wait_for(lambda: now_ms() > cutoff, 5, "the clock to pass the cutoff")
    recent_insert = client.insert("dev", "dog", [{"id": 4}]).version
    recent_delete = client.delete("dev", "dog", [3]).version
    assert version_ms(recent_insert) > cutoff

    reply = client.call(
        "DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=stamp(cutoff), database="dev")
    )
    assert reply.deleted_transactions == 3  # create table, insert, delete
    assert reply.purged_tombstones == 1
    assert [t.version for t in log(client)] == [recent_insert, recent_delete]
    rows = snapshot_rows(node)
    assert ("dog", 2) not in rows  # the old tombstone is gone
    assert rows[("dog", 3)][2] is True  # the recent one stays
    assert sorted(k for k, state in rows.items() if not state[2]) == [("dog", 1), ("dog", 4)]
    assert [r["id"] for r in client.all_records("dev", "dog")] == [1, 4]
    assert audit(client, keys=(2,)) == []
    assert writes(audit(client, keys=(3,))) == [[("dog", 3)]]
    # Other databases keep their entries and tombstones.
    assert len(log(client, "keep")) == 3
    assert snapshot_rows(node, "keep")[("dog", 1)][2] is True
    # The horizon moved to the newest purged version.
    positions = internal.call("GetPositions", pb.GetPositionsRequest(database="dev"))
    assert [(h.database, h.origin, h.version) for h in positions.horizons] == [
        ("dev", node.name, old_delete)
    ]
    # Purging again finds nothing; the key can be inserted again.
    again = client.call(
        "DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=stamp(cutoff), database="dev")
    )
    assert (again.deleted_transactions, again.purged_tombstones) == (0, 0)
    back = client.insert("dev", "dog", [{"id": 2, "back": True}])
    assert list(back.inserted_ids) == [b"2"]
    assert client.get("dev", "dog", [2]) == [{"id": 2, "back": True}]

    # Without a database, every database is purged (the reserved `system` one too: the
    # node created its tables when it first opened).
    system_logged = len(log(client, "system"))
    assert system_logged >= 2
    everything = client.call(
        "DeleteLogsBefore",
        pb.DeleteLogsBeforeRequest(before=stamp(next_millisecond(back.version))),
    )
    assert everything.deleted_transactions == 3 + 3 + system_logged  # keep: 3; dev: 3 recent
    assert everything.purged_tombstones == 1 + 1
    assert log(client, "keep") == []
    assert snapshot_rows(node, "keep") == {}


def test_delete_logs_before_errors(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": 1}])
    before = log(client)
    client.expect(
        INVALID,
        "DeleteLogsBefore",
        pb.DeleteLogsBeforeRequest(before=stamp(now_ms() + 60_000), database="dev"),
        "future",
    )
    client.expect(
        INVALID,
        "DeleteLogsBefore",
        pb.DeleteLogsBeforeRequest(before=stamp(now_ms() + 60_000)),
        "future",
    )
    client.expect(INVALID, "DeleteLogsBefore", pb.DeleteLogsBeforeRequest(), "before")
    client.expect(
        grpc.StatusCode.NOT_FOUND,
        "DeleteLogsBefore",
        pb.DeleteLogsBeforeRequest(before=stamp(now_ms()), database="nope"),
        "nope",
    )
    assert log(client) == before
