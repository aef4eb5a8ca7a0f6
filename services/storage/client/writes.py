"""StorageService handlers of record writes (Insert, Update, Upsert, Delete, Transact),
with write confirmation around each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.common.errors import InvalidArgument
from services.storage import rpc
from services.storage.client.base import ClientHandlers
from services.storage.confirmation import Need, plan, requested, wait_budget
from services.storage.permissions import require
from services.storage.rpc import OPERATION_ACTIONS, Ctx, Msg, caller, numbered
from services.storage.schema import Table, check_name
from services.storage.transaction import LocalTransaction, OperationResult


def _operate(txn: LocalTransaction, table: Table, op: Any) -> OperationResult:
    """One operation of a Transact request, written into ``txn``."""
    if op.operation == types_pb2.OPERATION_INSERT:
        result = txn.insert(table, list(op.records))
    elif op.operation == types_pb2.OPERATION_UPDATE:
        result = txn.update(table, list(op.records))
    elif op.operation == types_pb2.OPERATION_UPSERT:
        result = txn.upsert(table, list(op.records))
    elif op.operation == types_pb2.OPERATION_DELETE:
        result = txn.delete(table, list(op.ids))
    else:
        raise InvalidArgument("operation must be INSERT, UPDATE, UPSERT or DELETE")
    if op.operation != types_pb2.OPERATION_DELETE and not op.records:
        raise InvalidArgument("no records given")
    return result


class WriteHandlers(ClientHandlers):
    async def _confirmed(
        self,
        context: Ctx,
        database: str,
        tables: list[Table],
        confirmation: int,
        write: Callable[[Callable[[LocalTransaction], int]], tuple[Msg, int]],
    ) -> tuple[Msg, int]:
        """Run ``write`` (which commits its transaction with the function it is given and
        returns (result, version)) with write confirmation: N checked against the
        possible recipients before, the records' residents checked in the step that
        commits, and the peers' acknowledgements awaited after (see confirmation.py)."""
        count = requested(confirmation)
        recipients: list[str] = []
        if count:
            if not all(t.replicate for t in tables):
                local = ", ".join(sorted(t.name for t in tables if not t.replicate))
                raise InvalidArgument(
                    f"replicated_confirmation {count} is impossible: {database}.{local} does"
                    " not replicate (replicate: false); nothing was written"
                )
            recipients = await self.replicator.check_recipients(
                database, [t.name for t in tables], count
            )
        needs: list[Need] = []

        def commit(txn: LocalTransaction) -> int:
            # Synchronous with the commit: the residents checked are those written.
            if count:
                node = self.engine.node_name
                needs.append(plan(node, count, database, recipients, txn.written_residency()))
            return txn.commit()

        result, version = write(commit)
        if count and version:
            await self.replicator.wait(
                database, version, needs[0], wait_budget(context.time_remaining())
            )
        return result, version

    async def _single(
        self,
        context: Ctx,
        database: str,
        table_name: str,
        op: str,
        payload: Sequence[bytes],
        confirmation: int,
        method: str | None = None,
        replicate_to: types_pb2.ReplicateTo | None = None,
    ) -> tuple[OperationResult, int]:
        who = caller()
        require(who, op, database, table_name)
        check_name("database", database)
        check_name("table", table_name)
        if not payload:
            raise InvalidArgument("no records given" if op != "delete" else "no ids given")
        table = self.engine.catalog.table(database, table_name)

        def write(commit: Callable[[LocalTransaction], int]) -> tuple[OperationResult, int]:
            txn = self.engine.transaction(database, who.name, who.internal)
            txn.replicate_to(replicate_to)
            result = getattr(txn, method or op)(table, payload)
            return result, commit(txn)

        return await self._confirmed(context, database, [table], confirmation, write)

    async def Insert(self, request: pb.InsertRequest, context: Ctx) -> pb.InsertResponse:
        result, version = await self._single(
            context,
            request.database,
            request.table,
            "insert",
            request.records,
            request.replicated_confirmation,
            replicate_to=rpc.replicate_to(request),
        )
        return pb.InsertResponse(
            inserted_ids=result.written, skipped_ids=result.skipped, version=version
        )

    async def Update(self, request: pb.UpdateRequest, context: Ctx) -> pb.UpdateResponse:
        result, version = await self._single(
            context,
            request.database,
            request.table,
            "update",
            request.records,
            request.replicated_confirmation,
            replicate_to=rpc.replicate_to(request),
        )
        return pb.UpdateResponse(
            updated_ids=result.written, skipped_ids=result.skipped, version=version
        )

    async def Upsert(self, request: pb.UpsertRequest, context: Ctx) -> pb.UpsertResponse:
        method = "merge_upsert" if request.merge else "upsert"
        result, version = await self._single(
            context,
            request.database,
            request.table,
            "upsert",
            request.records,
            request.replicated_confirmation,
            method,
            rpc.replicate_to(request),
        )
        return pb.UpsertResponse(upserted_ids=result.written, version=version)

    async def Delete(self, request: pb.DeleteRequest, context: Ctx) -> pb.DeleteResponse:
        result, version = await self._single(
            context,
            request.database,
            request.table,
            "delete",
            request.ids,
            request.replicated_confirmation,
            replicate_to=rpc.replicate_to(request),
        )
        return pb.DeleteResponse(
            deleted_ids=result.written, skipped_ids=result.skipped, version=version
        )

    async def Transact(self, request: pb.TransactRequest, context: Ctx) -> pb.TransactResponse:
        who = caller()
        for op in request.operations:  # all of them before anything is written
            action = OPERATION_ACTIONS.get(op.operation)
            if action is not None:
                require(who, action, request.database, op.table)
        check_name("database", request.database)
        if not request.operations:
            raise InvalidArgument("a transaction needs at least one operation")
        tables = []
        if request.replicated_confirmation:
            for i, op in enumerate(request.operations):
                with numbered(f"operation {i}"):
                    tables.append(self.engine.catalog.table(request.database, op.table))

        def write(
            commit: Callable[[LocalTransaction], int],
        ) -> tuple[list[pb.TransactResult], int]:
            txn = self.engine.transaction(request.database, who.name, who.internal)
            txn.replicate_to(rpc.replicate_to(request))
            results = []
            for i, op in enumerate(request.operations):
                with numbered(f"operation {i}"):
                    table = self.engine.catalog.table(request.database, op.table)
                    result = _operate(txn, table, op)
                results.append(
                    pb.TransactResult(written_ids=result.written, skipped_ids=result.skipped)
                )
            return results, commit(txn)

        results, version = await self._confirmed(
            context, request.database, tables, request.replicated_confirmation, write
        )
        return pb.TransactResponse(results=results, version=version)
