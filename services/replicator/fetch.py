"""Read-through of records with residents: FetchRecords asks the connected residents of
some records for them, one after the other, lowest heartbeat latency first, over their
replication connections (FetchRequest / FetchReply), which are already authenticated
(mutual TLS with the node certificates, or admitted addresses on the plain port).

Each request waits for its reply within what is left of the caller's budget; a resident
that is not connected, fails or does not answer in time is skipped, and the next one is
asked for the keys still unanswered. When none answers, UNAVAILABLE names every
resident and why it could not serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.errors import InvalidArgument, Unavailable
from services.replicator.replies import Replies

if TYPE_CHECKING:
    from services.replicator.replicator import Replicator
    from services.replicator.session import Session

log = logging.getLogger("shoal.replicator.fetch")

MAX_TIMEOUT_MS = 60_000
MAX_IDS = 10_000
READ_TIMEOUT_S = 10.0


class Fetches:
    """Outstanding FetchRequests of this node, by id."""

    def __init__(self, replicator: Replicator) -> None:
        self.replicator = replicator
        self._replies: Replies[rpb.FetchReply] = Replies()

    def resolve(self, reply: rpb.FetchReply) -> None:
        """A FetchReply arrived (unknown or late ones are dropped)."""
        self._replies.resolve(reply.id, reply)

    async def _ask(
        self, session: Session, request: rpb.FetchRecordsRequest, ids: Sequence[bytes], left: float
    ) -> rpb.FetchReply:
        def message(fid: int) -> rpb.PeerMessage:
            return rpb.PeerMessage(
                fetch_request=rpb.FetchRequest(
                    id=fid,
                    database=request.database,
                    table=request.table,
                    ids=ids,
                    states=request.states,
                )
            )

        return await self._replies.ask(session, message, left)

    async def fetch(self, request: rpb.FetchRecordsRequest) -> rpb.FetchRecordsResponse:
        """Serve FetchRecords (see the module docstring)."""
        if not request.database or not request.table:
            raise InvalidArgument("FetchRecords needs a database and a table")
        if not request.ids or len(request.ids) > MAX_IDS:
            raise InvalidArgument(f"FetchRecords needs 1 to {MAX_IDS} ids")
        if not request.residents:
            raise InvalidArgument("FetchRecords needs the records' residents")
        if not 1 <= request.timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidArgument(
                f"FetchRecords timeout_ms must be 1 to {MAX_TIMEOUT_MS}, not {request.timeout_ms}"
            )
        deadline = time.monotonic() + request.timeout_ms / 1000
        sessions = self.replicator.sessions
        residents = sorted(set(request.residents) - {self.replicator.name})
        failures: dict[str, str] = {}
        live = [
            sessions[n] for n in residents if n in sessions and not sessions[n].finished.is_set()
        ]
        for name in residents:
            if name not in sessions:
                failures[name] = "not connected"
        live.sort(key=lambda s: (s.state.latency_ms or float("inf"), s.peer))
        pending = list(request.ids)
        reply = rpb.FetchRecordsResponse()
        for session in live:
            left = deadline - time.monotonic()
            if left <= 0:
                failures[session.peer] = "no time left"
                continue
            try:
                answer = await self._ask(session, request, pending, left)
            except TimeoutError as exc:
                failures[session.peer] = str(exc) or "no answer in time"
                continue
            if answer.error:
                failures[session.peer] = answer.error
                continue
            reply.records.extend(answer.records)
            reply.states.extend(answer.states)
            reply.served_by.append(session.peer)
            pending = list(answer.missing)
            if not pending:
                return reply
        if reply.served_by:
            # Keys the residents that answered do not hold (deleted, or not there yet).
            reply.missing.extend(pending)
            return reply
        why = "; ".join(f"{n}: {failures.get(n, 'did not answer')}" for n in residents)
        raise Unavailable(
            f"no resident of {request.database}.{request.table} record(s) could be reached"
            f" (residents: {', '.join(residents)}; {why})",
            reason="RESIDENTS_UNAVAILABLE",
            metadata={"residents": ",".join(residents)},
        )


async def serve(session: Session, message: rpb.FetchRequest) -> None:
    """Answer a peer's FetchRequest from this node's storage (never ends the session)."""
    reply = rpb.FetchReply(id=message.id)
    try:
        answer = await session.storage.read_resident(
            message.database, message.table, list(message.ids), READ_TIMEOUT_S, message.states
        )
        reply.records.extend(answer.records)
        reply.states.extend(answer.states)
        reply.missing.extend(answer.missing)
    except grpc.aio.AioRpcError as exc:
        reply.error = f"storage of {session.replicator.name}: {exc.details() or exc.code().name}"
    except Exception as exc:  # the peer gets a sentence, the session lives on
        log.warning("cannot answer %s's fetch: %s", session.peer, exc)
        reply.error = f"{session.replicator.name} could not read the records"
    await session.send(rpb.PeerMessage(fetch_reply=reply))
