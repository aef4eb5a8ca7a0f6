"""Databases, tables and attributes through the real storage service."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.harness.client import StorageClient, error_info, expect_error
from tests.harness.node import Node

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_NAMES = ["", "-dash", "has space", "dot.ted", "sl/ash", "ü", "x" * 251]


def attributes(info: pb.TableInfo) -> dict[str, bool]:
    return {a.name: a.indexed for a in info.attributes}


def test_create_describe_and_drop_database(client: StorageClient) -> None:
    created = client.call("CreateDatabase", pb.CreateDatabaseRequest(database="dev")).database
    assert created.name == "dev"
    assert list(created.tables) == []
    described = client.call("DescribeDatabase", pb.DescribeDatabaseRequest(database="dev"))
    assert described.database.name == "dev"
    assert list(described.database.tables) == []

    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": 1}, {"id": 2}, {"id": 3}])
    dropped = client.call("DropDatabase", pb.DropDatabaseRequest(database="dev"))
    assert dropped.dropped_records == 3
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: client.call("DescribeDatabase", pb.DescribeDatabaseRequest(database="dev")),
        "dev",
        "does not exist",
    )
    everything = client.call("DescribeAll", pb.DescribeAllRequest())
    assert [d.name for d in everything.databases] == []
    # The name is free again, and the new database starts empty.
    client.create_table("dev", "dog")
    assert client.all_records("dev", "dog") == []
    assert client.describe("dev", "dog").record_count == 0


def test_create_table_defaults_and_options(client: StorageClient) -> None:
    dog = client.create_table("dev", "dog")
    assert dog.database == "dev"
    assert dog.name == "dog"
    assert dog.primary_key == "id"
    assert dog.replicate is True
    assert attributes(dog) == {"id": True}
    assert dog.record_count == 0

    cat = client.create_table(
        "dev", "cat", primary_key="cat_id", indexed=["owner", "age"], replicate=False
    )
    assert cat.primary_key == "cat_id"
    assert cat.replicate is False
    assert attributes(cat) == {"age": True, "cat_id": True, "owner": True}
    assert [a.name for a in cat.attributes] == ["age", "cat_id", "owner"]

    # The custom primary key is what records must carry (an insert generates a missing
    # one, an update must name it).
    reply = client.insert("dev", "cat", [{"cat_id": "tom", "owner": "ann"}])
    assert list(reply.inserted_ids) == [b'"tom"']
    assert client.get("dev", "cat", ["tom"]) == [{"cat_id": "tom", "owner": "ann"}]
    expect_error(
        INVALID, lambda: client.update("dev", "cat", [{"id": "tom"}]), "primary key", "cat_id"
    )

    # The database was created by CreateTable.
    db = client.call("DescribeDatabase", pb.DescribeDatabaseRequest(database="dev")).database
    assert [t.name for t in db.tables] == ["cat", "dog"]
    described = client.describe("dev", "cat")
    assert (described.primary_key, described.replicate, described.record_count) == (
        "cat_id",
        False,
        1,
    )
    assert attributes(described) == {"age": True, "cat_id": True, "owner": True}


def test_describe_all_lists_every_database_and_table(client: StorageClient) -> None:
    client.create_table("zoo", "lion")
    client.create_table("app", "user", primary_key="email")
    client.create_table("app", "item")
    client.call("CreateDatabase", pb.CreateDatabaseRequest(database="empty"))
    client.insert("app", "item", [{"id": 1}, {"id": 2}])
    reply = client.call("DescribeAll", pb.DescribeAllRequest())
    shape = {
        d.name: {t.name: (t.primary_key, t.record_count) for t in d.tables} for d in reply.databases
    }
    assert shape == {
        "app": {"item": ("id", 2), "user": ("email", 0)},
        "empty": {},
        "zoo": {"lion": ("id", 0)},
    }
    assert [d.name for d in reply.databases] == ["app", "empty", "zoo"]
    assert [t.name for t in reply.databases[0].tables] == ["item", "user"]


def test_names_are_validated(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    good = ["a", "A_b$c-d", "0starts_with_digit", "_", "$", "x" * 250]
    for name in good:
        assert client.create_table("dev", name).name == name
    for name in BAD_NAMES:
        client.expect(
            INVALID, "CreateDatabase", pb.CreateDatabaseRequest(database=name), "database name"
        )
        client.expect(
            INVALID, "CreateTable", pb.CreateTableRequest(database="dev", table=name), "table name"
        )
        client.expect(
            INVALID, "CreateTable", pb.CreateTableRequest(database=name, table="t"), "database name"
        )
        client.expect(
            INVALID,
            "CreateTable",
            pb.CreateTableRequest(database="dev", table="pk_test", primary_key=name or "-"),
            "primary key",
        )
        client.expect(
            INVALID,
            "CreateTable",
            pb.CreateTableRequest(database="dev", table="idx_test", indexed_attributes=[name]),
            "attribute name",
        )
        client.expect(
            INVALID,
            "CreateAttribute",
            pb.CreateAttributeRequest(database="dev", table="dog", attribute=name),
            "attribute name",
        )
        client.expect(
            INVALID,
            "DescribeTable",
            pb.DescribeTableRequest(database="dev", table=name),
            "table name",
        )
        client.expect(
            INVALID, "DropDatabase", pb.DropDatabaseRequest(database=name), "database name"
        )
    # Nothing of the failed requests exists.
    reply = client.call("DescribeAll", pb.DescribeAllRequest())
    assert [d.name for d in reply.databases] == ["dev"]
    assert sorted(t.name for t in reply.databases[0].tables) == sorted(["dog", *good])
    assert attributes(client.describe("dev", "dog")) == {"id": True}


def test_duplicates_are_already_exists(client: StorageClient) -> None:
    client.create_table("dev", "dog", indexed=["breed"])
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: client.call("CreateDatabase", pb.CreateDatabaseRequest(database="dev")),
        "dev",
        "already exists",
    )
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: client.create_table("dev", "dog", primary_key="other"),
        "dev.dog",
        "already exists",
    )
    # The failed CreateTable changed nothing.
    assert client.describe("dev", "dog").primary_key == "id"

    for attribute, indexed in [("breed", False), ("breed", True), ("id", True), ("id", False)]:
        client.expect(
            grpc.StatusCode.ALREADY_EXISTS,
            "CreateAttribute",
            pb.CreateAttributeRequest(
                database="dev", table="dog", attribute=attribute, indexed=indexed
            ),
            attribute,
            "already exists",
        )
    client.call(
        "CreateAttribute", pb.CreateAttributeRequest(database="dev", table="dog", attribute="age")
    )
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        lambda: client.call(
            "CreateAttribute",
            pb.CreateAttributeRequest(database="dev", table="dog", attribute="age"),
        ),
        "age",
        "already exists",
    )


def test_missing_things_are_not_found(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    not_found = grpc.StatusCode.NOT_FOUND
    calls: dict[str, list[tuple[str, Any]]] = {
        "Database 'nope'": [
            ("DescribeDatabase", pb.DescribeDatabaseRequest(database="nope")),
            ("DropDatabase", pb.DropDatabaseRequest(database="nope")),
            ("DescribeTable", pb.DescribeTableRequest(database="nope", table="dog")),
            ("DropTable", pb.DropTableRequest(database="nope", table="dog")),
            (
                "CreateAttribute",
                pb.CreateAttributeRequest(database="nope", table="dog", attribute="a"),
            ),
            ("DropAttribute", pb.DropAttributeRequest(database="nope", table="dog", attribute="a")),
        ],
        "dev.cat": [
            ("DescribeTable", pb.DescribeTableRequest(database="dev", table="cat")),
            ("DropTable", pb.DropTableRequest(database="dev", table="cat")),
            (
                "CreateAttribute",
                pb.CreateAttributeRequest(database="dev", table="cat", attribute="a"),
            ),
            ("DropAttribute", pb.DropAttributeRequest(database="dev", table="cat", attribute="a")),
        ],
        "dev.dog.age": [
            (
                "DropAttribute",
                pb.DropAttributeRequest(database="dev", table="dog", attribute="age"),
            ),
        ],
    }
    for words, requests in calls.items():
        for method, request in requests:
            error = client.expect(not_found, method, request, words, "does not exist")
            info = error_info(error)
            assert info is not None
            assert info.domain == "shoal"
    info = error_info(
        expect_error(
            not_found,
            lambda: client.call(
                "DescribeTable", pb.DescribeTableRequest(database="dev", table="cat")
            ),
        )
    )
    assert info.reason == "TABLE_NOT_FOUND"
    info = error_info(
        expect_error(
            not_found,
            lambda: client.call("DescribeDatabase", pb.DescribeDatabaseRequest(database="x")),
        )
    )
    assert info.reason == "DATABASE_NOT_FOUND"


def test_drop_table_removes_records_and_indexes(client: StorageClient) -> None:
    client.create_table("dev", "dog", indexed=["breed"])
    client.create_table("dev", "cat")
    client.insert("dev", "dog", [{"id": i, "breed": "pug"} for i in range(5)])
    client.insert("dev", "cat", [{"id": 1, "breed": "pug"}])
    reply = client.call("DropTable", pb.DropTableRequest(database="dev", table="dog"))
    assert reply.dropped_records == 5
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: client.describe("dev", "dog"),
        "dev.dog",
        "does not exist",
    )
    expect_error(grpc.StatusCode.NOT_FOUND, lambda: client.get("dev", "dog", [1]), "dev.dog")
    # Re-created under the same name, the table is empty: no old records, no old index entries.
    client.create_table("dev", "dog", indexed=["breed"])
    assert client.all_records("dev", "dog") == []
    assert client.by_value("dev", "dog", "breed", "pug") == []
    assert client.by_value("dev", "dog", "id", 1) == []
    assert client.describe("dev", "dog").record_count == 0
    # The other table is untouched.
    assert client.get("dev", "cat", [1]) == [{"id": 1, "breed": "pug"}]


def test_create_attribute_plain_and_indexed(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    records = [
        {"id": 1, "name": "Penny", "breed": "pug", "tags": ["small", "loud"]},
        {"id": 2, "name": "Kato", "breed": "lab", "tags": ["big"]},
        {"id": 3, "name": "Rex", "breed": "pug"},
        {"id": 4, "name": "Nobreed"},
    ]
    client.insert("dev", "dog", records)
    client.delete("dev", "dog", [3])
    # Dynamic attributes were discovered, none indexed.
    assert attributes(client.describe("dev", "dog")) == {
        "breed": False,
        "id": True,
        "name": False,
        "tags": False,
    }

    plain = client.call(
        "CreateAttribute",
        pb.CreateAttributeRequest(database="dev", table="dog", attribute="weight"),
    )
    assert plain.indexed_records == 0
    assert attributes(plain.table)["weight"] is False

    indexed = client.call(
        "CreateAttribute",
        pb.CreateAttributeRequest(database="dev", table="dog", attribute="breed", indexed=True),
    )
    # Built over the two visible records holding the attribute (not the deleted one).
    assert indexed.indexed_records == 2
    assert attributes(indexed.table)["breed"] is True
    assert attributes(client.describe("dev", "dog"))["breed"] is True
    # The index finds the old records, and keeps up with new writes.
    assert client.by_value("dev", "dog", "breed", "pug") == [records[0]]
    assert client.by_value("dev", "dog", "breed", "l*") == [records[1]]
    client.update("dev", "dog", [{"id": 2, "breed": "pug"}])
    client.insert("dev", "dog", [{"id": 5, "breed": "pug"}])
    assert [r["id"] for r in client.by_value("dev", "dog", "breed", "pug")] == [1, 2, 5]
    assert client.by_value("dev", "dog", "breed", "lab") == []

    # An array attribute is indexed per element.
    tags = client.call(
        "CreateAttribute",
        pb.CreateAttributeRequest(database="dev", table="dog", attribute="tags", indexed=True),
    )
    assert tags.indexed_records == 2
    assert [r["id"] for r in client.by_value("dev", "dog", "tags", "loud")] == [1]

    # A new attribute declared indexed gets an (empty) index that later writes fill.
    colour = client.call(
        "CreateAttribute",
        pb.CreateAttributeRequest(database="dev", table="dog", attribute="colour", indexed=True),
    )
    assert colour.indexed_records == 0
    client.update("dev", "dog", [{"id": 4, "colour": "brown"}])
    assert [r["id"] for r in client.by_value("dev", "dog", "colour", "brown")] == [4]


def test_drop_attribute_removes_it_everywhere(client: StorageClient) -> None:
    client.create_table("dev", "dog", indexed=["breed"])
    client.insert(
        "dev",
        "dog",
        [
            {"id": 1, "breed": "pug", "age": 3},
            {"id": 2, "breed": "lab"},
            {"id": 3, "age": 5},
        ],
    )
    reply = client.call(
        "DropAttribute", pb.DropAttributeRequest(database="dev", table="dog", attribute="breed")
    )
    assert reply.updated_records == 2
    assert client.all_records("dev", "dog") == [{"id": 1, "age": 3}, {"id": 2}, {"id": 3, "age": 5}]
    assert attributes(client.describe("dev", "dog")) == {"age": False, "id": True}
    assert client.by_value("dev", "dog", "breed", "pug") == []
    assert client.describe("dev", "dog").record_count == 3

    reply = client.call(
        "DropAttribute", pb.DropAttributeRequest(database="dev", table="dog", attribute="age")
    )
    assert reply.updated_records == 2
    assert client.all_records("dev", "dog") == [{"id": 1}, {"id": 2}, {"id": 3}]

    # The primary key cannot be dropped, and the failed request changes nothing.
    error = expect_error(
        INVALID,
        lambda: client.call(
            "DropAttribute", pb.DropAttributeRequest(database="dev", table="dog", attribute="id")
        ),
        "primary key",
    )
    info = error_info(error)
    assert info.domain == "shoal"
    assert info.reason == "INVALID_ARGUMENT"
    assert client.all_records("dev", "dog") == [{"id": 1}, {"id": 2}, {"id": 3}]
    # Writing the attribute again brings it back (dynamic attributes).
    client.update("dev", "dog", [{"id": 1, "breed": "pug"}])
    assert attributes(client.describe("dev", "dog")) == {"breed": False, "id": True}


def test_system_database_is_reserved_for_users(client: StorageClient, node: Node) -> None:
    denied = grpc.StatusCode.PERMISSION_DENIED
    for call in [
        lambda: client.call("CreateDatabase", pb.CreateDatabaseRequest(database="system")),
        lambda: client.create_table("system", "users"),
        lambda: client.call("DropDatabase", pb.DropDatabaseRequest(database="system")),
    ]:
        error = expect_error(denied, call, "system", "reserved")
        info = error_info(error)
        assert info.domain == "shoal"
        assert info.reason == "PERMISSION_DENIED"
    # DescribeAll lists it only for the node's own services; super users read its tables.
    reply = client.call("DescribeAll", pb.DescribeAllRequest())
    assert [d.name for d in reply.databases] == []
    internal = node.internal_client()
    reply = internal.call("DescribeAll", pb.DescribeAllRequest())
    [system] = [d for d in reply.databases if d.name == "system"]
    assert sorted(t.name for t in system.tables) == [
        "hdb_analytics",
        "hdb_certificate",
        "hdb_nodes",
        "hdb_raw_analytics",
    ]
    assert client.describe("system", "hdb_nodes").primary_key == "name"
    # The node's own services may write it.
    table = internal.create_table("system", "custom")
    assert table.database == "system"
    expect_error(denied, lambda: client.insert("system", "custom", [{"id": 1}]), "system")
    expect_error(
        denied,
        lambda: client.call("DropTable", pb.DropTableRequest(database="system", table="custom")),
        "system",
    )
    internal.insert("system", "custom", [{"id": 1}])
    assert internal.get("system", "custom", [1]) == [{"id": 1}]


@pytest.mark.parametrize("name", ["dev", "D_$-9"])
def test_error_details_carry_error_info(client: StorageClient, name: str) -> None:
    client.create_table(name, "dog")
    error = expect_error(
        grpc.StatusCode.ALREADY_EXISTS, lambda: client.create_table(name, "dog"), "already exists"
    )
    info = error_info(error)
    assert info is not None
    assert info.domain == "shoal"
    assert info.reason == "ALREADY_EXISTS"
    error = expect_error(INVALID, lambda: client.create_table(name, "bad name"), "table name")
    info = error_info(error)
    assert (info.domain, info.reason) == ("shoal", "INVALID_ARGUMENT")


def test_schema_survives_a_restart(node: Node, client: StorageClient) -> None:
    client.create_table("dev", "dog", primary_key="name", indexed=["breed"], replicate=False)
    client.insert("dev", "dog", [{"name": "Penny", "breed": "pug", "age": 3}])
    before = client.call("DescribeAll", pb.DescribeAllRequest())
    node.restart("storage")
    after = node.client().call("DescribeAll", pb.DescribeAllRequest())
    for described in (before, after):  # sizes are RocksDB's estimates: a restart moves them
        for table in described.databases[0].tables:
            table.table_size = table.database_size = table.database_audit_size = 0
    assert after == before
    assert node.client().by_value("dev", "dog", "breed", "pug") == [
        {"name": "Penny", "breed": "pug", "age": 3}
    ]
