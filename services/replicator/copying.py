"""One part of a copy of a database from the peer, received: the CopyRequest (resuming
after the last merged key), each CopyChunk merged into storage (MergeSnapshot), paced by
``replication.copyRowsPerSecond``, its progress shown in status while it runs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.common.backoff import Backoff
from services.common.errors import error_reason

if TYPE_CHECKING:
    from services.replicator.session import Session

log = logging.getLogger("shoal.replicator.inbound")


class PeerRevoked(Exception):
    """The peer's certificate was revoked: nothing more it sends is applied."""


async def run_copy(
    session: Session,
    database: str,
    copy_id: int,
    progress: spb.CopyProgress | None,
    next_message: Callable[[], Awaitable[rpb.PeerMessage]],
    pause: Backoff,
) -> bool:
    """One part of a copy: request it, merge every chunk (read with ``next_message``).
    True when it completed."""
    request, after = _copy_request(session, database, copy_id, progress)
    await session.send(rpb.PeerMessage(copy_request=request))
    started = time.monotonic()
    rate = session.config.copy_rows_per_second
    part = secrets.randbits(63) or 1
    first = True
    merged = 0
    status = session.state.database(database)
    # The peer's state outlives this session: a copy cut off here (the session is
    # replaced or lost) must not leave its progress shown as if still running; the
    # next session resumes it from what storage recorded.
    shown: spb.CopyProgress | None = None
    try:
        while True:
            message = await next_message()
            if message.WhichOneof("body") != "copy_chunk" or message.copy_chunk.copy_id != copy_id:
                continue
            chunk = message.copy_chunk
            if chunk.error:
                log.warning("%s cannot copy %s: %s", session.peer, database, chunk.error)
                status.copy = None
                return False
            if session.revoked:
                raise PeerRevoked(f"the certificate of {session.peer} was revoked")
            merge = spb.MergeSnapshotRequest(
                source=session.peer,
                database=database,
                positions=chunk.positions,
                tables=chunk.tables,
                rows=chunk.rows,
                estimated_rows=chunk.estimated_rows,
                complete=chunk.done,
                part=part,
                begins_part=first,
                partial=first and (chunk.partial or bool(request.tables)),
                copied_tables=request.tables,
            )
            if after is not None:
                merge.after.CopyFrom(after)
            reply = await _merge(session, database, merge, pause)
            if reply is None:
                return False
            first = False
            if chunk.rows:
                last = chunk.rows[-1]
                after = types_pb2.SnapshotKey(table=last.table, id=last.id)
            status.copy = shown = reply.progress
            merged += len(chunk.rows)
            if rate:
                # Pace the copy (replication.copyRowsPerSecond) so it cannot starve a live node.
                ahead = merged / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if chunk.done:
                log.info(
                    "copied %s from %s: %d rows in %.1fs",
                    database,
                    session.peer,
                    reply.progress.rows,
                    time.monotonic() - started,
                )
                status.copy = None
                return True
    finally:
        if shown is not None and status.copy is shown:
            status.copy = None


def _copy_request(
    session: Session, database: str, copy_id: int, progress: spb.CopyProgress | None
) -> tuple[rpb.CopyRequest, types_pb2.SnapshotKey | None]:
    """The CopyRequest of a copy, resuming after ``progress``'s last key; that key."""
    tables = session.received_tables()
    request = rpb.CopyRequest(
        copy_id=copy_id,
        database=database,
        tables=sorted(t for d, t in tables or () if d == database),
    )
    after: types_pb2.SnapshotKey | None = None
    if progress is not None and progress.last_key.table:
        after = progress.last_key
        request.start_after.CopyFrom(after)
        log.info(
            "resuming copy of %s from %s after %s id %s (%d rows merged so far)",
            database,
            session.peer,
            after.table,
            after.id.decode(errors="replace"),
            progress.rows,
        )
    else:
        log.info("copying %s from %s", database, session.peer)
    return request, after


async def _merge(
    session: Session, database: str, merge: spb.MergeSnapshotRequest, pause: Backoff
) -> spb.MergeSnapshotResponse | None:
    """Storage's answer to one chunk's MergeSnapshot; None when the copy cannot go on
    now (the database is being handed over, or the copy is out of order or meets a
    restore)."""
    try:
        reply: spb.MergeSnapshotResponse = await session.storage.merge_snapshot(merge)
        return reply
    except grpc.aio.AioRpcError as exc:
        reason = error_reason(exc)
        if reason == "DATABASE_FENCED":
            # This node is handing the database over: try again later.
            log.info("not copying %s now: %s", database, exc.details())
            await asyncio.sleep(pause.next())
            return None
        if reason not in ("COPY_OUT_OF_ORDER", "RESTORING"):
            raise
        log.warning(
            "the copy of %s from %s cannot go on: %s",
            database,
            session.peer,
            exc.details(),
        )
        return None
