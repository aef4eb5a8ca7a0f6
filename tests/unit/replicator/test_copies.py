"""Copies: a node copies what it never held, resumes an interrupted copy after the last
row it merged, copies a database once whichever peers have it, and copies after the
sender's log was truncated."""

from __future__ import annotations

import asyncio
from typing import cast

from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.replicator.peerstream import PeerStream
from tests.unit.replicator.nodes import Node, Remote, connect, settle, until


def merged_ids(node: Node) -> list[bytes]:
    return [row.id for merge in node.storage.merges for row in merge.rows]


async def test_an_interrupted_copy_resumes_after_the_last_merged_row(nodes: list[Node]) -> None:
    a, b = Node.make("a", ["b"]), Node.make("b", ["a"])
    nodes += [a, b]
    written = a.storage.write("app", "k1", "k2", "k3", "k4", "k5")  # 2 rows per chunk

    async def cut_after_two_chunks(request: spb.MergeSnapshotRequest) -> None:
        if len(b.storage.merges) == 2:  # this one is merged; the connection then breaks
            cast(PeerStream, b.session("a").connection).cut()

    b.storage.on_merge = cut_after_two_chunks
    await connect(b, a)
    await until(lambda: not b.connected("a") and not a.connected("b"), "the connection to break")
    progress = b.storage.copies[("app", "a")]
    assert (progress.rows, progress.last_key.id) == (4, b"k4")
    assert merged_ids(b) == [b"k1", b"k2", b"k3", b"k4"]
    assert not b.storage.holds("app", "a", 1)  # no position until the copy completes

    b.storage.on_merge = None
    await connect(b, a)
    await until(lambda: b.storage.holds("app", "a", written[-1].version), "the copy to complete")
    resumed = a.storage.snapshots[-1]
    assert resumed.start_after == types_pb2.SnapshotKey(table="t", id=b"k4")
    assert resumed.subscriber == "b"
    tail = b.storage.merges[2]
    assert tail.after == types_pb2.SnapshotKey(table="t", id=b"k4") and tail.begins_part
    assert merged_ids(b) == [b"k1", b"k2", b"k3", b"k4", b"k5"]  # each row once
    assert b.storage.copies == {}

    # The copy's positions are where the subscription starts: the log brings only what
    # is new, never the copied transactions again.
    later = a.storage.write("app", "k6")[0]
    await until(lambda: b.storage.holds("app", "a", later.version), "the new write to arrive")
    assert b.storage.applied_transactions() == [("app", "a", later.version)]


async def test_a_database_is_copied_once_whichever_peers_have_it(nodes: list[Node]) -> None:
    a, c = Node.make("a", ["b"]), Node.make("c", ["b"])
    b = Node.make("b", ["a", "c"])
    nodes += [a, b, c]
    a.storage.write("app", "k1", "k2")
    c.storage.add(*a.storage.log)  # "c" holds the same data
    c.storage.rows = {"app": dict(a.storage.rows["app"])}
    release = asyncio.Event()

    async def hold_the_copy(request: spb.MergeSnapshotRequest) -> None:
        await release.wait()

    b.storage.on_merge = hold_the_copy
    await connect(b, a)
    await until(lambda: b.replicator.copies.lock("app").locked(), "the copy from a to start")
    await connect(b, c)
    await settle()  # b's session with c waits for the gate
    release.set()
    await until(lambda: b.storage.holds("app", "a", a.storage.log[-1].version), "the copy")
    await until(lambda: len(c.storage.subscriptions) == 1, "b to subscribe to c")
    assert len(a.storage.snapshots) == 1 and c.storage.snapshots == []
    assert merged_ids(b) == [b"k1", b"k2"]


async def test_a_truncated_log_leads_to_a_copy(nodes: list[Node]) -> None:
    # Only a -> b: the copy holds exactly what "a" wrote.
    a = Node.make("a", [{"hostname": "b", "replicates": {"receives": False}}])
    b = Node.make("b", ["a"])
    nodes += [a, b]
    written = a.storage.write("app", "k1", "k2", "k3")
    a.storage.horizons["app"] = written[-1].version  # k1 and k2 are gone from the log
    b.storage.write("app", "mine")  # holds a position: subscribes rather than copies
    link = await connect(b, a)
    await until(lambda: b.storage.holds("app", "a", written[-1].version), "the copy")
    errors = [m.subscribe_error for m in link.listener.sent if m.HasField("subscribe_error")]
    assert [(e.reason, e.database) for e in errors] == [("LOG_TRUNCATED", "app")]
    assert [r.database for r in a.storage.snapshots] == ["app"]
    assert merged_ids(b) == [b"k1", b"k2", b"k3"]
    assert b.storage.applied_transactions() == []  # nothing came by the log
    # Then it subscribes again, from the copy's positions.
    await until(lambda: len(a.storage.subscriptions) == 2, "b to subscribe again")
    positions = {(p.origin, p.version) for p in a.storage.subscriptions[-1].positions}
    assert ("a", written[-1].version) in positions


async def test_a_node_with_no_position_copies_instead_of_reading_the_log(
    nodes: list[Node],
) -> None:
    a, b = Node.make("a", ["b"]), Node.make("b", ["a"])
    nodes += [a, b]
    written = a.storage.write("app", "k1", "k2", "k3")
    link = await connect(b, a)
    await until(lambda: b.storage.holds("app", "a", written[-1].version), "the copy")
    requests = [m.copy_request for m in link.dialer.sent if m.HasField("copy_request")]
    assert [(r.database, r.HasField("start_after")) for r in requests] == [("app", False)]
    assert b.storage.applied_transactions() == []


async def test_a_database_a_peer_announces_later_is_copied_from_it(nodes: list[Node]) -> None:
    b = Node.make("b", ["r"])
    nodes.append(b)
    b.storage.write("app", "mine")
    remote = await Remote.dial(b, "r", receives=False, known_databases=["app"])
    assert (await remote.expect("subscribe")).subscribe.generation == 1
    # "r" got "new" by a copy: no log brings it to "b", so its heartbeats say it has it.
    await remote.send(heartbeat=rpb.Heartbeat(id=1, known_databases=["app", "new"]))
    request = (await remote.expect("copy_request")).copy_request
    assert request.database == "new" and not request.HasField("start_after")
    await remote.send(copy_chunk=rpb.CopyChunk(copy_id=request.copy_id, done=True))
    again = (await remote.expect("subscribe")).subscribe
    assert again.generation == 2
    assert [m.database for m in b.storage.merges] == ["new"] and b.storage.merges[0].complete
