"""The sender role of a session: this node's log, streamed to one peer.

On Subscribe, a storage Subscribe stream is opened with the peer's positions and
exclusions (the peer itself is always excluded). Each storage batch becomes one Batch
(whole transactions, bounded in count and bytes by storage) and waits for room in the
window of unacknowledged batches; an Ack frees the window. While the window is full the
storage stream is simply not read, so gRPC flow control holds storage back and memory
stays flat however far behind the peer is.

Copies: each CopyRequest streams a storage Snapshot as CopyChunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.common.errors import error_info, error_reason
from services.common.hlc import format_version
from services.replicator.local import StorageUnavailable
from services.replicator.window import Window

if TYPE_CHECKING:
    from services.replicator.session import Session

log = logging.getLogger("shoal.replicator.outbound")

# Copy chunks: large, because a copy is a sequence of round trips (chunk, merge, next).
COPY_CHUNK_ROWS = 5000
COPY_CHUNK_BYTES = 4 * 1024 * 1024


class Outbound:
    """Streams this node's committed transactions to the session's peer."""

    def __init__(self, session: Session) -> None:
        self.session = session
        config = session.config
        self.window = Window(config.window_batches, config.window_bytes)
        self.generation = 0
        self._feed: asyncio.Task[Any] | None = None
        self._copies: dict[int, asyncio.Task[Any]] = {}
        self._in_flight: dict[int, dict[str, tuple[int, int]]] = {}  # seq -> db -> (version, n)

    # -- subscription --------------------------------------------------------------------

    def _databases(self, asked: list[str]) -> list[str]:
        """The databases to stream: what the peer asks, within what this node replicates."""
        mine = self.session.replicator.replicated_databases()
        published = self.session.published_tables()
        if published is not None:
            allowed = {d for d, _ in published}
            mine = tuple(d for d in (mine or allowed) if d in allowed)
        if mine is None:
            return asked
        if not asked:
            return list(mine)
        return [d for d in asked if d in mine]

    def _tables(self, asked: list[types_pb2.TableRef]) -> list[types_pb2.TableRef]:
        """The tables to stream: what the peer asks, within what this node publishes."""
        published = self.session.published_tables()
        if published is None:
            return asked
        if not asked:
            return [types_pb2.TableRef(database=d, table=t) for d, t in sorted(published)]
        return [t for t in asked if (t.database, t.table) in published]

    async def on_subscribe(self, message: rpb.Subscribe) -> None:
        # The peer's durable positions: they confirm what it has committed of ours.
        self.session.replicator.confirmations.record(self.session.peer, message.positions)
        await self._stop_feed()
        self.generation = message.generation
        await self.window.reset()
        self._in_flight.clear()
        if not self.session.flows.sends:
            await self.session.send(
                rpb.PeerMessage(
                    subscribe_error=rpb.SubscribeError(
                        generation=message.generation,
                        reason="NOT_SENDING",
                        message=f"{self.session.replicator.name} does not send data to"
                        f" {self.session.peer} (controlled flow)",
                    )
                )
            )
            return
        self._feed = self.session.spawn(self._run_feed(message), "feed")

    async def on_unsubscribe(self, message: rpb.Unsubscribe) -> None:
        if message.generation == self.generation:
            await self._stop_feed()
            if message.reason:
                self.session.state.last_error = (
                    f"{self.session.peer} refused data: {message.reason}"
                )

    async def _stop_feed(self) -> None:
        if self._feed is not None:
            self._feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._feed
            self._feed = None

    async def on_ack(self, message: rpb.Ack) -> None:
        # Positions are durable whatever the generation: they confirm writes (WaitReplicated).
        self.session.replicator.confirmations.record(self.session.peer, message.positions)
        if message.generation != self.generation:
            return
        await self.window.release_through(message.sequence)
        for sequence in [s for s in self._in_flight if s <= message.sequence]:
            for database, (version, _) in self._in_flight.pop(sequence).items():
                db = self.session.state.database(database)
                db.last_commit_confirmed = max(db.last_commit_confirmed, version)
        self._update_backlog()

    def _update_backlog(self) -> None:
        pending: dict[str, int] = {}
        for per_db in self._in_flight.values():
            for database, (_, count) in per_db.items():
                pending[database] = pending.get(database, 0) + count
        for name, db in self.session.state.databases.items():
            db.backlog_transactions = pending.get(name, 0)
        self.session.state.back_pressure_percent = self.window.used_percent

    async def _run_feed(self, message: rpb.Subscribe) -> None:
        session = self.session
        tables = self._tables(list(message.tables))
        if session.published_tables() is not None and not tables:
            return  # nothing this node publishes was asked for (empty would mean "all")
        request = self._subscribe_request(message, tables)
        generation = message.generation
        sequence = 0
        was_caught_up = False
        stream = session.storage.subscribe(request)
        try:
            async for reply in stream:
                if reply.withheld:
                    self._withheld(list(reply.withheld))
                if not reply.transactions:
                    if reply.caught_up and not was_caught_up:
                        was_caught_up = True
                        await session.send(
                            rpb.PeerMessage(
                                batch=rpb.Batch(
                                    generation=generation,
                                    caught_up=True,
                                    sender_time=reply.node_time,
                                )
                            )
                        )
                    continue
                was_caught_up = reply.caught_up
                sequence += 1
                per_db: dict[str, tuple[int, int]] = {}
                for txn in reply.transactions:
                    version, count = per_db.get(txn.database, (0, 0))
                    per_db[txn.database] = (max(version, txn.version), count + 1)
                size = reply.ByteSize()
                await self.window.acquire(sequence, size, len(reply.transactions))
                self._in_flight[sequence] = per_db
                self._update_backlog()
                await session.send(
                    rpb.PeerMessage(
                        batch=rpb.Batch(
                            generation=generation,
                            sequence=sequence,
                            transactions=reply.transactions,
                            caught_up=reply.caught_up,
                            sender_time=reply.node_time,
                        )
                    )
                )
                session.state.sent_transactions += len(reply.transactions)
                session.state.sent_bytes += size
        except grpc.aio.AioRpcError as exc:
            if (
                exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                and error_reason(exc) == "LOG_TRUNCATED"
            ):
                log.info("log truncated for %s: %s", session.peer, exc.details())
                await session.send(
                    rpb.PeerMessage(
                        subscribe_error=rpb.SubscribeError(
                            generation=generation,
                            reason="LOG_TRUNCATED",
                            message=exc.details() or "",
                            database=_database_of(exc),
                        )
                    )
                )
                return
            raise StorageUnavailable(f"storage Subscribe failed: {exc.details()}") from exc
        finally:
            stream.cancel()

    def _subscribe_request(
        self, message: rpb.Subscribe, tables: list[types_pb2.TableRef]
    ) -> spb.SubscribeRequest:
        """The storage Subscribe that feeds the peer's subscription ``message``."""
        session = self.session
        config = session.config
        return spb.SubscribeRequest(
            databases=self._databases(list(message.databases)),
            tables=tables,
            positions=message.positions,
            exclude_origins=sorted({*message.exclude_origins, session.peer}),
            # Sharded databases of another shard never leave, whatever the peer asks and
            # whoever wrote them (relayed transactions included).
            exclude_databases=sorted(session.flows.withheld),
            default_version=message.default_version,
            max_batch_transactions=config.batch_transactions,
            max_batch_bytes=config.batch_bytes,
            heartbeat_interval_ms=int(config.heartbeat_interval_s * 1000),
            linger_ms=int(config.batch_linger_s * 1000),
            subscriber=session.peer,
        )

    def _withheld(self, positions: list[types_pb2.Position]) -> None:
        """Storage stopped relaying some origins to this peer (residency): say so in the
        connection's status, with what to do."""
        session = self.session
        what = ", ".join(
            f"{p.origin}'s transactions of {p.database!r} from {format_version(p.version)}"
            for p in positions
        )
        reason = (
            f"not relaying {what} to {session.peer}: this node holds only stubs of records"
            f" {session.peer} is a resident of; {session.peer} must connect to"
            f" {', '.join(sorted({p.origin for p in positions}))} directly (residency needs a"
            " full mesh)"
        )
        session.state.last_error = reason
        log.warning("%s", reason)

    # -- copies ----------------------------------------------------------------------------

    def on_copy_request(self, message: rpb.CopyRequest) -> None:
        previous = self._copies.pop(message.copy_id, None)
        if previous is not None:
            previous.cancel()
        self._copies[message.copy_id] = self.session.spawn(self._run_copy(message), "copy")

    async def _run_copy(self, message: rpb.CopyRequest) -> None:
        session = self.session
        if message.database in session.flows.withheld:
            await session.send(
                rpb.PeerMessage(
                    copy_chunk=rpb.CopyChunk(
                        copy_id=message.copy_id,
                        done=True,
                        error=f"{message.database} is sharded and {session.peer} is not of"
                        f" the shard of {session.replicator.name}",
                    )
                )
            )
            return
        tables = [
            t.table
            for t in self._tables(
                [types_pb2.TableRef(database=message.database, table=n) for n in message.tables]
            )
            if t.database == message.database
        ]
        if self.session.published_tables() is not None and not tables:
            await self.session.send(
                rpb.PeerMessage(
                    copy_chunk=rpb.CopyChunk(
                        copy_id=message.copy_id, done=True, error="not published"
                    )
                )
            )
            return
        request = spb.SnapshotRequest(
            database=message.database,
            tables=tables,
            max_batch_rows=COPY_CHUNK_ROWS,
            max_batch_bytes=COPY_CHUNK_BYTES,
            subscriber=session.peer,
        )
        if message.HasField("start_after") and message.start_after.table:
            request.start_after.CopyFrom(message.start_after)
        stream = session.storage.snapshot(request)
        try:
            async for reply in stream:
                await session.send(
                    rpb.PeerMessage(
                        copy_chunk=rpb.CopyChunk(
                            copy_id=message.copy_id,
                            positions=reply.positions,
                            tables=reply.tables,
                            estimated_rows=reply.estimated_rows,
                            rows=reply.rows,
                            partial=reply.partial,
                        )
                    )
                )
            done = rpb.CopyChunk(copy_id=message.copy_id, done=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,  # RESTORING: the peer tries again
            ):
                raise StorageUnavailable(f"storage Snapshot failed: {exc.details()}") from exc
            done = rpb.CopyChunk(copy_id=message.copy_id, done=True, error=exc.details() or "")
        finally:
            stream.cancel()
            self._copies.pop(message.copy_id, None)
        await session.send(rpb.PeerMessage(copy_chunk=done))


def _database_of(exc: grpc.aio.AioRpcError) -> str:
    info = error_info(exc)
    return str(info.metadata.get("database", "")) if info is not None else ""
