"""Exclusions: what a sender never sends a peer, what a receiver refuses, and which
origins a receiver asks each peer to leave out (those it receives directly elsewhere)."""

from __future__ import annotations

from typing import Any

from shoal.replicator.v1 import replicator_pb2 as rpb

from tests.unit.replicator.fakes import txn
from tests.unit.replicator.nodes import Node, Remote, origins, until

SHARDED: dict[str, Any] = {"shard": 1, "databases": ["*", {"name": "metrics", "sharded": True}]}


def caught_up(remote: Remote) -> bool:
    return any(m.WhichOneof("body") == "batch" and m.batch.caught_up for m in remote.received)


async def test_the_sender_leaves_out_the_peer_excluded_origins_and_withheld_databases(
    nodes: list[Node],
) -> None:
    a = Node.make("a", ["r"], yaml=SHARDED)
    nodes.append(a)
    own = a.storage.write("app", "k1")[0]
    a.storage.add(txn("c", 5), txn("r", 6), txn("d", 7))  # relayed to "a" earlier
    a.storage.write("metrics", "m1")  # sharded: "r" is of another shard
    remote = await Remote.dial(a, "r", sends=False, shard=2)
    await remote.send(subscribe=rpb.Subscribe(generation=1, exclude_origins=["c"]))
    while not caught_up(remote):
        await remote.expect("batch")

    asked = a.storage.subscriptions[0]
    assert list(asked.exclude_origins) == ["c", "r"]  # the peer itself, always
    assert list(asked.exclude_databases) == ["metrics"]
    assert asked.subscriber == "r"
    assert origins(remote.received) == [("app", "a", own.version), ("app", "d", 7)]

    # Nor is a withheld database copied to it.
    await remote.send(copy_request=rpb.CopyRequest(copy_id=1, database="metrics"))
    chunk = (await remote.expect("copy_chunk")).copy_chunk
    assert chunk.done and "is sharded" in chunk.error and not chunk.rows
    assert a.storage.snapshots == []


async def test_a_sender_that_does_not_send_to_the_peer_says_so(nodes: list[Node]) -> None:
    a = Node.make("a", [{"hostname": "r", "replicates": {"sends": False}}])
    nodes.append(a)
    a.storage.write("app", "k1")
    remote = await Remote.dial(a, "r", sends=False)
    assert not remote.their_hello.sends
    await remote.send(subscribe=rpb.Subscribe(generation=3))
    error = (await remote.expect("subscribe_error")).subscribe_error
    assert (error.generation, error.reason) == (3, "NOT_SENDING")
    await remote.quiet()
    assert a.storage.subscriptions == []


async def test_the_receiver_refuses_its_own_transactions_and_withheld_databases(
    nodes: list[Node],
) -> None:
    b = Node.make("b", ["r"], yaml=SHARDED)
    nodes.append(b)
    b.storage.write("app", "mine")
    remote = await Remote.dial(b, "r", receives=False, shard=2, known_databases=["app", "metrics"])
    # "metrics" is withheld: neither copied nor subscribed to (the first word is Subscribe).
    subscribe = (await remote.expect("subscribe")).subscribe
    assert subscribe.exclude_origins == ["b"]
    await remote.send(
        batch=rpb.Batch(
            generation=1,
            sequence=1,
            transactions=[txn("r", 10), txn("b", 99), txn("r", 11, "metrics")],
        )
    )
    ack = (await remote.expect("ack")).ack
    assert ack.sequence == 1
    assert b.storage.applied_transactions() == [("app", "r", 10)]
    state = b.replicator.peers["r"]
    assert "refused 1 transactions of metrics from r" in state.last_error

    # Every transaction refused: nothing applied, but the window moves on.
    await remote.send(batch=rpb.Batch(generation=1, sequence=2, transactions=[txn("b", 100)]))
    ack = (await remote.expect("ack")).ack
    assert (ack.sequence, list(ack.positions)) == (2, [])
    assert b.storage.applied_transactions() == [("app", "r", 10)]
    assert "claim to come from this node (b)" in state.last_error


async def test_the_receiver_excludes_origins_it_receives_directly_elsewhere(
    nodes: list[Node],
) -> None:
    b = Node.make("b", ["r", "s", "t"])
    nodes.append(b)
    b.storage.write("app", "mine")
    r = await Remote.dial(b, "r", receives=False)
    assert (await r.expect("subscribe")).subscribe.exclude_origins == ["b"]

    s = await Remote.dial(b, "s", receives=False)
    again = (await r.expect("subscribe")).subscribe
    assert (again.generation, list(again.exclude_origins)) == (2, ["b", "s"])
    assert (await s.expect("subscribe")).subscribe.exclude_origins == ["b", "r"]

    # A peer that sends nothing to "b" is no source of any origin: nothing changes.
    await Remote.dial(b, "t", sends=False)
    await r.quiet()

    # The direct link to "s" fails: "s"'s transactions must now come by relay.
    s.end.cut()
    await until(lambda: not b.connected("s"), "the session with s to end")
    last = (await r.expect("subscribe")).subscribe
    assert (last.generation, list(last.exclude_origins)) == (3, ["b"])
