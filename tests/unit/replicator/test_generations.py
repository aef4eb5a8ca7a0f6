"""Generations: a new subscription replaces the old one on both sides, and whatever is
still in flight of an older one is ignored; a second connection with the same peer
replaces the first or is refused, by the tie-break both sides apply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import types_pb2

from services.replicator.peerstream import PeerStream
from tests.unit.replicator.fakes import txn
from tests.unit.replicator.nodes import Node, Remote, batches, hello, settle, until


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node.make("b", ["a", "c", "r", "s"], window_batches=2, batch_transactions=1)
    try:
        yield node
    finally:
        await node.stop()


async def test_sender_restarts_from_the_new_subscription(node: Node) -> None:
    written = node.storage.write("app", "k0", "k1", "k2", "k3")
    remote = await Remote.dial(node, "r", sends=False)
    await remote.send(subscribe=rpb.Subscribe(generation=1))
    old = [(await remote.expect("batch")).batch for _ in range(2)]
    assert [(b.generation, b.sequence) for b in old] == [(1, 1), (1, 2)]

    # The peer applied only the first and subscribes again from there.
    at = types_pb2.Position(database="app", origin="b", version=written[0].version)
    await remote.send(subscribe=rpb.Subscribe(generation=2, positions=[at]))
    new = [(await remote.expect("batch")).batch for _ in range(2)]
    assert [(b.generation, b.sequence) for b in new] == [(2, 1), (2, 2)]
    assert [t.version for b in new for t in b.transactions] == [
        written[1].version,
        written[2].version,
    ]
    assert len(node.storage.subscriptions) == 2
    assert list(node.storage.subscriptions[1].positions) == [at]

    # An ack of the old generation frees nothing: the window stays full.
    await remote.send(ack=rpb.Ack(generation=1, sequence=2))
    await remote.quiet()
    await remote.send(ack=rpb.Ack(generation=2, sequence=1))
    last = (await remote.expect("batch")).batch
    assert (last.generation, last.sequence) == (2, 3)
    assert [t.version for t in last.transactions] == [written[3].version]


async def test_receiver_drops_batches_of_an_older_generation(node: Node) -> None:
    node.storage.write("app", "mine")  # holds a position: subscribes without a copy
    remote = await Remote.dial(node, "r", receives=False, known_databases=["app"])
    first = (await remote.expect("subscribe")).subscribe
    assert first.generation == 1 and first.exclude_origins == ["b"]
    await remote.send(batch=rpb.Batch(generation=1, sequence=1, transactions=[txn("r", 10)]))
    ack = (await remote.expect("ack")).ack
    assert (ack.generation, ack.sequence) == (1, 1)
    assert [(p.origin, p.version) for p in ack.positions] == [("r", 10)]

    # Another peer connects: exclusions change, so "b" subscribes to "r" again.
    await Remote.dial(node, "s", receives=False)
    second = (await remote.expect("subscribe")).subscribe
    assert second.generation == 2 and second.exclude_origins == ["b", "s"]
    assert ("app", "r", 10) in [(p.database, p.origin, p.version) for p in second.positions]

    # What was in flight of generation 1 arrives late: neither applied nor acknowledged.
    await remote.send(batch=rpb.Batch(generation=1, sequence=2, transactions=[txn("r", 11)]))
    await remote.send(batch=rpb.Batch(generation=2, sequence=1, transactions=[txn("r", 12)]))
    ack = (await remote.expect("ack")).ack
    assert (ack.generation, ack.sequence) == (2, 1)
    await remote.quiet()
    applied = [v for _, o, v in node.storage.applied_transactions() if o == "r"]
    assert applied == [10, 12]


async def test_a_connection_dialed_by_the_smaller_name_replaces_the_other(node: Node) -> None:
    # "b" dialed "a"; then "a" dials "b": a's connection wins (min("a", "b") dialed it).
    dialed = await Remote.listen(node, "a", sends=False, receives=False)
    await until(lambda: node.connected("a"), "b's session with a")
    replaced = node.session("a")
    winner = await Remote.dial(node, "a", sends=False, receives=False)
    goodbye = (await dialed.expect("goodbye")).goodbye
    assert goodbye.code == rpb.GOODBYE_CODE_DUPLICATE
    assert goodbye.reason == "replaced by the connection dialed by a"
    await until(replaced.finished.is_set, "the replaced session to end")
    assert node.session("a") is not replaced and node.session("a").dialer == "a"
    assert node.replicator.peers["a"].connected  # the old session does not speak for it
    await winner.quiet()


async def test_a_second_connection_that_loses_the_tie_break_is_refused(node: Node) -> None:
    # "b" dialed "c": b is the smaller name, so c's own dial is refused.
    await Remote.listen(node, "c", sends=False, receives=False)
    await until(lambda: node.connected("c"), "b's session with c")
    kept = node.session("c")
    mine, theirs = PeerStream.pair(node.address, "c:40000")
    node.spawn(node.replicator.accept(theirs, {"c"}), "accept:c")
    await mine.send(rpb.PeerMessage(hello=hello("c", expected_name="b")))
    answer = await mine.recv()
    assert answer is not None and answer.WhichOneof("body") == "goodbye"
    assert answer.goodbye.code == rpb.GOODBYE_CODE_DUPLICATE
    await settle()
    assert node.session("c") is kept and not kept.finished.is_set()
    assert batches(mine.sent) == []
