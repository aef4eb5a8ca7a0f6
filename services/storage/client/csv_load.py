"""StorageService handler of LoadCsv: a client stream of CSV, written in batches."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.common.errors import InvalidArgument, ShoalError
from services.storage import csvload
from services.storage.client.base import ClientHandlers
from services.storage.permissions import require
from services.storage.rpc import OPERATION_ACTIONS, Ctx, caller
from services.storage.transaction import parse_record

CSV_DRAIN_BYTES = 64 * 1024 * 1024


async def _drain(iterator: AsyncIterator[pb.LoadCsvRequest], limit: int) -> None:
    """Consume and drop a client stream's remaining messages, up to ``limit`` bytes."""
    seen = 0
    with contextlib.suppress(Exception):
        async for message in iterator:
            seen += message.ByteSize()
            if seen > limit:
                return


class CsvHandlers(ClientHandlers):
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
        who = caller()
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

        # Rows of an insert or upsert without the primary key get a generated one.
        generate = operation != types_pb2.OPERATION_UPDATE

        def take(rows: Iterator[tuple[int, bytes]]) -> None:
            for line, record in rows:
                try:
                    _, _, encoded, raw = parse_record(record, table, line, depth, generate)
                except InvalidArgument as exc:
                    message = exc.message
                    if exc.reason != "ATTRIBUTE_TYPE":
                        message = message.split(": ", 1)[-1]
                    parser.row_failed(line, message)
                    continue
                if encoded in seen:
                    flush()
                seen.add(encoded)
                pending.append((line, raw))
                if len(pending) >= batch_rows:
                    flush()

        async for message in iterator:
            if message.WhichOneof("part") != "chunk":
                raise InvalidArgument("only one header is allowed, as the first message")
            take(parser.feed(message.chunk))
        take(parser.feed(b"", final=True))
        if parser.header is None:
            raise InvalidArgument("the CSV is empty: it needs a header row")
        if table.primary_key not in parser.header and not generate:
            raise InvalidArgument(f"the CSV has no {table.primary_key!r} column (the primary key)")
        flush()
        # Every data row read was written, skipped or failed (rows with the wrong number of
        # fields fail inside the parser and never reach ``take``).
        response.rows = response.written + response.skipped + parser.failed
        response.failed = parser.failed
        response.errors.extend(pb.RowError(line=i.line, message=i.message) for i in parser.issues)
        return response
