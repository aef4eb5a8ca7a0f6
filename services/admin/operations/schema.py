"""Schema operations: databases, tables and attributes (storage's schema RPCs)."""

from __future__ import annotations

from typing import Any

from shoal.storage.v1 import storage_pb2 as spb

from services.admin.operations.body import Body, Json, harper_time
from services.admin.operations.execute import Execute, Replicable
from services.common.errors import InvalidArgument

# Harper's record timestamps (storage assigns them, services/storage/assigned.py).
TIMESTAMP_ATTRIBUTES = ("__createdtime__", "__updatedtime__")


def _attribute_json(attribute: spb.AttributeInfo) -> Json:
    """Harper's attribute: ``is_primary_key`` and ``type`` only where they apply."""
    out: dict[str, Any] = {"attribute": attribute.name, "indexed": attribute.indexed}
    if attribute.is_primary_key:
        out["is_primary_key"] = True
    if attribute.type:
        out["type"] = attribute.type
    return out


def _table_json(table: spb.TableInfo) -> Json:
    """Harper's table description (Shoal adds ``database`` and ``replicate``). Attributes
    list the primary key first, then the timestamps, then the others by name."""
    order = {table.primary_key: 0, **{a: 1 for a in TIMESTAMP_ATTRIBUTES}}
    attributes = sorted(table.attributes, key=lambda a: (order.get(a.name, 2), a.name))
    return {
        "schema": table.database,
        "name": table.name,
        "hash_attribute": table.primary_key,
        "audit": True,
        "schema_defined": table.schema_defined,
        "attributes": [_attribute_json(a) for a in attributes],
        "sources": [],
        "record_count": table.record_count,
        "table_size": table.table_size,
        "db_size": table.database_size,
        "db_audit_size": table.database_audit_size,
        "last_updated_record": harper_time(table.last_updated),
        "database": table.database,
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


def _definition(item: Any, operation: str) -> spb.AttributeDefinition:
    """One of Harper's declared attributes: ``{name, type, indexed}``."""
    name, kind = item.get("name"), item.get("type", "")
    if not isinstance(name, str) or not isinstance(kind, str):
        raise InvalidArgument(
            f"{operation}: each attribute needs a 'name' (a string) and may have a 'type'"
            " (a string) and 'indexed' (true or false)"
        )
    return spb.AttributeDefinition(name=name, type=kind, indexed=bool(item.get("indexed")))


def parse_create_table(body: Body) -> spb.CreateTableRequest:
    """Harper's create_table. Declared attributes (objects) make the table
    ``schema_defined``; a dynamic table (none declared) has Harper's record timestamps,
    a declared one has them when it declares ``__createdtime__`` or ``__updatedtime__``.
    A plain string in ``attributes`` names an attribute to index (Shoal's older form)."""
    database, table = body.database(), body.text("table")
    items = body.array("attributes", required=False)
    definitions = [_definition(a, body.operation) for a in items if isinstance(a, dict)]
    indexed = [a for a in items if isinstance(a, str)]
    if len(definitions) + len(indexed) != len(items):
        raise InvalidArgument(f"{body.operation}: 'attributes' must be an array of objects")
    schema_defined = bool(definitions)
    stamped = any(d.name in TIMESTAMP_ATTRIBUTES for d in definitions)
    request = spb.CreateTableRequest(
        database=database,
        table=table,
        primary_key=body.text("primary_key", "hash_attribute", required=False, default="id"),
        indexed_attributes=indexed,
        attributes=definitions,
        schema_defined=schema_defined,
        record_timestamps=stamped or not schema_defined,
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
