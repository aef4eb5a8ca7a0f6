"""StorageService handlers of residency: Rebalance and ResidencyStatus."""

from __future__ import annotations

from shoal.storage.v1 import storage_pb2 as pb

from services.common.errors import InvalidArgument
from services.storage import residency
from services.storage.client.base import ClientHandlers
from services.storage.rpc import Ctx, administer_or_node


def residency_progress(progress: residency.RepairProgress) -> pb.ResidencyProgress:
    return pb.ResidencyProgress(
        running=progress.running,
        passes=progress.passes,
        scanned=progress.scanned,
        needing=progress.needing,
        rehomed=progress.rehomed,
        deferred=progress.deferred,
        unrecoverable=progress.unrecoverable,
        dry_run=progress.dry_run,
        started_ms=progress.started_ms,
        finished_ms=progress.finished_ms,
    )


class ResidencyHandlers(ClientHandlers):
    async def Rebalance(self, request: pb.RebalanceRequest, context: Ctx) -> pb.RebalanceResponse:
        administer_or_node("rebalance")
        if request.database:
            database = self.engine.catalog.database(request.database)
            if not self.engine.database_has_residents(database.name):
                raise InvalidArgument(
                    f"database {database.name!r} has no residency (no replicateTo in"
                    " replication.databases and no record written with replicate_to)"
                )
        progress = self.residency.start_rebalance(request.database, request.dry_run)
        return pb.RebalanceResponse(progress=residency_progress(progress))

    async def ResidencyStatus(
        self, request: pb.ResidencyStatusRequest, context: Ctx
    ) -> pb.ResidencyStatusResponse:
        administer_or_node("residency status")
        worker = self.residency
        return pb.ResidencyStatusResponse(
            repair=residency_progress(worker.repair),
            rebalance=residency_progress(worker.rebalance),
            gone=sorted(worker.gone),
        )
