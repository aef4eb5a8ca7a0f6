"""The in-memory connection the fast tier runs sessions on."""

from __future__ import annotations

import asyncio

import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.replicator.peer import ConnectionLost, Peer
from services.replicator.peerstream import PeerStream


def heartbeat(n: int) -> rpb.PeerMessage:
    return rpb.PeerMessage(heartbeat=rpb.Heartbeat(id=n))


async def test_messages_arrive_in_order_as_copies_and_are_kept_as_sent() -> None:
    a_side, b_side = PeerStream.pair("b:9925", "a:40000")
    ends: tuple[Peer, Peer] = (a_side, b_side)  # both ends are Peers
    assert [e.address for e in ends] == ["b:9925", "a:40000"]
    message = heartbeat(1)
    await a_side.send(message)
    await a_side.send(heartbeat(2))
    message.heartbeat.id = 99  # the sender's object is not the receiver's
    first, second = await b_side.recv(), await b_side.recv()
    assert first is not None and second is not None
    assert (first.heartbeat.id, second.heartbeat.id) == (1, 2)
    assert [m.heartbeat.id for m in a_side.sent] == [1, 2]
    assert b_side.sent == [] and b_side.pending() == 0


async def test_close_ends_the_other_side_after_what_was_sent() -> None:
    a_side, b_side = PeerStream.pair("b:9925", "a:40000")
    await a_side.send(heartbeat(1))
    await a_side.close()
    received = await b_side.recv()
    assert received is not None and received.heartbeat.id == 1
    assert await b_side.recv() is None
    assert await b_side.recv() is None
    with pytest.raises(ConnectionLost):
        await a_side.send(heartbeat(2))
    await b_side.send(heartbeat(3))  # the other direction is still open
    back = await a_side.recv()
    assert back is not None and back.heartbeat.id == 3


async def test_a_cut_breaks_both_ends_including_a_pending_receive() -> None:
    a_side, b_side = PeerStream.pair("b:9925", "a:40000")
    await a_side.send(heartbeat(1))  # lost with the connection
    waiting = asyncio.ensure_future(a_side.recv())
    await asyncio.sleep(0)
    b_side.cut("network down")
    with pytest.raises(ConnectionLost, match="network down"):
        await waiting
    with pytest.raises(ConnectionLost):
        await b_side.recv()
    with pytest.raises(ConnectionLost):
        await a_side.send(heartbeat(2))
