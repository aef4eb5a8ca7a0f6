"""Copies of one database from two sources into one storage process at the same time,
through the storage API (Snapshot on the sources, MergeSnapshot on the receiver), the
way two replicator sessions drive them: request by request, interleaved, with the
receiver killed mid-way. Every acknowledged write stays, and every deleted key stays
deleted (the MergeSnapshot contract)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.client import StorageClient, error_info
from tests.harness.copying import CopyFeed, into, logged
from tests.harness.node import Node

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def snapshot(node: Node, after: types_pb2.SnapshotKey | None = None) -> list[Any]:
    request = pb.SnapshotRequest(database="data", max_batch_rows=150)
    if after is not None:
        request.start_after.CopyFrom(after)
    return node.internal_client().stream("Snapshot", request)


def relay(source: Node, target: Node) -> None:
    """``target`` applies everything in ``source``'s log of the database."""
    txns = logged(source.internal_client(), "data")
    target.internal_client().call("Apply", pb.ApplyRequest(transactions=txns))


def purge(node: Node) -> None:
    now = Timestamp()
    now.GetCurrentTime()
    node.internal_client().call("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=now))


def advance(feed: CopyFeed, source: Node) -> CopyFeed:
    """The feed's next request. A copy refused because another copy of the database
    completed (which forgets every unfinished one) starts again, as a replicator does
    when the source's log no longer reaches the receiver's new positions."""
    try:
        feed.step()
    except grpc.RpcError as exc:
        assert error_info(exc).reason == "COPY_OUT_OF_ORDER", exc
        return CopyFeed(feed.merge, source.name, "data", snapshot(source))
    return feed


def ids(client: StorageClient, table: str) -> set[int]:
    return {r["id"] for r in client.all_records("data", table)}


def setup(make_node: MakeNode) -> tuple[Node, Node, Node, dict[str, set[int]]]:
    """Sources A and B and receiver R, after a cut of R longer than the retention:

    * together, A wrote `old` (600 rows) and `volume` 0..299, which R has;
    * while R was away, A deleted volume 0..49, B wrote volume 1000..1299, and R itself
      acknowledged volume 2000..2379; B then heard R's writes, A did not;
    * A and B purged their logs and tombstones.

    Returns the ids every node must end with, per table.
    """
    a, b, r = make_node(), make_node(), make_node()
    ca = a.client()
    ca.create_table("data", "old")
    ca.create_table("data", "volume")
    ca.insert("data", "old", [{"id": i, "pad": "o" * 40} for i in range(600)])
    ca.insert("data", "volume", [{"id": i, "v": "a"} for i in range(300)])
    relay(a, b)
    relay(a, r)
    ca.delete("data", "volume", list(range(50)))
    b.client().insert("data", "volume", [{"id": 1000 + i, "v": "b"} for i in range(300)])
    for start in range(2000, 2380, 20):
        r.client().insert("data", "volume", [{"id": i, "v": "r"} for i in range(start, start + 20)])
    relay(a, b)
    relay(b, a)
    relay(r, b)
    purge(a)
    purge(b)
    expected = {
        "old": set(range(600)),
        "volume": set(range(50, 300)) | set(range(1000, 1300)) | set(range(2000, 2380)),
    }
    return a, b, r, expected


def test_two_copies_at_once_interleaved_keep_every_write(make_node: MakeNode) -> None:
    a, b, r, expected = setup(make_node)
    receiver = r.internal_client()
    from_a = CopyFeed(into(receiver), a.name, "data", snapshot(a))
    from_b = CopyFeed(into(receiver), b.name, "data", snapshot(b))
    assert len(from_a.messages) > 5 and len(from_b.messages) > 5
    # B's copy starts first and A's overtakes it: A completes while B is mid-way, which
    # is where one shared progress record lost every table.
    from_b.step()
    from_b.step()
    while not from_a.done:
        from_a = advance(from_a, a)
        if not from_b.done and from_a.sent % 2 == 0:
            from_b = advance(from_b, b)
    while not from_b.done:
        from_b = advance(from_b, b)
    client = r.client()
    for table, wanted in expected.items():
        assert ids(client, table) == wanted, table
    assert list(receiver.call("GetPositions", pb.GetPositionsRequest()).copies) == []


def test_a_copy_killed_and_resumed_while_a_second_copy_runs(make_node: MakeNode) -> None:
    a, b, r, expected = setup(make_node)
    receiver = r.internal_client()
    from_a = CopyFeed(into(receiver), a.name, "data", snapshot(a))
    for _ in range(4):
        from_a.step()
    r.kill("storage")
    r.start_service("storage")
    receiver = r.internal_client()
    [stored] = receiver.call("GetPositions", pb.GetPositionsRequest()).copies
    assert (stored.source, stored.rows) == (a.name, 450)
    # B's copy begins; A's copy resumes in a new part from what R stored; both go on
    # interleaved, request by request.
    from_b = CopyFeed(into(receiver), b.name, "data", snapshot(b))
    from_b.step()
    from_b.step()
    resumed = CopyFeed(
        into(receiver), a.name, "data", snapshot(a, stored.last_key), after=stored.last_key
    )
    # The old part's next request (a call still in flight when it was cut off) is refused.
    stale = from_a.messages[from_a.sent]
    request = pb.MergeSnapshotRequest(
        source=a.name, database="data", part=from_a.part, rows=stale.rows, after=from_a.after
    )
    resumed.step()  # the new part's header: the old part is no longer current
    error = receiver.expect(PRECONDITION, "MergeSnapshot", request, "part")
    assert error_info(error).reason == "COPY_OUT_OF_ORDER"
    copies = {c.source: c for c in receiver.call("GetPositions", pb.GetPositionsRequest()).copies}
    assert set(copies) == {a.name, b.name}
    feeds = {b.name: from_b, a.name: resumed}
    while not all(f.done for f in feeds.values()):
        for source in (b, a):
            if not feeds[source.name].done:
                feeds[source.name] = advance(feeds[source.name], source)
    client = r.client()
    for table, wanted in expected.items():
        assert ids(client, table) == wanted, table
    deleted_before = client.get("data", "volume", list(range(50)))
    assert deleted_before == []


def test_a_partial_source_removes_nothing_and_passes_it_on(make_node: MakeNode) -> None:
    """A node that received some tables only has positions that do not stand for every
    row: copying from it removes nothing for being absent, and the receiver's own
    Snapshot says partial from then on."""
    a, r = make_node(), make_node()
    a.client().create_table("data", "volume")
    r.client().create_table("data", "volume")
    mine = [{"id": i, "v": "r"} for i in range(20)]
    r.client().insert("data", "volume", mine)
    # A applied R's transactions through a subscription to some tables only.
    txns = logged(r.internal_client(), "data")
    for t in txns:
        del t.writes[:]  # the tables A does not receive
    a.internal_client().call("Apply", pb.ApplyRequest(transactions=txns, partial=True))
    header = snapshot(a)[0]
    assert header.partial
    CopyFeed(into(r.internal_client()), a.name, "data", snapshot(a)).run()
    assert ids(r.client(), "volume") == set(range(20))  # R's rows are all still there
    assert snapshot(r)[0].partial
