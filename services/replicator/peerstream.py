"""An in-memory connection: two ends of a ``Peer`` (peer.py) backed by asyncio queues.

Each end carries the same ``PeerMessage``s as the gRPC Replicate stream, copied on the
way (a receiver never shares a message object with its sender, as on a wire). Closing an
end is closing its side of the stream: the other end's ``recv`` returns None once it has
taken what was sent before. ``cut`` breaks the connection as a network failure does:
every pending and later send and receive on both ends raises ``ConnectionLost``.

Every message an end sends is also kept in its ``sent`` list, in order, so a test can
say exactly what a node said to its peer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.replicator.peer import ConnectionLost


@dataclass
class _Wire:
    """What both ends share: whether the connection was cut, and why."""

    cut: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _Closed:
    """The sending side closed its end."""


@dataclass
class PeerStream:
    """One end of an in-memory connection; ``pair`` makes both."""

    address: str
    _inbox: asyncio.Queue[rpb.PeerMessage | _Closed]
    _outbox: asyncio.Queue[rpb.PeerMessage | _Closed]
    _wire: _Wire
    sent: list[rpb.PeerMessage] = field(default_factory=list)
    closed: bool = False
    _ended: bool = False  # the other side's close was received

    @classmethod
    def pair(cls, first: str, second: str) -> tuple[PeerStream, PeerStream]:
        """Two connected ends: ``first`` is the end whose peer is at address ``first``
        (it is held by the node at ``second``), and the reverse."""
        wire = _Wire()
        one: asyncio.Queue[rpb.PeerMessage | _Closed] = asyncio.Queue()
        two: asyncio.Queue[rpb.PeerMessage | _Closed] = asyncio.Queue()
        return cls(first, one, two, wire), cls(second, two, one, wire)

    async def send(self, message: rpb.PeerMessage) -> None:
        if self._wire.cut:
            raise ConnectionLost(self._wire.cut)
        if self.closed:
            raise ConnectionLost("this end was closed")
        copy = rpb.PeerMessage()
        copy.CopyFrom(message)
        self.sent.append(copy)
        await self._outbox.put(rpb.PeerMessage.FromString(message.SerializeToString()))

    async def recv(self) -> rpb.PeerMessage | None:
        if self._ended:
            return None
        get = asyncio.ensure_future(self._inbox.get())
        cut = asyncio.ensure_future(self._wire.changed.wait())
        try:
            await asyncio.wait({get, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not get.done():
                get.cancel()
        if self._wire.cut:
            raise ConnectionLost(self._wire.cut)
        item = get.result()
        if isinstance(item, _Closed):
            self._ended = True
            return None
        return item

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._outbox.put(_Closed())

    def cut(self, reason: str = "the connection was cut") -> None:
        """Break the connection for both ends, as a network failure does."""
        if not self._wire.cut:
            self._wire.cut = reason
            self._wire.changed.set()

    def pending(self) -> int:
        """Messages sent to this end and not received yet."""
        return self._inbox.qsize()
