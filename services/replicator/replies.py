"""Requests a node sends a peer over their replication connection and whose replies
come back on it, matched by id (FetchRequest / FetchReply, PositionsRequest /
PositionsReply)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from shoal.replicator.v1 import replicator_pb2 as rpb

if TYPE_CHECKING:
    from services.replicator.session import Session

Reply = TypeVar("Reply")


class Replies(Generic[Reply]):
    """The outstanding requests of one kind, by id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Reply]] = {}

    def resolve(self, request_id: int, reply: Reply) -> None:
        """A reply arrived (unknown or late ones are dropped)."""
        future = self._waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(reply)

    async def ask(
        self, session: Session, message: Callable[[int], rpb.PeerMessage], timeout_s: float
    ) -> Reply:
        """Send ``message(id)`` to the peer and wait for its reply; TimeoutError when none
        comes within ``timeout_s`` or the connection closes first."""
        request_id = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await asyncio.wait_for(session.send(message(request_id)), timeout_s)
            closed: asyncio.Future[Any] = asyncio.ensure_future(session.finished.wait())
            try:
                done, _ = await asyncio.wait(
                    {future, closed},
                    timeout=max(0.0, timeout_s),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                closed.cancel()
            if future not in done:
                raise TimeoutError(
                    "the connection closed" if session.finished.is_set() else "no answer in time"
                )
            return future.result()
        finally:
            self._waiting.pop(request_id, None)
