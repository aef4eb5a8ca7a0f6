"""StorageService handlers of reads: SearchById, SearchByValue, SearchByConditions,
streamed in bounded messages; records held here only as stubs are read from their
residents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from shoal.storage.v1 import storage_pb2 as pb

from services.common import jsoninput
from services.common.errors import InvalidArgument
from services.storage import search
from services.storage.client.base import ClientHandlers
from services.storage.permissions import READ, require
from services.storage.rpc import (
    Ctx,
    Msg,
    caller,
    chunked,
    chunked_async,
    encoded_ids,
    sort_keys,
)
from services.storage.schema import Table


class SearchHandlers(ClientHandlers):
    async def SearchById(
        self, request: pb.SearchByIdRequest, context: Ctx
    ) -> AsyncIterator[pb.SearchByIdResponse]:
        require(caller(), READ, request.database, request.table)
        table = self.engine.catalog.table(request.database, request.table)
        encoded = encoded_ids(request.ids)
        reader = search.Reader(self.engine, table)
        attributes = search.requested(request.get_attributes, table)
        unreadable = reader.unreadable
        if self.engine.has_residents(table):
            docs = self.reads.by_ids(table, encoded, context.time_remaining())
            async for chunk in chunked_async(
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
            async for chunk in chunked(records, lambda c: pb.SearchByIdResponse(records=c)):
                yield chunk
        unreadable.check()

    async def SearchByValue(
        self, request: pb.SearchByValueRequest, context: Ctx
    ) -> AsyncIterator[pb.SearchByValueResponse]:
        require(caller(), READ, request.database, request.table)
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
        require(caller(), READ, request.database, request.table)
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
        sort = sort_keys(request.sort)
        reader = search.Reader(self.engine, table)
        source = reader.plan(group, sort)
        attributes = search.requested(request.get_attributes, table)
        unreadable = reader.unreadable
        offset, limit = request.offset, request.limit
        if self.engine.has_residents(table):
            records = search.run(self.engine, source, group, sort, offset, limit, [], unreadable)
            docs = self.reads.whole(table, records, context.time_remaining())
            async for chunk in chunked_async(docs, attributes, make, unreadable):
                yield chunk
        else:
            records = search.run(
                self.engine, source, group, sort, offset, limit, attributes, unreadable
            )
            async for chunk in chunked(records, make):
                yield chunk
        unreadable.check()
