"""The gRPC handlers of StorageNodeService: the RPCs only the node's own services call
(replication, copies, positions, analytics samples, backups and restores, residents'
reads), served on the node-local socket only (see protos/shoal/storage/v1/storage.proto).
Every call must carry the node identity; anything else is PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services.common import analytics as metrics_catalog
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.storage import backup, handover, log, merge, residency, snapshot
from services.storage.analytics import AnalyticsTables
from services.storage.copy import CopyState, merge_snapshot
from services.storage.engine import Engine
from services.storage.rpc import Ctx, encoded_ids, node_only, numbered

POSITIONS_CHANGED = "POSITIONS_CHANGED"


def copy_progress(copy: CopyState, complete: bool = False) -> pb.CopyProgress:
    return pb.CopyProgress(
        database=copy.database,
        source=copy.source,
        rows=copy.rows,
        bytes=copy.merged_bytes,
        estimated_rows=copy.estimated_rows,
        last_key=types_pb2.SnapshotKey(table=copy.last_table, id=copy.last_id),
        complete=complete,
        part=copy.part,
    )


class StorageNodeServicer(storage_pb2_grpc.StorageNodeServiceServicer):
    """The node-internal storage RPCs."""

    def __init__(self, engine: Engine, analytics: AnalyticsTables) -> None:
        self.engine = engine
        self.analytics = analytics

    # -- replication -------------------------------------------------------------------

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[pb.SubscribeResponse]:
        node_only()
        spec = log.subscribe_spec(request)
        batch: list[types_pb2.Transaction] = []
        size = 0
        async for txn in log.subscribe(self.engine, spec):
            if txn is None:
                yield pb.SubscribeResponse(
                    transactions=batch,
                    caught_up=True,
                    node_time=self.engine.clock.peek(),
                    withheld=spec.withheld,
                )
                del spec.withheld[:]
                batch = []
                size = 0
                continue
            n = txn.ByteSize()
            if batch and (len(batch) >= spec.max_transactions or size + n > spec.max_bytes):
                yield pb.SubscribeResponse(transactions=batch, node_time=self.engine.clock.peek())
                batch = []
                size = 0
            batch.append(txn)
            size += n

    async def Apply(self, request: pb.ApplyRequest, context: Ctx) -> pb.ApplyResponse:
        node_only()
        engine = self.engine
        if request.epoch and request.epoch != engine.positions_epoch:
            raise FailedPrecondition(
                "a restore changed this node's positions since the subscription began:"
                " subscribe again from the positions read now",
                reason=POSITIONS_CHANGED,
            )
        # A database being restored is left alone: its transactions come again from the
        # restored positions (the restore changes the epoch when it ends).
        transactions = [t for t in request.transactions if t.database not in engine.restoring]
        tables = {(t.database, t.table) for t in request.tables} if request.tables else None
        result = engine.apply(transactions, request.max_clock_skew_ms, request.partial, tables)
        return pb.ApplyResponse(
            applied=result.applied,
            skipped=result.skipped + len(request.transactions) - len(transactions),
            positions=[
                types_pb2.Position(database=d, origin=o, version=v)
                for (d, o), v in sorted(result.positions.items())
            ],
            fenced_databases=sorted(result.fenced),
        )

    async def Snapshot(
        self, request: pb.SnapshotRequest, context: Ctx
    ) -> AsyncIterator[pb.SnapshotResponse]:
        node_only()
        plan = snapshot.plan_snapshot(self.engine, request)
        yield plan.header
        for rows in plan.batches:
            yield pb.SnapshotResponse(rows=rows)

    async def MergeSnapshot(
        self, request: pb.MergeSnapshotRequest, context: Ctx
    ) -> pb.MergeSnapshotResponse:
        node_only()
        self.engine.fences.check_copy(request.database)
        copy = merge_snapshot(self.engine, request)
        return pb.MergeSnapshotResponse(progress=copy_progress(copy, request.complete))

    async def GetPositions(
        self, request: pb.GetPositionsRequest, context: Ctx
    ) -> pb.GetPositionsResponse:
        node_only()
        wanted = request.database

        def pick(items: dict[tuple[str, str], int]) -> list[types_pb2.Position]:
            return [
                types_pb2.Position(database=d, origin=o, version=v)
                for (d, o), v in sorted(items.items())
                if not wanted or d == wanted
            ]

        return pb.GetPositionsResponse(
            positions=pick(self.engine.positions),
            horizons=pick(self.engine.horizons),
            copies=[
                copy_progress(c)
                for (d, _), c in sorted(self.engine.copies.items())
                if not wanted or d == wanted
            ],
            node_name=self.engine.node_name,
            node_time=self.engine.clock.peek(),
            epoch=self.engine.positions_epoch,
            catching_up=sorted(d for d in self.engine.catching_up if not wanted or d == wanted),
            limited=[
                pb.LimitedPosition(database=d, origin=o, tables=sorted(t))
                for (d, o), t in sorted(self.engine.limited.items())
                if not wanted or d == wanted
            ],
            fenced_databases=[d for d in self.engine.fences.fenced() if not wanted or d == wanted],
            partial_databases=sorted(
                d for d in self.engine.partial_databases if not wanted or d == wanted
            ),
        )

    # -- hand-over (shard changes) -------------------------------------------------------

    async def FenceDatabases(
        self, request: pb.FenceDatabasesRequest, context: Ctx
    ) -> pb.FenceDatabasesResponse:
        node_only()
        fenced = self.engine.fences.set(list(request.databases), request.lease_ms)
        return pb.FenceDatabasesResponse(fenced_databases=fenced)

    async def ForgetDatabase(
        self, request: pb.ForgetDatabaseRequest, context: Ctx
    ) -> pb.ForgetDatabaseResponse:
        node_only()
        held: dict[str, int] = {}
        for p in request.held_elsewhere:
            if p.database and p.database != request.database:
                raise InvalidArgument(
                    f"held_elsewhere names {p.database!r}, not {request.database!r}"
                )
            held[p.origin] = max(held.get(p.origin, 0), p.version)
        forgotten = handover.forget(self.engine, request.database, held)
        return pb.ForgetDatabaseResponse(forgotten=forgotten)

    # -- analytics ---------------------------------------------------------------------

    async def RecordAnalytics(
        self, request: pb.RecordAnalyticsRequest, context: Ctx
    ) -> pb.RecordAnalyticsResponse:
        node_only()
        if not request.samples:
            raise InvalidArgument("no samples given")
        limit = metrics_catalog.MAX_SAMPLES_PER_REQUEST
        if len(request.samples) > limit:
            raise ResourceExhausted(
                f"{len(request.samples)} samples in one request; the limit is {limit}"
            )
        samples: list[metrics_catalog.Sample] = []
        for i, s in enumerate(request.samples):
            with numbered(f"sample {i}", (metrics_catalog.InvalidSample,)):
                samples.append(
                    metrics_catalog.make_sample(s.metric, s.time_ms, s.value, s.labels, s.count)
                )
        return pb.RecordAnalyticsResponse(recorded=self.analytics.record(samples))

    # -- backups -----------------------------------------------------------------------

    async def Backup(
        self, request: pb.BackupRequest, context: Ctx
    ) -> AsyncIterator[pb.BackupResponse]:
        node_only()
        plan = backup.plan_backup(self.engine, request)
        yield pb.BackupResponse(header=plan.header)
        for rows in plan.rows:
            yield pb.BackupResponse(rows=rows)
        for transactions in plan.transactions:
            if transactions:
                yield pb.BackupResponse(transactions=transactions)
            else:
                await asyncio.sleep(0)

    async def Restore(
        self, request_iterator: AsyncIterator[pb.RestoreRequest], context: Ctx
    ) -> pb.RestoreResponse:
        node_only()
        iterator = aiter(request_iterator)
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            raise InvalidArgument("the stream is empty: send a header first") from None
        if not first.HasField("header"):
            raise InvalidArgument("the first message must hold the header")
        session: backup.RestoreSession | None = None
        try:
            session = backup.RestoreSession(self.engine, first.header)
            message = first
            while not message.complete:
                if message.rows:
                    session.rows(list(message.rows))
                if message.transactions:
                    session.transactions(list(message.transactions))
                try:
                    message = await anext(iterator)
                except StopAsyncIteration:
                    raise InvalidArgument(
                        "the stream ended without a message marked complete: the restore is"
                        " interrupted (positions were not adopted)"
                    ) from None
                if message.HasField("header"):
                    raise InvalidArgument("only one header is allowed, in the first message")
            if message.rows or message.transactions:
                raise InvalidArgument("the message marked complete must carry nothing else")
            return session.finish().response(session.database)
        except Exception:
            # Fail only once the client has sent everything: a grpc.aio client still
            # writing when the call ends gets INTERNAL instead of this error.
            async for _ in iterator:
                pass
            raise
        finally:
            if session is not None:
                session.close()

    async def ReadResident(
        self, request: pb.ReadResidentRequest, context: Ctx
    ) -> pb.ReadResidentResponse:
        node_only()
        table = self.engine.catalog.table(request.database, request.table)
        if not request.ids:
            raise InvalidArgument("no ids given")
        encoded = encoded_ids(request.ids)
        raw = self.engine.store.multi_get("data", [table.prefix + e for e in encoded])
        reply = pb.ReadResidentResponse()
        node = self.engine.node_name
        for id_json, value in zip(request.ids, raw, strict=True):
            state = None if value is None else merge.decode_state(value)
            record = b""
            if state is not None and state.visible and residency.holds_full(state, node):
                # The stored state, or the record's JSON (empty when it cannot be written).
                record = (value or b"") if request.states else merge.doc_json(state.doc)
            if not record:
                reply.missing.append(id_json)
            elif request.states:
                reply.states.append(record)
            else:
                reply.records.append(record)
        return reply

    # -- tokens --------------------------------------------------------------------------

    async def RefreshOperationToken(
        self, request: pb.RefreshOperationTokenRequest, context: Ctx
    ) -> pb.RefreshOperationTokenResponse:
        node_only()
        token = self.engine.users.refresh_token(request.refresh_token)
        return pb.RefreshOperationTokenResponse(operation_token=token)
