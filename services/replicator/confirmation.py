"""Write confirmation: which peers have durably committed which of this node's writes.

Every peer reports its durable positions to this node: in each Ack (the positions its
storage stored in the same atomic write as the data it applied) and in each Subscribe
(its positions when it subscribes). A peer has committed this node's transaction
``version`` of ``database`` once a position it reported for (database, this node) is at or
past ``version``: versions of one origin are applied in order, so a position covers every
earlier transaction of that origin.

``WaitReplicated`` waits on these reports: for ``count`` peers, and for each group (the
residents of records written, given by storage) for that many of the group's peers. What
peers reported is kept for the life of the process (a few integers per peer, database and
origin), across reconnections, so a confirmation that arrived before the wait began
counts. Only direct peers report: relays do not carry acknowledgements back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.storage.v1 import types_pb2


@dataclass(frozen=True)
class Group:
    """``count`` of ``peers`` must confirm."""

    peers: frozenset[str]
    count: int


@dataclass(eq=False)  # kept in a set by identity
class _Waiter:
    database: str
    version: int
    count: int
    groups: tuple[Group, ...] = ()
    peers: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def satisfied(self) -> bool:
        return len(self.peers) >= self.count and all(
            len(self.peers & g.peers) >= g.count for g in self.groups
        )


class Confirmations:
    """Positions peers reported for this node's own transactions, and writers waiting."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self._confirmed: dict[str, dict[str, int]] = {}  # peer -> database -> version
        self._waiters: set[_Waiter] = set()

    def record(self, peer: str, positions: Iterable[types_pb2.Position]) -> None:
        """A peer reported durable positions (an Ack or a Subscribe)."""
        mine = [p for p in positions if p.origin == self.origin]
        if not mine:
            return
        confirmed = self._confirmed.setdefault(peer, {})
        for position in mine:
            if position.version > confirmed.get(position.database, 0):
                confirmed[position.database] = position.version
        for waiter in self._waiters:
            if confirmed.get(waiter.database, 0) >= waiter.version:
                waiter.peers.add(peer)
                if waiter.satisfied():
                    waiter.done.set()

    def reported(self, peer: str, database: str) -> int:
        """The highest position ``peer`` reported for this node's writes to ``database``."""
        return self._confirmed.get(peer, {}).get(database, 0)

    def confirmed_peers(self, database: str, version: int) -> set[str]:
        """Peers that reported committing this node's ``version`` of ``database``."""
        return {
            peer
            for peer, confirmed in self._confirmed.items()
            if confirmed.get(database, 0) >= version
        }

    async def wait(
        self,
        database: str,
        version: int,
        count: int,
        timeout_s: float,
        groups: Iterable[Group] = (),
    ) -> list[str]:
        """The peers that committed the transaction, once ``count`` of them have and
        each group's count of its peers, or when ``timeout_s`` has passed (then fewer)."""
        waiter = _Waiter(
            database, version, count, tuple(groups), self.confirmed_peers(database, version)
        )
        if waiter.satisfied():
            return sorted(waiter.peers)
        self._waiters.add(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.done.wait(), timeout_s)
        finally:
            self._waiters.discard(waiter)
        return sorted(waiter.peers)
