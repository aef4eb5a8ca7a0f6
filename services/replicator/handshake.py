"""The Hello exchange: who is on the other end, which protocol version, which flows.

Refusals travel as a Goodbye with a code and a sentence, so the dialer can show the
reason in its status instead of a bare disconnect.
"""

from __future__ import annotations

import asyncio

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.replicator.peer import ConnectionLost, Peer

PROTOCOL_MIN = 1
PROTOCOL_MAX = 1


class Refused(Exception):
    """The handshake was refused (by the peer, or by us)."""

    def __init__(self, code: rpb.GoodbyeCode.ValueType, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class NotHello(Refused):
    """The peer's first message was neither a Hello nor a Goodbye."""


def goodbye(code: rpb.GoodbyeCode.ValueType, reason: str) -> rpb.PeerMessage:
    return rpb.PeerMessage(goodbye=rpb.Goodbye(code=code, reason=reason))


async def receive_hello(stream: Peer, timeout_s: float) -> rpb.Hello:
    """The peer's Hello; Refused if it sent a Goodbye instead."""
    try:
        message = await asyncio.wait_for(stream.recv(), timeout=timeout_s)
    except TimeoutError as exc:
        raise ConnectionLost(f"no Hello within {timeout_s:.0f}s") from exc
    if message is None:
        raise ConnectionLost("the peer closed the stream during the handshake")
    kind = message.WhichOneof("body")
    if kind == "goodbye":
        raise Refused(message.goodbye.code, message.goodbye.reason)
    if kind != "hello":
        raise NotHello(
            rpb.GOODBYE_CODE_PROTOCOL_ERROR, f"expected Hello, got {kind or 'an empty message'}"
        )
    return message.hello


def choose_version(hello: rpb.Hello) -> int:
    """The highest protocol version both sides speak, or Refused."""
    high = min(PROTOCOL_MAX, hello.protocol_max)
    low = max(PROTOCOL_MIN, hello.protocol_min)
    if high < low:
        raise Refused(
            rpb.GOODBYE_CODE_PROTOCOL,
            f"no common protocol version: this node speaks {PROTOCOL_MIN}-{PROTOCOL_MAX},"
            f" the peer {hello.protocol_min}-{hello.protocol_max}",
        )
    return high


def check_dialer(my_name: str, hello: rpb.Hello, transport_names: set[str] | None) -> None:
    """Listener's checks of a dialer's Hello; raises Refused with the reason."""
    if not hello.node_name:
        raise Refused(rpb.GOODBYE_CODE_PROTOCOL_ERROR, "the Hello carries no node name")
    if hello.node_name == my_name:
        raise Refused(
            rpb.GOODBYE_CODE_SELF_CONNECTION,
            f"{my_name} dialed itself; remove this node from its own routes",
        )
    if hello.expected_name and hello.expected_name != my_name:
        raise Refused(
            rpb.GOODBYE_CODE_NAME_MISMATCH,
            f"{hello.node_name} dialed {hello.expected_name!r} but reached {my_name!r};"
            " the route must name the node exactly as its replication.hostname",
        )
    if transport_names is not None and hello.node_name not in transport_names:
        raise Refused(
            rpb.GOODBYE_CODE_UNAUTHORIZED,
            f"the peer says it is {hello.node_name!r} but its certificate names"
            f" {', '.join(sorted(transport_names)) or 'nothing'}",
        )
