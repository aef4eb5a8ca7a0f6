"""The StorageService handlers. Each one checks the caller's permission (``permissions``),
validates, calls the engine, and builds the response; authentication and error mapping
happen once, in ``common.grpcserver``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services.common import jsonbytes, jsoninput
from services.common.auth import Identity, identity
from services.common.errors import (
    InvalidArgument,
    PermissionDenied,
    ShoalError,
)
from services.common.hlc import version_from_ms
from services.storage import (
    commit,
    csvload,
    log,
    residency,
    revert,
    search,
)
from services.storage.analytics import AnalyticsTables
from services.storage.commit import LocalTransaction, OperationResult, parse_id
from services.storage.confirmation import (
    Need,
    ReplicatorClient,
    plan,
    requested,
    wait_budget,
)
from services.storage.engine import RESERVED_DATABASES, Engine
from services.storage.permissions import (
    DELETE,
    INSERT,
    READ,
    UPDATE,
    UPSERT,
    Permission,
    UserIdentity,
    can,
    permission_of,
    require,
    require_reads_in,
    require_super_user,
)
from services.storage.readthrough import ResidentReads
from services.storage.repair import ResidencyWorker
from services.storage.schema import Database, Table, check_name
from services.storage.unreadable import Unreadable
from services.storage.users import User

Msg = TypeVar("Msg")
Ctx = grpc.aio.ServicerContext[Any, Any]
CHUNK_RECORDS = 1000
# The most record bytes in one streamed message (a bigger record goes alone): a stream
# holds about two messages in this process while its client reads (services/common/streams.py).
CHUNK_BYTES = 64 * 1024
LOG_BATCH = 500  # transactions in one log-read message, at most (and CHUNK_BYTES)
OPERATION_ACTIONS = {
    types_pb2.OPERATION_INSERT: INSERT,
    types_pb2.OPERATION_UPDATE: UPDATE,
    types_pb2.OPERATION_UPSERT: UPSERT,
    types_pb2.OPERATION_DELETE: DELETE,
}


def _ids(values: list[Any]) -> list[bytes]:
    return [jsonbytes.dumps(v) for v in values]


def table_info(engine: Engine, table: Table) -> pb.TableInfo:
    return pb.TableInfo(
        database=table.database,
        name=table.name,
        primary_key=table.primary_key,
        attributes=[
            pb.AttributeInfo(name=a, indexed=a == table.primary_key or a in table.indexed)
            for a in sorted(table.attributes)
        ],
        replicate=table.replicate,
        record_count=engine.counts.get(table.table_id, 0),
    )


def database_info(engine: Engine, db: Database, who: Identity | None = None) -> pb.DatabaseInfo:
    """A database with its tables (only those ``who`` may read, when given)."""
    return pb.DatabaseInfo(
        name=db.name,
        tables=[
            table_info(engine, t)
            for _, t in sorted(db.tables.items())
            if who is None or can(who, READ, db.name, t.name)
        ],
    )


def user_info(user: User) -> pb.User:
    return pb.User(username=user.name, role=user.role, active=user.active)


def role_info(name: str, permission: Permission) -> pb.Role:
    return pb.Role(name=name, permission=permission.json)


def _ms(value: timestamp_pb2.Timestamp, name: str) -> int:
    """A request's time in Unix milliseconds; INVALID_ARGUMENT when it is not a valid
    Timestamp (seconds from year 1 to 9999, nanos below a second)."""
    try:
        return int(value.ToMilliseconds())
    except ValueError as exc:
        raise InvalidArgument(f"{name} is not a valid time: {exc}") from None


def _time_range(
    start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp, has_start: bool, has_end: bool
) -> tuple[int, int | None]:
    lo = version_from_ms(_ms(start, "start_time")) if has_start else 0
    hi = version_from_ms(_ms(end, "end_time")) if has_end else None
    if hi is not None and hi < lo:
        raise InvalidArgument("end_time is before start_time")
    return lo, hi


async def _chunked(
    records: Iterator[bytes], make: Callable[[list[bytes]], Msg]
) -> AsyncIterator[Msg]:
    """Bounded response chunks, yielding to the event loop between them."""
    chunk: list[bytes] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record)
        if len(chunk) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
            yield make(chunk)
            chunk = []
            size = 0
            await asyncio.sleep(0)
    if chunk:
        yield make(chunk)


async def _log_batches(
    transactions: Iterator[types_pb2.Transaction],
) -> AsyncIterator[list[types_pb2.Transaction]]:
    """Log entries in messages of at most ``LOG_BATCH`` entries or ``CHUNK_BYTES``
    (one bigger entry goes alone), yielding to the event loop between them."""
    batch: list[types_pb2.Transaction] = []
    size = 0
    for txn in transactions:
        batch.append(txn)
        size += txn.ByteSize()
        if len(batch) >= LOG_BATCH or size >= CHUNK_BYTES:
            yield batch
            batch = []
            size = 0
            await asyncio.sleep(0)
    if batch:
        yield batch


def _replicate_to(request: Any) -> types_pb2.ReplicateTo | None:
    """A write request's ``replicate_to`` when given."""
    if not request.HasField("replicate_to"):
        return None
    value: types_pb2.ReplicateTo = request.replicate_to
    if not value.count and not value.nodes:
        return None
    return value


