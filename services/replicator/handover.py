"""Handing databases over to the rest of a shard (HandOver), before a node leaves it.

Storage has fenced the databases, so this node's positions of them no longer move. The
replicator then asks every connected peer with which a database flows (the same shard)
for its positions of it (PositionsRequest / PositionsReply on the replication
connection), and answers once, for every origin of this node's positions, some peer that
is not handing the database over itself and whose positions are not partial has applied
at least as much: then every write this node holds of the database is held by another
node of the shard. Until then it asks again every ``POLL_S``; meanwhile this node's log
keeps flowing to those peers (the fence stops only writes into this node), so what they
lack reaches them. Storage's ForgetDatabase checks the answer again, atomically with the
removal.

Two nodes leaving the same shard at once never count on each other: each fences before it
asks, and a fenced peer is not counted, so the later of the two finds the earlier fenced
(or gone) and refuses, unless a third node holds everything.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import types_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.hlc import format_version
from services.replicator.local import StorageUnavailable
from services.replicator.replies import Replies

if TYPE_CHECKING:
    from services.replicator.replicator import Replicator
    from services.replicator.session import Session

log = logging.getLogger("shoal.replicator.handover")

MAX_TIMEOUT_MS = 3_600_000
ASK_TIMEOUT_S = 5.0  # one peer's answer to a PositionsRequest
POLL_S = 0.25
REASON = "NOT_HELD_ELSEWHERE"


@dataclass
class Handed:
    """One database: the peers holding it and the highest position per origin."""

    database: str
    held_by: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)

    def message(self) -> rpb.HandedOver:
        return rpb.HandedOver(
            database=self.database,
            held_by=sorted(self.held_by),
            positions=[
                types_pb2.Position(database=self.database, origin=o, version=v)
                for o, v in sorted(self.positions.items())
            ],
        )


class PositionQueries:
    """Outstanding PositionsRequests of this node, by id."""

    def __init__(self) -> None:
        self._replies: Replies[rpb.PositionsReply] = Replies()

    def resolve(self, reply: rpb.PositionsReply) -> None:
        """A PositionsReply arrived (unknown or late ones are dropped)."""
        self._replies.resolve(reply.id, reply)

    async def ask(self, session: Session, database: str, timeout_s: float) -> rpb.PositionsReply:
        """The peer's answer; TimeoutError when none comes in time."""

        def message(qid: int) -> rpb.PeerMessage:
            return rpb.PeerMessage(
                positions_request=rpb.PositionsRequest(id=qid, database=database)
            )

        return await self._replies.ask(session, message, timeout_s)


async def serve(session: Session, request: rpb.PositionsRequest) -> None:
    """Answer a peer's PositionsRequest from this node's storage (never ends the session)."""
    reply = rpb.PositionsReply(id=request.id)
    if not session.flows.covers(request.database):
        reply.error = (
            f"{session.replicator.name} does not replicate {request.database!r} with {session.peer}"
        )
    else:
        try:
            answer = await session.storage.positions(request.database)
            reply.positions.extend(p for p in answer.positions if p.database == request.database)
            reply.partial = request.database in answer.partial_databases
            reply.fenced = request.database in answer.fenced_databases
        except StorageUnavailable as exc:
            reply.error = str(exc)
    await session.send(rpb.PeerMessage(positions_reply=reply))


def _validated(request: rpb.HandOverRequest) -> list[str]:
    names = list(request.databases)
    if not names:
        raise InvalidArgument("HandOver needs at least one database")
    if len(set(names)) != len(names):
        raise InvalidArgument("HandOver names a database twice")
    if "system" in names or "" in names:
        raise InvalidArgument("HandOver: the system database is never handed over")
    if not 1 <= request.timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidArgument(
            f"HandOver timeout_ms must be 1 to {MAX_TIMEOUT_MS}, not {request.timeout_ms}"
        )
    return names


async def hand_over(replicator: Replicator, request: rpb.HandOverRequest) -> rpb.HandOverResponse:
    """Serve HandOver (see the module docstring)."""
    names = _validated(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.timeout_ms / 1000
    reply = rpb.HandOverResponse()
    for database in names:
        handed = await _one(replicator, database, deadline)
        log.info(
            "%s is held by %s as well",
            database,
            ", ".join(sorted(handed.held_by)) or "no other node (nothing held here)",
        )
        reply.databases.append(handed.message())
    return reply


async def _one(replicator: Replicator, database: str, deadline: float) -> Handed:
    loop = asyncio.get_running_loop()
    while True:
        answer = await replicator.storage.positions(database)
        mine = {p.origin: p.version for p in answer.positions if p.database == database}
        if not mine:
            return Handed(database)
        handed = Handed(database)
        refusals: dict[str, str] = {}
        sessions = [
            s
            for s in list(replicator.sessions.values())
            if not s.finished.is_set() and s.flows.covers(database)
        ]
        left = max(0.05, min(ASK_TIMEOUT_S, deadline - loop.time()))
        answers = await asyncio.gather(
            *(replicator.position_queries.ask(s, database, left) for s in sessions),
            return_exceptions=True,
        )
        for session, peer_answer in zip(sessions, answers, strict=True):
            if isinstance(peer_answer, BaseException):
                refusals[session.peer] = str(peer_answer) or type(peer_answer).__name__
            elif peer_answer.error:
                refusals[session.peer] = peer_answer.error
            elif peer_answer.fenced:
                refusals[session.peer] = "it is handing the database over too"
            elif peer_answer.partial:
                refusals[session.peer] = "its positions of it are partial"
            else:
                handed.held_by.append(session.peer)
                for p in peer_answer.positions:
                    if p.database == database and p.version > handed.positions.get(p.origin, 0):
                        handed.positions[p.origin] = p.version
        missing = {o: v for o, v in mine.items() if handed.positions.get(o, 0) < v}
        if not missing:
            return handed
        if loop.time() >= deadline or not (sessions or replicator.shard_members()):
            # Out of time, or no other node of the shard at all: nobody will hold it.
            raise _not_held(database, missing, handed, refusals)
        await asyncio.sleep(POLL_S)


def _not_held(
    database: str, missing: dict[str, int], handed: Handed, refusals: dict[str, str]
) -> FailedPrecondition:
    what = ", ".join(
        f"{origin}'s writes up to {format_version(v)}" for origin, v in sorted(missing.items())
    )
    asked = [
        *(f"{peer} holds less" for peer in sorted(handed.held_by)),
        *(f"{peer}: {why}" for peer, why in sorted(refusals.items())),
    ]
    peers = "; ".join(asked) if asked else "no connected node of this node's shard"
    return FailedPrecondition(
        f"no other node of this node's shard holds all of {database!r} yet: {what} are held"
        f" only here ({peers})",
        reason=REASON,
        metadata={"database": database},
    )
