"""The other side of a connection, as a session sees it.

A ``Peer`` is all a session (and the handshake before it) needs from a connection: send
a ``PeerMessage``, receive the next one (None once the other side closed its end), close
it, and where the other side is. Failures of the connection raise ``ConnectionLost``.
Only one task may ``send`` at a time (the session's writer), and only one may ``recv``
(its reader).

Two implementations speak the same messages: the gRPC Replicate stream, one class per
end (transport.py), and an in-memory pair of ends (peerstream.py) that the unit tests
of the roles run sessions on without processes or a network.
"""

from __future__ import annotations

from typing import Protocol

from shoal.replicator.v1 import replicator_pb2 as rpb


class ConnectionLost(Exception):
    """The connection broke (network, peer crash, cancellation)."""


class Peer(Protocol):
    """One end of a connection with another node."""

    @property
    def address(self) -> str:
        """Where the other side is, as the transport names it (host:port)."""
        ...

    async def send(self, message: rpb.PeerMessage) -> None: ...

    async def recv(self) -> rpb.PeerMessage | None: ...

    async def close(self) -> None: ...