async def _chunked_async(
    docs: AsyncIterator[dict[str, Any]],
    attributes: list[str],
    make: Callable[[list[bytes]], Msg],
    unreadable: Unreadable,
) -> AsyncIterator[Msg]:
    """Bounded response chunks of projected records from an async source (records that
    cannot be serialized are left out and noted in ``unreadable``)."""
    chunk: list[bytes] = []
    size = 0
    async for doc in docs:
        record = unreadable.render(search.project(doc, attributes))
        if record is None:
            continue
        chunk.append(record)
        size += len(record)
        if len(chunk) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
            yield make(chunk)
            chunk = []
            size = 0
    if chunk:
        yield make(chunk)


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


def _sort(keys: Any) -> list[tuple[str, bool]]:
    out = []
    for k in keys:
        if not k.attribute:
            raise InvalidArgument("a sort key needs an attribute")
        out.append((k.attribute, k.descending))
    return out


CSV_DRAIN_BYTES = 64 * 1024 * 1024


async def _drain(iterator: AsyncIterator[pb.LoadCsvRequest], limit: int) -> None:
    """Consume and drop a client stream's remaining messages, up to ``limit`` bytes."""
    seen = 0
    with contextlib.suppress(Exception):
        async for message in iterator:
            seen += message.ByteSize()
            if seen > limit:
                return


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """gRPC handlers over one Engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.users = engine.users
        self.analytics = AnalyticsTables(engine)
        self.replicator = ReplicatorClient(engine.config, engine.node_secret)
        self.reads = ResidentReads(engine, self.replicator)
        self.residency = ResidencyWorker(engine, self.replicator)

    @staticmethod
    def _caller() -> Identity:
        return identity()

    def _internal(self) -> Identity:
        who = identity()
        if not who.internal:
            raise PermissionDenied("this RPC is reserved for the node's own services")
        return who

    # -- schema ----------------------------------------------------------------------

    async def CreateDatabase(
        self, request: pb.CreateDatabaseRequest, context: Ctx
    ) -> pb.CreateDatabaseResponse:
        who = self._caller()
        require_super_user(who, f"create database {request.database}")
        db = self.engine.create_database(request.database, who.internal)
        return pb.CreateDatabaseResponse(database=database_info(self.engine, db))

    async def DropDatabase(
        self, request: pb.DropDatabaseRequest, context: Ctx
    ) -> pb.DropDatabaseResponse:
        who = self._caller()
        require_super_user(who, f"drop database {request.database}")
        check_name("database", request.database)
        dropped = self.engine.drop_database(request.database, who.internal)
        return pb.DropDatabaseResponse(dropped_records=dropped)

    async def DescribeDatabase(
        self, request: pb.DescribeDatabaseRequest, context: Ctx
    ) -> pb.DescribeDatabaseResponse:
        who = self._caller()
        require_reads_in(who, request.database)
        db = self.engine.catalog.database(request.database)
        return pb.DescribeDatabaseResponse(database=database_info(self.engine, db, who))

    async def CreateTable(
        self, request: pb.CreateTableRequest, context: Ctx
    ) -> pb.CreateTableResponse:
        who = self._caller()
        require_super_user(who, f"create table {request.database}.{request.table}")
        replicate = request.replicate if request.HasField("replicate") else True
        table = self.engine.create_table(
            request.database,
            request.table,
            request.primary_key,
            list(request.indexed_attributes),
            replicate,
            who.name,
            who.internal,
        )
        return pb.CreateTableResponse(table=table_info(self.engine, table))

    async def DropTable(self, request: pb.DropTableRequest, context: Ctx) -> pb.DropTableResponse:
        who = self._caller()
        require_super_user(who, f"drop table {request.database}.{request.table}")
        dropped = self.engine.drop_table(request.database, request.table, who.internal)
        return pb.DropTableResponse(dropped_records=dropped)

    async def DescribeTable(
        self, request: pb.DescribeTableRequest, context: Ctx
    ) -> pb.DescribeTableResponse:
        require(self._caller(), READ, request.database, request.table)
        table = self.engine.catalog.table(request.database, request.table)
        return pb.DescribeTableResponse(table=table_info(self.engine, table))

    async def DescribeAll(
        self, request: pb.DescribeAllRequest, context: Ctx
    ) -> pb.DescribeAllResponse:
        who = self._caller()
        databases = sorted(
            (name, db)
            for name, db in self.engine.catalog.databases.items()
            if who.internal or name not in RESERVED_DATABASES
        )
        if who.super_user:
            return pb.DescribeAllResponse(
                databases=[database_info(self.engine, db) for _, db in databases]
            )
        infos = [database_info(self.engine, db, who) for _, db in databases]
        return pb.DescribeAllResponse(databases=[info for info in infos if info.tables])

    async def CreateAttribute(
        self, request: pb.CreateAttributeRequest, context: Ctx
    ) -> pb.CreateAttributeResponse:
        who = self._caller()
        require_super_user(
            who, f"create attribute {request.database}.{request.table}.{request.attribute}"
        )
        table, built = self.engine.create_attribute(
            request.database,
            request.table,
            request.attribute,
            request.indexed,
            who.name,
            who.internal,
        )
        return pb.CreateAttributeResponse(
            table=table_info(self.engine, table), indexed_records=built
        )

    async def DropAttribute(
        self, request: pb.DropAttributeRequest, context: Ctx
    ) -> pb.DropAttributeResponse:
        who = self._caller()
        require_super_user(
            who, f"drop attribute {request.database}.{request.table}.{request.attribute}"
        )
        updated = self.engine.drop_attribute(
            request.database, request.table, request.attribute, who.internal
        )
        return pb.DropAttributeResponse(updated_records=updated)

    # -- writes ----------------------------------------------------------------------

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
        who = self._caller()
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
            replicate_to=_replicate_to(request),
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
            replicate_to=_replicate_to(request),
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
            _replicate_to(request),
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
            replicate_to=_replicate_to(request),
        )
        return pb.DeleteResponse(
            deleted_ids=result.written, skipped_ids=result.skipped, version=version
        )

    async def Transact(self, request: pb.TransactRequest, context: Ctx) -> pb.TransactResponse:
        who = self._caller()
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
                try:
                    tables.append(self.engine.catalog.table(request.database, op.table))
                except InvalidArgument as exc:
                    raise InvalidArgument(f"operation {i}: {exc.message}") from exc

        def write(
            commit: Callable[[LocalTransaction], int],
        ) -> tuple[list[pb.TransactResult], int]:
            txn = self.engine.transaction(request.database, who.name, who.internal)
            txn.replicate_to(_replicate_to(request))
            results = []
            for i, op in enumerate(request.operations):
                try:
                    table = self.engine.catalog.table(request.database, op.table)
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
                except InvalidArgument as exc:
                    raise InvalidArgument(f"operation {i}: {exc.message}") from exc
                results.append(
                    pb.TransactResult(written_ids=result.written, skipped_ids=result.skipped)
                )
            return results, commit(txn)

        results, version = await self._confirmed(
            context, request.database, tables, request.replicated_confirmation, write
        )
        return pb.TransactResponse(results=results, version=version)

    # -- reads -------------------------------------------------------------------------

    async def SearchById(
        self, request: pb.SearchByIdRequest, context: Ctx
    ) -> AsyncIterator[pb.SearchByIdResponse]:
        require(self._caller(), READ, request.database, request.table)
        table = self.engine.catalog.table(request.database, request.table)
        encoded = [parse_id(raw, i)[1] for i, raw in enumerate(request.ids)]
        reader = search.Reader(self.engine, table)
        attributes = list(request.get_attributes)
        unreadable = reader.unreadable
        if self.engine.has_residents(table):
            docs = self.reads.by_ids(table, encoded, context.time_remaining())
            async for chunk in _chunked_async(
                docs, attributes, lambda c: pb.SearchByIdResponse(records=c), unreadable
            ):
                yield chunk
        else:
            render = unreadable.render
            records = (
                record
                for _, s in reader.by_ids(encoded)
                if (record := render(search.project(s.doc, attributes))) is not None
            )
            async for chunk in _chunked(records, lambda c: pb.SearchByIdResponse(records=c)):
                yield chunk
        unreadable.check()

    async def SearchByValue(
        self, request: pb.SearchByValueRequest, context: Ctx
    ) -> AsyncIterator[pb.SearchByValueResponse]:
        require(self._caller(), READ, request.database, request.table)
        table = self.engine.catalog.table(request.database, request.table)
        if not request.attribute:
            raise InvalidArgument("attribute is required")
        if not request.value:
            raise InvalidArgument('value is required (a JSON value; "*" matches every record)')
        try:
            value = jsoninput.loads(request.value, self.engine.config.storage.max_nesting_depth)
        except jsoninput.Refused as exc:
            raise InvalidArgument(f"value: {exc}") from None
        condition = search.value_condition(request.attribute, value)
        group = (
            condition if isinstance(condition, search.Group) else search.Group(False, (condition,))
        )
        async for chunk in self._search(
            table, group, request, context, lambda c: pb.SearchByValueResponse(records=c)
        ):
            yield chunk

    async def SearchByConditions(
        self, request: pb.SearchByConditionsRequest, context: Ctx
    ) -> AsyncIterator[pb.SearchByConditionsResponse]:
        require(self._caller(), READ, request.database, request.table)
        table = self.engine.catalog.table(request.database, request.table)
        group = search.parse_group(
            request.operator, request.conditions, self.engine.config.storage.max_nesting_depth
        )
        async for chunk in self._search(
            table, group, request, context, lambda c: pb.SearchByConditionsResponse(records=c)
        ):
            yield chunk

    async def _search(
        self,
        table: Table,
        group: search.Group,
        request: pb.SearchByValueRequest | pb.SearchByConditionsRequest,
        context: Ctx,
        make: Callable[[list[bytes]], Msg],
    ) -> AsyncIterator[Msg]:
        """Plan and run a search with the request's sort, offset, limit and projection.
        In a table with residents it runs on what this node holds (whole records and
        stubs, whose indexed attributes it matches), and the records held here only as
        stubs are then read from their residents. Records that cannot be returned are
        skipped, and named at the end (DATA_LOSS, see unreadable.py)."""
        sort = _sort(request.sort)
        reader = search.Reader(self.engine, table)
        source = reader.plan(group, sort)
        attributes = list(request.get_attributes)
        unreadable = reader.unreadable
        offset, limit = request.offset, request.limit
        if self.engine.has_residents(table):
            records = search.run(self.engine, source, group, sort, offset, limit, [], unreadable)
            docs = self.reads.whole(table, records, context.time_remaining())
            async for chunk in _chunked_async(docs, attributes, make, unreadable):
                yield chunk
        else:
            records = search.run(
                self.engine, source, group, sort, offset, limit, attributes, unreadable
            )
            async for chunk in _chunked(records, make):
                yield chunk
        unreadable.check()

    async def Rebalance(self, request: pb.RebalanceRequest, context: Ctx) -> pb.RebalanceResponse:
        who = self._caller()
        if not who.internal:
            self._administer("rebalance")
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
        who = self._caller()
        if not who.internal:
            self._administer("residency status")
        worker = self.residency
        return pb.ResidencyStatusResponse(
            repair=residency_progress(worker.repair),
            rebalance=residency_progress(worker.rebalance),
            gone=sorted(worker.gone),
        )

    # -- CSV -------------------------------------------------------------------------

    async def LoadCsv(
        self, request_iterator: AsyncIterator[pb.LoadCsvRequest], context: Ctx
    ) -> pb.LoadCsvResponse:
        iterator = aiter(request_iterator)
        try:
            return await self._load_csv(iterator)
        except ShoalError:
            # Read what the client is still sending (bounded), so that it sees this
            # refusal as the call's status rather than as a failed write.
            await _drain(iterator, CSV_DRAIN_BYTES)
            raise

    async def _load_csv(self, iterator: AsyncIterator[pb.LoadCsvRequest]) -> pb.LoadCsvResponse:
        who = self._caller()
        try:
            first = await anext(iterator)
        except StopAsyncIteration:
            raise InvalidArgument("the stream is empty: send a header first") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message must be the header")
        header = first.header
        operation = header.operation or types_pb2.OPERATION_INSERT
        if operation == types_pb2.OPERATION_DELETE or operation not in OPERATION_ACTIONS:
            raise InvalidArgument("operation must be INSERT, UPDATE or UPSERT")
        method = OPERATION_ACTIONS[operation]
        require(who, method, header.database, header.table)
        table = self.engine.catalog.table(header.database, header.table)
        depth = self.engine.config.storage.max_nesting_depth
        parser = csvload.CsvParser(max_depth=depth)
        response = pb.LoadCsvResponse()
        pending: list[tuple[int, bytes]] = []
        seen: set[bytes] = set()
        # Each batch is one transaction, so it must respect the per-request limit too.
        batch_rows = min(csvload.BATCH_ROWS, self.engine.config.storage.max_records_per_request)

        def flush() -> None:
            if not pending:
                return
            txn = self.engine.transaction(header.database, who.name, who.internal)
            result = getattr(txn, method)(table, [record for _, record in pending])
            txn.commit()
            response.written += len(result.written)
            response.skipped += len(result.skipped)
            pending.clear()
            seen.clear()

        def take(rows: Iterator[tuple[int, bytes]]) -> None:
            for line, record in rows:
                try:
                    encoded = commit.parse_record(record, table, line, depth)[2]
                except InvalidArgument as exc:
                    parser.row_failed(line, exc.message.split(": ", 1)[-1])
                    continue
                if encoded in seen:
                    flush()
                seen.add(encoded)
                pending.append((line, record))
                if len(pending) >= batch_rows:
                    flush()

        async for message in iterator:
            if message.WhichOneof("part") != "chunk":
                raise InvalidArgument("only one header is allowed, as the first message")
            take(parser.feed(message.chunk))
        take(parser.feed(b"", final=True))
        if parser.header is None:
            raise InvalidArgument("the CSV is empty: it needs a header row")
        if table.primary_key not in parser.header:
            raise InvalidArgument(f"the CSV has no {table.primary_key!r} column (the primary key)")
        flush()
        # Every data row read was written, skipped or failed (rows with the wrong number of
        # fields fail inside the parser and never reach ``take``).
        response.rows = response.written + response.skipped + parser.failed
        response.failed = parser.failed
        response.errors.extend(pb.RowError(line=i.line, message=i.message) for i in parser.issues)
        return response

    # -- logs --------------------------------------------------------------------------

    async def ReadTransactionLog(
        self, request: pb.ReadTransactionLogRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadTransactionLogResponse]:
        require_super_user(
            self._caller(), f"read the transaction log of database {request.database}"
        )
        self.engine.catalog.database(request.database)
        lo, hi = _time_range(
            request.start_time,
            request.end_time,
            request.HasField("start_time"),
            request.HasField("end_time"),
        )
        transactions = log.read_transactions(
            self.engine, request.database, request.table, lo, hi, request.limit
        )
        async for batch in _log_batches(transactions):
            yield pb.ReadTransactionLogResponse(transactions=batch)

    async def ReadAuditLog(
        self, request: pb.ReadAuditLogRequest, context: Ctx
    ) -> AsyncIterator[pb.ReadAuditLogResponse]:
        require_super_user(
            self._caller(), f"read the audit log of table {request.database}.{request.table}"
        )
        self.engine.catalog.table(request.database, request.table)
        lo, hi = _time_range(
            request.start_time,
            request.end_time,
            request.HasField("start_time"),
            request.HasField("end_time"),
        )
        encoded = [parse_id(raw, i)[1] for i, raw in enumerate(request.ids)]
        entries = log.read_audit(
            self.engine,
            request.database,
            request.table,
            encoded,
            set(request.users),
            lo,
            hi,
            request.limit,
        )
        async for batch in _log_batches(entries):
            yield pb.ReadAuditLogResponse(entries=batch)

    async def DeleteLogsBefore(
        self, request: pb.DeleteLogsBeforeRequest, context: Ctx
    ) -> pb.DeleteLogsBeforeResponse:
        require_super_user(self._caller(), "delete log entries")
        if request.database:
            self.engine.catalog.database(request.database)
        if not request.HasField("before"):
            raise InvalidArgument("before is required")
        ms = _ms(request.before, "before")
        if ms > self.engine.clock.physical_ms():
            raise InvalidArgument("before is in the future")
        entries, tombstones = log.purge_before(self.engine, version_from_ms(ms), request.database)
        return pb.DeleteLogsBeforeResponse(
            deleted_transactions=entries, purged_tombstones=tombstones
        )

    async def RevertTransaction(
        self, request: pb.RevertTransactionRequest, context: Ctx
    ) -> pb.RevertTransactionResponse:
        who = self._caller()
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

    # -- users and roles ---------------------------------------------------------------

    def _administer(self, what: str) -> None:
        require_super_user(self._caller(), what)

    async def AddUser(self, request: pb.AddUserRequest, context: Ctx) -> pb.AddUserResponse:
        self._administer("add users")
        active = request.active if request.HasField("active") else True
        user = await self.users.add_user(request.username, request.password, request.role, active)
        return pb.AddUserResponse(user=user_info(user))

    async def AlterUser(self, request: pb.AlterUserRequest, context: Ctx) -> pb.AlterUserResponse:
        self._administer("alter users")
        user = await self.users.alter_user(
            request.username,
            request.password if request.HasField("password") else None,
            request.role if request.HasField("role") else None,
            request.active if request.HasField("active") else None,
        )
        return pb.AlterUserResponse(user=user_info(user))

    async def DropUser(self, request: pb.DropUserRequest, context: Ctx) -> pb.DropUserResponse:
        self._administer("drop users")
        self.users.drop_user(request.username)
        return pb.DropUserResponse()

    async def ListUsers(self, request: pb.ListUsersRequest, context: Ctx) -> pb.ListUsersResponse:
        self._administer("list users")
        return pb.ListUsersResponse(users=[user_info(u) for u in self.users.users()])

    async def AddRole(self, request: pb.AddRoleRequest, context: Ctx) -> pb.AddRoleResponse:
        self._administer("add roles")
        permission = self.users.add_role(request.name, request.permission)
        return pb.AddRoleResponse(role=role_info(request.name, permission))

    async def AlterRole(self, request: pb.AlterRoleRequest, context: Ctx) -> pb.AlterRoleResponse:
        self._administer("alter roles")
        permission = self.users.alter_role(request.name, request.permission)
        return pb.AlterRoleResponse(role=role_info(request.name, permission))

    async def DropRole(self, request: pb.DropRoleRequest, context: Ctx) -> pb.DropRoleResponse:
        self._administer("drop roles")
        self.users.drop_role(request.name)
        return pb.DropRoleResponse()

    async def ListRoles(self, request: pb.ListRolesRequest, context: Ctx) -> pb.ListRolesResponse:
        self._administer("list roles")
        return pb.ListRolesResponse(roles=[role_info(n, p) for n, p in self.users.roles()])

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: Ctx
    ) -> pb.AuthenticateResponse:
        who = self._caller()
        user = who if isinstance(who, UserIdentity) else None
        return pb.AuthenticateResponse(
            username=who.name,
            role=user.role if user is not None else "",
            super_user=who.super_user,
            permission=(user.permission if user is not None else permission_of(who)).json,
            internal=who.internal,
        )
