"""Heartbeats: answered, measured, and a silent peer is cut off within peerTimeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb

from tests.unit.replicator.nodes import Node, Remote, until

INTERVAL_S = 0.02
TIMEOUT_S = 0.25  # generous: a loaded machine may pause the event loop for a while
SLACK_S = 1.0  # scheduling delays on a loaded machine, beyond the heartbeat that notices


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node.make("a", ["r"], heartbeat_interval_s=INTERVAL_S, peer_timeout_s=TIMEOUT_S)
    try:
        yield node
    finally:
        await node.stop()


def heartbeat_ids(remote: Remote) -> list[int]:
    return [m.heartbeat.id for m in remote.received if m.WhichOneof("body") == "heartbeat"]


async def test_a_silent_peer_is_detected_within_the_timeout(node: Node) -> None:
    remote = await Remote.dial(node, "r", sends=False, receives=False)
    session = node.session("r")
    started = time.monotonic()
    # The remote reads what the node sends but never says a word.
    listening = asyncio.ensure_future(remote.read_silently())
    await asyncio.wait_for(session.finished.wait(), TIMEOUT_S + SLACK_S + 1)
    elapsed = time.monotonic() - started
    listening.cancel()
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + INTERVAL_S + SLACK_S
    assert session.end_reason.startswith("ConnectionLost: no message from r for")
    assert not node.replicator.peers["r"].connected
    assert "r" not in node.replicator.sessions
    ids = heartbeat_ids(remote)
    assert ids and ids == list(range(1, len(ids) + 1))  # probed all along


async def test_a_peer_that_answers_heartbeats_stays_connected(node: Node) -> None:
    remote = await Remote.dial(node, "r", sends=False, receives=False)
    session = node.session("r")
    answering = asyncio.ensure_future(remote.answer_heartbeats())
    # Well past the timeout: twice as many heartbeats as fit in it.
    enough = 2 * round(TIMEOUT_S / INTERVAL_S)
    await until(lambda: len(heartbeat_ids(remote)) >= enough, f"{enough} heartbeats")
    assert not session.finished.is_set()
    assert node.replicator.peers["r"].connected
    assert node.replicator.peers["r"].latency_ms > 0  # measured from the replies
    answering.cancel()
    await asyncio.wait_for(session.finished.wait(), TIMEOUT_S + SLACK_S + 1)


async def test_heartbeats_are_answered_with_their_id(node: Node) -> None:
    remote = await Remote.dial(node, "r", sends=False, receives=False)
    await remote.send(heartbeat=rpb.Heartbeat(id=42))
    while True:
        message = await remote.next()
        if message.WhichOneof("body") == "heartbeat_reply":
            break
    assert message.heartbeat_reply.id == 42


async def test_a_goodbye_ends_the_session_at_once(node: Node) -> None:
    remote = await Remote.dial(node, "r", sends=False, receives=False)
    session = node.session("r")
    await remote.send(goodbye=rpb.Goodbye(code=rpb.GOODBYE_CODE_SHUTDOWN, reason="r stops"))
    await until(session.finished.is_set, "the session to end")
    assert session.end_reason == "SessionEnded: goodbye from r: r stops"
