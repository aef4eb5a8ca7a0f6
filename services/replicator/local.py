"""The replicator's only way to data: its own node's storage service, over gRPC.

Every unary call has a deadline; streams are long-lived and end by cancellation. A
storage that is down or restarting surfaces as ``StorageUnavailable``, which ends the
peer sessions that depend on it (they reconnect with backoff; positions are durable in
storage, so nothing is skipped or applied twice).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services.common.auth import bearer_metadata
from services.common.config import ShoalConfig
from services.common.node_tls import node_channel

CALL_TIMEOUT_S = 60.0


class StorageUnavailable(Exception):
    """The local storage service could not be reached or failed a call."""


class LocalStorage:
    """Node-internal client of the storage service."""

    def __init__(self, config: ShoalConfig, token: str) -> None:
        """Storage on the node-local socket (``socketsPath``/storage.sock)."""
        self.address = config.socket_address("storage")
        self._channel = node_channel(config, "storage", config.storage.max_message_bytes)
        self._stub = storage_pb2_grpc.StorageServiceStub(self._channel)
        self._node = storage_pb2_grpc.StorageNodeServiceStub(self._channel)
        self._metadata = bearer_metadata(token)

    async def close(self) -> None:
        await self._channel.close()

    async def positions(self, database: str = "") -> pb.GetPositionsResponse:
        try:
            return await self._node.GetPositions(
                pb.GetPositionsRequest(database=database),
                metadata=self._metadata,
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            raise StorageUnavailable(f"storage at {self.address}: {exc.details()}") from exc

    async def databases(self) -> list[str]:
        try:
            reply = await self._stub.DescribeAll(
                pb.DescribeAllRequest(), metadata=self._metadata, timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            raise StorageUnavailable(f"storage at {self.address}: {exc.details()}") from exc
        return [db.name for db in reply.databases]

    async def apply(
        self,
        transactions: Sequence[types_pb2.Transaction],
        max_clock_skew_ms: int,
        partial: bool = False,
        epoch: int = 0,
        tables: Sequence[types_pb2.TableRef] = (),
    ) -> pb.ApplyResponse:
        """Apply a batch; raises the AioRpcError for refusals (e.g. CLOCK_SKEW,
        POSITIONS_CHANGED when ``epoch`` is no longer storage's). ``tables``: the
        subscription carried only these (ApplyRequest.tables)."""
        return await self._node.Apply(
            pb.ApplyRequest(
                transactions=transactions,
                max_clock_skew_ms=max_clock_skew_ms,
                partial=partial,
                epoch=epoch,
                tables=tables,
            ),
            metadata=self._metadata,
            timeout=CALL_TIMEOUT_S,
        )

    def subscribe(
        self, request: pb.SubscribeRequest
    ) -> grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.SubscribeResponse]:
        return self._node.Subscribe(request, metadata=self._metadata)

    def snapshot(
        self, request: pb.SnapshotRequest
    ) -> grpc.aio.UnaryStreamCall[pb.SnapshotRequest, pb.SnapshotResponse]:
        return self._node.Snapshot(request, metadata=self._metadata)

    async def merge_snapshot(self, request: pb.MergeSnapshotRequest) -> pb.MergeSnapshotResponse:
        return await self._node.MergeSnapshot(
            request, metadata=self._metadata, timeout=CALL_TIMEOUT_S
        )

    async def read_resident(
        self,
        database: str,
        table: str,
        ids: Sequence[bytes],
        timeout_s: float,
        states: bool = False,
    ) -> pb.ReadResidentResponse:
        """Records (or, with ``states``, whole states) this node holds in full; raises the
        AioRpcError when refused."""
        return await self._node.ReadResident(
            pb.ReadResidentRequest(database=database, table=table, ids=ids, states=states),
            metadata=self._metadata,
            timeout=timeout_s,
        )

    async def record_analytics(
        self, samples: Sequence[pb.AnalyticsSample], timeout_s: float
    ) -> pb.RecordAnalyticsResponse:
        """Record analytics samples; raises the AioRpcError when refused or unreachable."""
        return await self._node.RecordAnalytics(
            pb.RecordAnalyticsRequest(samples=samples), metadata=self._metadata, timeout=timeout_s
        )

    async def upsert(self, database: str, table: str, records: Sequence[bytes]) -> None:
        """Write records as this node (used for the node's own membership row)."""
        try:
            await self._stub.Upsert(
                pb.UpsertRequest(database=database, table=table, records=records, merge=True),
                metadata=self._metadata,
                timeout=CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            raise StorageUnavailable(f"storage at {self.address}: {exc.details()}") from exc
