"""Schema operations: databases, tables and attributes (storage's schema RPCs)."""

from __future__ import annotations

from shoal.storage.v1 import storage_pb2 as spb

from services.admin.operations.body import Body, Json
from services.admin.operations.execute import Execute, Replicable


def _table_json(table: spb.TableInfo) -> Json:
    return {
        "name": table.name,
        "schema": table.database,
        "database": table.database,
        "hash_attribute": table.primary_key,
        "attributes": [{"attribute": a.name, "indexed": a.indexed} for a in table.attributes],
        "record_count": table.record_count,
        "replicate": table.replicate,
    }


async def describe_all(ex: Execute, request: None) -> Json:
    reply = await ex.storage("DescribeAll", spb.DescribeAllRequest())
    return {db.name: {t.name: _table_json(t) for t in db.tables} for db in reply.databases}


def parse_describe_database(body: Body) -> spb.DescribeDatabaseRequest:
    return spb.DescribeDatabaseRequest(database=body.database())


async def describe_database(ex: Execute, request: spb.DescribeDatabaseRequest) -> Json:
    reply = await ex.storage("DescribeDatabase", request)
    return {t.name: _table_json(t) for t in reply.database.tables}


def parse_describe_table(body: Body) -> spb.DescribeTableRequest:
    return spb.DescribeTableRequest(database=body.database(), table=body.text("table"))


async def describe_table(ex: Execute, request: spb.DescribeTableRequest) -> Json:
    reply = await ex.storage("DescribeTable", request)
    return _table_json(reply.table)


def parse_create_database(body: Body) -> Replicable[spb.CreateDatabaseRequest]:
    replicated = body.flag("replicated", default=False)
    message = spb.CreateDatabaseRequest(database=body.text("database", "schema"))
    return Replicable(message, replicated, body)


async def create_database(ex: Execute, request: Replicable[spb.CreateDatabaseRequest]) -> Json:
    await ex.storage("CreateDatabase", request.message)
    result = {"message": f"database '{request.message.database}' successfully created"}
    return await ex.on_members(request.body, result) if request.replicated else result


def parse_drop_database(body: Body) -> Replicable[spb.DropDatabaseRequest]:
    replicated = body.flag("replicated", default=False)
    message = spb.DropDatabaseRequest(database=body.text("database", "schema"))
    return Replicable(message, replicated, body)


async def drop_database(ex: Execute, request: Replicable[spb.DropDatabaseRequest]) -> Json:
    await ex.storage("DropDatabase", request.message)
    result = {"message": f"successfully deleted database '{request.message.database}'"}
    return await ex.on_members(request.body, result) if request.replicated else result


def parse_create_table(body: Body) -> spb.CreateTableRequest:
    database, table = body.database(), body.text("table")
    indexed = [
        a["name"] if isinstance(a, dict) else a
        for a in body.array("attributes", required=False)
        if (isinstance(a, dict) and a.get("indexed")) or isinstance(a, str)
    ]
    request = spb.CreateTableRequest(
        database=database,
        table=table,
        primary_key=body.text("primary_key", "hash_attribute", required=False, default="id"),
        indexed_attributes=[i for i in indexed if isinstance(i, str)],
    )
    if "replicate" in body.data:
        request.replicate = body.flag("replicate", default=True)
    return request


async def create_table(ex: Execute, request: spb.CreateTableRequest) -> Json:
    await ex.storage("CreateTable", request)
    return {"message": f"table '{request.database}.{request.table}' successfully created."}


def parse_drop_table(body: Body) -> Replicable[spb.DropTableRequest]:
    replicated = body.flag("replicated", default=False)
    message = spb.DropTableRequest(database=body.database(), table=body.text("table"))
    return Replicable(message, replicated, body)


async def drop_table(ex: Execute, request: Replicable[spb.DropTableRequest]) -> Json:
    await ex.storage("DropTable", request.message)
    database, table = request.message.database, request.message.table
    result = {"message": f"successfully deleted table '{database}.{table}'"}
    return await ex.on_members(request.body, result) if request.replicated else result


def parse_create_attribute(body: Body) -> spb.CreateAttributeRequest:
    return spb.CreateAttributeRequest(
        database=body.database(),
        table=body.text("table"),
        attribute=body.text("attribute"),
        indexed=body.flag("indexed", default=False),
    )


async def create_attribute(ex: Execute, request: spb.CreateAttributeRequest) -> Json:
    await ex.storage("CreateAttribute", request)
    name = f"{request.database}.{request.table}.{request.attribute}"
    return {"message": f"attribute '{name}' successfully created."}


def parse_drop_attribute(body: Body) -> Replicable[spb.DropAttributeRequest]:
    replicated = body.flag("replicated", default=False)
    message = spb.DropAttributeRequest(
        database=body.database(), table=body.text("table"), attribute=body.text("attribute")
    )
    return Replicable(message, replicated, body)


async def drop_attribute(ex: Execute, request: Replicable[spb.DropAttributeRequest]) -> Json:
    await ex.storage("DropAttribute", request.message)
    result = {"message": f"successfully deleted attribute '{request.message.attribute}'"}
    return await ex.on_members(request.body, result) if request.replicated else result
