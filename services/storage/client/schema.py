"""StorageService handlers of the schema: databases, tables and attributes."""

from __future__ import annotations

from shoal.storage.v1 import storage_pb2 as pb

from services.common.auth import Identity
from services.storage.client.base import ClientHandlers
from services.storage.engine import RESERVED_DATABASES, Engine
from services.storage.permissions import READ, can, require, require_reads_in, require_structure
from services.storage.rpc import Ctx, caller
from services.storage.schema import Database, Table, check_name
from services.storage.sizes import Sizes


def table_info(engine: Engine, table: Table, sizes: Sizes | None = None) -> pb.TableInfo:
    """A table as the describe RPCs show it (``sizes``: read once per answer)."""
    sizes = sizes or Sizes.read(engine.store, engine.counts)
    records = engine.counts.get(table.table_id, 0)
    db = engine.catalog.databases.get(table.database)
    db_records = sum(engine.counts.get(t.table_id, 0) for t in db.tables.values()) if db else 0
    return pb.TableInfo(
        database=table.database,
        name=table.name,
        primary_key=table.primary_key,
        attributes=[
            pb.AttributeInfo(
                name=a,
                indexed=a == table.primary_key or a in table.indexed,
                type=table.types.get(a, ""),
                is_primary_key=a == table.primary_key,
            )
            for a in sorted(table.attributes)
        ],
        replicate=table.replicate,
        record_count=records,
        schema_defined=table.schema_defined,
        record_timestamps=table.timestamps,
        table_size=sizes.of_records(records),
        database_size=sizes.of_records(db_records),
        database_audit_size=sizes.of_audit(db_records),
        last_updated=engine.updated.get(table.table_id, 0),
    )


def database_info(engine: Engine, db: Database, who: Identity | None = None) -> pb.DatabaseInfo:
    """A database with its tables (only those ``who`` may read, when given)."""
    sizes = Sizes.read(engine.store, engine.counts)
    return pb.DatabaseInfo(
        name=db.name,
        tables=[
            table_info(engine, t, sizes)
            for _, t in sorted(db.tables.items())
            if who is None or can(who, READ, db.name, t.name)
        ],
    )


class SchemaHandlers(ClientHandlers):
    async def CreateDatabase(
        self, request: pb.CreateDatabaseRequest, context: Ctx
    ) -> pb.CreateDatabaseResponse:
        who = caller()
        require_structure(who, request.database, f"create database {request.database}")
        db = self.engine.create_database(request.database, who.internal)
        return pb.CreateDatabaseResponse(database=database_info(self.engine, db))

    async def DropDatabase(
        self, request: pb.DropDatabaseRequest, context: Ctx
    ) -> pb.DropDatabaseResponse:
        who = caller()
        require_structure(who, request.database, f"drop database {request.database}")
        check_name("database", request.database)
        dropped = self.engine.drop_database(request.database, who.internal)
        return pb.DropDatabaseResponse(dropped_records=dropped)

    async def DescribeDatabase(
        self, request: pb.DescribeDatabaseRequest, context: Ctx
    ) -> pb.DescribeDatabaseResponse:
        who = caller()
        require_reads_in(who, request.database)
        db = self.engine.catalog.database(request.database)
        return pb.DescribeDatabaseResponse(database=database_info(self.engine, db, who))

    async def CreateTable(
        self, request: pb.CreateTableRequest, context: Ctx
    ) -> pb.CreateTableResponse:
        who = caller()
        require_structure(who, request.database, f"create table {request.database}.{request.table}")
        replicate = request.replicate if request.HasField("replicate") else True
        table = self.engine.create_table(
            request.database,
            request.table,
            request.primary_key,
            [*request.indexed_attributes, *(a.name for a in request.attributes if a.indexed)],
            replicate,
            who.name,
            who.internal,
            types={a.name: a.type for a in request.attributes},
            schema_defined=request.schema_defined,
            timestamps=request.record_timestamps,
        )
        return pb.CreateTableResponse(table=table_info(self.engine, table))

    async def DropTable(self, request: pb.DropTableRequest, context: Ctx) -> pb.DropTableResponse:
        who = caller()
        require_structure(who, request.database, f"drop table {request.database}.{request.table}")
        dropped = self.engine.drop_table(request.database, request.table, who.internal)
        return pb.DropTableResponse(dropped_records=dropped)

    async def DescribeTable(
        self, request: pb.DescribeTableRequest, context: Ctx
    ) -> pb.DescribeTableResponse:
        require(caller(), READ, request.database, request.table)
        table = self.engine.catalog.table(request.database, request.table)
        return pb.DescribeTableResponse(table=table_info(self.engine, table))

    async def DescribeAll(
        self, request: pb.DescribeAllRequest, context: Ctx
    ) -> pb.DescribeAllResponse:
        who = caller()
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
        who = caller()
        require_structure(
            who,
            request.database,
            f"create attribute {request.database}.{request.table}.{request.attribute}",
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
        who = caller()
        require_structure(
            who,
            request.database,
            f"drop attribute {request.database}.{request.table}.{request.attribute}",
        )
        updated = self.engine.drop_attribute(
            request.database, request.table, request.attribute, who.internal
        )
        return pb.DropAttributeResponse(updated_records=updated)
