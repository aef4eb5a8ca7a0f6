"""The sender's window: batches stop when it is full and resume on acks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import types_pb2

from tests.unit.replicator.nodes import Node, Remote, batches, until


@pytest.fixture
async def sender() -> AsyncIterator[Node]:
    """Node "a": three batches in flight at most, one transaction per batch."""
    node = Node.make("a", ["r"], window_batches=3, batch_transactions=1)
    try:
        yield node
    finally:
        await node.stop()


async def test_sends_stop_when_the_window_is_full_and_resume_on_acks(sender: Node) -> None:
    written = sender.storage.write("app", *[f"k{i}" for i in range(8)])
    versions = [t.version for t in written]
    remote = await Remote.dial(sender, "r", sends=False)  # "r" only receives
    await remote.send(subscribe=rpb.Subscribe(generation=1))

    first = [(await remote.expect("batch")).batch for _ in range(3)]
    assert [b.sequence for b in first] == [1, 2, 3]
    assert [t.version for b in first for t in b.transactions] == versions[:3]
    # The feed read a fourth batch from storage and waits for room: nothing is sent.
    await until(lambda: sender.storage.served == 4, "the fourth batch to be read")
    await remote.quiet()
    outbound = sender.session("r").outbound
    assert outbound.window.used_percent == 100.0

    # Acks are cumulative: acknowledging 2 frees two places.
    await remote.send(ack=rpb.Ack(generation=1, sequence=2))
    second = [(await remote.expect("batch")).batch for _ in range(2)]
    assert [b.sequence for b in second] == [4, 5]
    await until(lambda: sender.storage.served == 6, "the sixth batch to be read")
    await remote.quiet()

    await remote.send(ack=rpb.Ack(generation=1, sequence=5))
    third = [(await remote.expect("batch")).batch for _ in range(3)]
    assert [b.sequence for b in third] == [6, 7, 8]
    assert third[-1].caught_up
    sent = [t.version for b in batches(remote.received) for t in b.transactions]
    assert sent == versions  # each transaction once, in commit order
    await remote.quiet()


async def test_acks_confirm_what_the_peer_committed(sender: Node) -> None:
    written = sender.storage.write("app", "k0", "k1", "k2")
    remote = await Remote.dial(sender, "r", sends=False)
    await remote.send(subscribe=rpb.Subscribe(generation=1))
    for _ in range(3):
        await remote.expect("batch")
    position = types_pb2.Position(database="app", origin="a", version=written[1].version)
    await remote.send(ack=rpb.Ack(generation=1, sequence=2, positions=[position]))
    state = sender.replicator.peers["r"]
    await until(lambda: state.database("app").last_commit_confirmed == written[1].version)
    assert sender.replicator.confirmations.reported("r", "app") == written[1].version
    assert state.databases["app"].backlog_transactions == 1  # the third is in flight
