"""StorageService handlers of the logs: reading the transaction and audit logs, deleting
entries before a time, and reverting a logged transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator

from shoal.storage.v1 import storage_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.hlc import version_from_ms
from services.storage import log, revert
from services.storage.client.base import ClientHandlers
from services.storage.permissions import require, require_super_user
from services.storage.rpc import Ctx, caller, encoded_ids, log_batches, ms, time_range
from services.storage.schema import check_name


class LogHandlers(ClientHandlers):
    async def ReadTransactionLog(
        self, request: pb.ReadTransactionLogRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadTransactionLogResponse]:
        require_super_user(caller(), f"read the transaction log of database {request.database}")
        self.engine.catalog.database(request.database)
        lo, hi = time_range(request)
        transactions = log.read_transactions(
            self.engine, request.database, request.table, lo, hi, request.limit
        )
        async for batch in log_batches(transactions):
            yield pb.ReadTransactionLogResponse(transactions=batch)

    async def ReadAuditLog(
        self, request: pb.ReadAuditLogRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadAuditLogResponse]:
        require_super_user(
            caller(), f"read the audit log of table {request.database}.{request.table}"
        )
        self.engine.catalog.table(request.database, request.table)
        lo, hi = time_range(request)
        entries = log.read_audit(
            self.engine,
            request.database,
            request.table,
            encoded_ids(request.ids),
            set(request.users),
            lo,
            hi,
            request.limit,
        )
        async for batch in log_batches(entries):
            yield pb.ReadAuditLogResponse(entries=batch)

    async def DeleteLogsBefore(
        self, request: pb.DeleteLogsBeforeRequest, context: Ctx
    ) -> pb.DeleteLogsBeforeResponse:
        require_super_user(caller(), "delete log entries")
        if request.database:
            self.engine.catalog.database(request.database)
        if not request.HasField("before"):
            raise InvalidArgument("before is required")
        before = ms(request.before, "before")
        if before > self.engine.clock.physical_ms():
            raise InvalidArgument("before is in the future")
        entries, tombstones = log.purge_before(
            self.engine, version_from_ms(before), request.database
        )
        return pb.DeleteLogsBeforeResponse(
            deleted_transactions=entries, purged_tombstones=tombstones
        )

    async def RevertTransaction(
        self, request: pb.RevertTransactionRequest, context: Ctx
    ) -> pb.RevertTransactionResponse:
        who = caller()
        check_name("database", request.database)
        local = self.engine.transaction(request.database, who.name, who.internal)
        target = revert.find(
            self.engine, request.database, request.origin, request.version, request.timestamp
        )
        plan = revert.plan(self.engine, local, target)
        for table, action in plan.actions():  # all of them before anything is written
            require(who, action, request.database, table)
        if not request.force:
            plan.refuse_later_changes()
        return plan.response(self.engine.node_name, plan.commit(local))
