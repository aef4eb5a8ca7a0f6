"""Insert, update, upsert and delete through the real storage service."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import orjson
import pytest
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.client import StorageClient, error_info, ids, loads
from tests.harness.node import Node

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def state(client: StorageClient, database: str = "dev", table: str = "dog") -> Any:
    """Everything a failed request must leave unchanged: records, schema, count, log."""
    info = client.describe(database, table)
    return (
        client.all_records(database, table),
        [(a.name, a.indexed) for a in info.attributes],
        info.record_count,
        len(client.transactions(database)),
    )


@pytest.fixture
def dogs(client: StorageClient) -> StorageClient:
    client.create_table("dev", "dog", indexed=["breed"])
    client.insert(
        "dev",
        "dog",
        [
            {"id": 1, "name": "Penny", "breed": "pug", "age": 3},
            {"id": 2, "name": "Kato", "breed": "lab", "age": 5},
        ],
    )
    return client


def test_insert_skips_existing_keys(dogs: StorageClient) -> None:
    reply = dogs.insert(
        "dev",
        "dog",
        [
            {"id": 3, "name": "Rex"},
            {"id": 1, "name": "Impostor"},
            {"id": "a", "name": "Stringy"},
            {"id": 2.0, "name": "Float two"},
        ],
    )
    assert loads(reply.inserted_ids) == [3, "a"]
    assert loads(reply.skipped_ids) == [1, 2.0]
    assert reply.version > 0
    assert dogs.get("dev", "dog", [1, 2, 3, "a"]) == [
        {"id": 1, "name": "Penny", "breed": "pug", "age": 3},
        {"id": 2, "name": "Kato", "breed": "lab", "age": 5},
        {"id": 3, "name": "Rex"},
        {"id": "a", "name": "Stringy"},
    ]
    # Only skipped keys: nothing written, version 0, no log entry.
    before = state(dogs)
    reply = dogs.insert("dev", "dog", [{"id": 1, "name": "again"}])
    assert (loads(reply.inserted_ids), loads(reply.skipped_ids), reply.version) == ([], [1], 0)
    assert state(dogs) == before


def test_dynamic_attributes_appear_in_describe(dogs: StorageClient) -> None:
    dogs.insert("dev", "dog", [{"id": 3, "colour": "brown", "nested": {"a": [1, 2]}}])
    dogs.update("dev", "dog", [{"id": 1, "weight": 7.5}])
    dogs.upsert("dev", "dog", [{"id": 9, "chip": None}])
    info = dogs.describe("dev", "dog")
    assert [(a.name, a.indexed) for a in info.attributes] == [
        ("age", False),
        ("breed", True),
        ("chip", False),
        ("colour", False),
        ("id", True),
        ("name", False),
        ("nested", False),
        ("weight", False),
    ]
    assert dogs.get("dev", "dog", [3, 9]) == [
        {"id": 3, "colour": "brown", "nested": {"a": [1, 2]}},
        {"id": 9, "chip": None},
    ]


def test_update_merges_and_skips_missing(dogs: StorageClient) -> None:
    reply = dogs.update(
        "dev",
        "dog",
        [{"id": 1, "age": 4, "owner": "ann"}, {"id": 77, "age": 1}, {"id": 2, "breed": "husky"}],
    )
    assert loads(reply.updated_ids) == [1, 2]
    assert loads(reply.skipped_ids) == [77]
    assert reply.version > 0
    assert dogs.get("dev", "dog", [1, 2, 77]) == [
        {"id": 1, "name": "Penny", "breed": "pug", "age": 4, "owner": "ann"},
        {"id": 2, "name": "Kato", "breed": "husky", "age": 5},
    ]
    # The index follows the update.
    assert dogs.by_value("dev", "dog", "breed", "lab") == []
    assert [r["id"] for r in dogs.by_value("dev", "dog", "breed", "husky")] == [2]
    # Setting an attribute to null keeps it, with a null value.
    dogs.update("dev", "dog", [{"id": 1, "owner": None}])
    assert dogs.get("dev", "dog", [1])[0]["owner"] is None
    # Only missing keys: version 0 and nothing changes.
    before = state(dogs)
    reply = dogs.update("dev", "dog", [{"id": 5, "age": 1}])
    assert (loads(reply.updated_ids), loads(reply.skipped_ids), reply.version) == ([], [5], 0)
    assert state(dogs) == before


def test_upsert_updates_existing_and_inserts_new(dogs: StorageClient) -> None:
    reply = dogs.upsert("dev", "dog", [{"id": 1, "age": 10}, {"id": 3, "name": "Rex"}])
    assert loads(reply.upserted_ids) == [1, 3]
    assert reply.version > 0
    assert dogs.get("dev", "dog", [1, 3]) == [
        {"id": 1, "name": "Penny", "breed": "pug", "age": 10},
        {"id": 3, "name": "Rex"},
    ]
    assert dogs.describe("dev", "dog").record_count == 3
    # The log records what each write was: a PATCH for the existing key, a PUT for the new.
    last = dogs.transactions("dev")[-1]
    kinds = {orjson.loads(w.id): (w.kind, w.operation) for w in last.writes}
    assert kinds == {
        1: (types_pb2.WRITE_KIND_PATCH, types_pb2.OPERATION_UPSERT),
        3: (types_pb2.WRITE_KIND_PUT, types_pb2.OPERATION_UPSERT),
    }


def test_delete_leaves_a_tombstone_and_reinsert_works(dogs: StorageClient) -> None:
    reply = dogs.delete("dev", "dog", [1, 99])
    assert loads(reply.deleted_ids) == [1]
    assert loads(reply.skipped_ids) == [99]
    assert reply.version > 0
    assert dogs.get("dev", "dog", [1, 2]) == [{"id": 2, "name": "Kato", "breed": "lab", "age": 5}]
    assert dogs.by_value("dev", "dog", "breed", "pug") == []
    assert dogs.describe("dev", "dog").record_count == 1
    # Deleting again skips it; updating a deleted record skips it.
    again = dogs.delete("dev", "dog", [1])
    assert (loads(again.deleted_ids), loads(again.skipped_ids), again.version) == ([], [1], 0)
    update = dogs.update("dev", "dog", [{"id": 1, "age": 1}])
    assert loads(update.skipped_ids) == [1]
    assert dogs.get("dev", "dog", [1]) == []
    # Re-inserting the key works and does not resurrect old attributes.
    insert = dogs.insert("dev", "dog", [{"id": 1, "name": "Penny II"}])
    assert loads(insert.inserted_ids) == [1]
    assert insert.version > reply.version
    assert dogs.get("dev", "dog", [1]) == [{"id": 1, "name": "Penny II"}]
    assert dogs.by_value("dev", "dog", "breed", "pug") == []
    assert dogs.describe("dev", "dog").record_count == 2


def test_many_records_per_call_and_record_count(client: StorageClient) -> None:
    client.create_table("dev", "item", indexed=["group"])
    records = [{"id": i, "group": i % 7, "text": f"item {i}"} for i in range(3000)]
    reply = client.insert("dev", "item", records)
    assert len(reply.inserted_ids) == 3000
    assert client.describe("dev", "item").record_count == 3000
    # One request, one transaction, one version.
    txns = [t for t in client.transactions("dev", "item") if t.writes]
    assert len(txns) == 1
    assert txns[0].version == reply.version
    assert len(txns[0].writes) == 3000

    update = client.update("dev", "item", [{"id": i, "group": 100} for i in range(0, 3000, 2)])
    assert len(update.updated_ids) == 1500
    deleted = client.delete("dev", "item", list(range(0, 3000, 3)))
    assert len(deleted.deleted_ids) == 1000
    info = client.describe("dev", "item")
    assert info.record_count == 2000
    all_records = client.all_records("dev", "item")
    assert len(all_records) == 2000
    expected = {
        i: {"id": i, "group": 100 if i % 2 == 0 else i % 7, "text": f"item {i}"}
        for i in range(3000)
        if i % 3
    }
    assert {r["id"]: r for r in all_records} == expected
    in_group = client.by_value("dev", "item", "group", 100)
    assert sorted(r["id"] for r in in_group) == sorted(i for i in expected if i % 2 == 0)


BAD_RECORDS: list[tuple[list[bytes], list[str]]] = [
    ([b"{not json"], ["record 0", "json"]),
    ([b'{"id": 5}', b'{"id": 6,}'], ["record 1", "json"]),
    ([b"[1, 2]"], ["record 0", "object"]),
    ([b'"text"'], ["record 0", "object"]),
    ([b"42"], ["record 0", "object"]),
    ([b"null"], ["record 0", "object"]),
    # Insert and Upsert generate the missing key of record 0; record 1's is invalid.
    ([b'{"name": "no key"}', b'{"id": true}'], ["primary key"]),
    ([b'{"id": true}'], ["record 0", "primary key"]),
    ([b'{"id": null}'], ["record 0", "primary key"]),
    ([b'{"id": {"a": 1}}'], ["record 0", "primary key"]),
    ([b'{"id": [1]}'], ["record 0", "primary key"]),
    ([b'{"id": ""}'], ["record 0", "primary key", "empty"]),
    ([b'{"id": 9007199254740993}'], ["record 0", "primary key"]),
    ([b'{"id": 9007199254740994.0}'], ["record 0", "primary key", "2^53"]),
    ([b'{"id": 18446744073709551617}'], ["record 0", "64-bit"]),
    ([b'{"id": 5, "n": -9223372036854775809}'], ["record 0", "64-bit"]),
    ([b'{"id": 5, "deep": ' + b"[" * 64 + b"]" * 64 + b"}"], ["record 0", "64 levels"]),
    ([b'{"id": 5}', b'{"id": 6}', b'{"id": 5.0}'], ["record 2", "twice"]),
    ([b'{"id": "x"}', b'{"id": "x", "b": 1}'], ["record 1", "twice"]),
    ([b'{"id": 1, "name": "clash"}', b'{"id": 1}'], ["record 1", "twice"]),
    ([b'{"id": 7, "fresh": 1}', b'{"id": 8, "other": 2}', b'{"id": false}'], ["record 2"]),
    ([], ["no records"]),
]

BAD_IDS: list[tuple[list[bytes], list[str]]] = [
    ([b"1", b"{bad"], ["id 1", "json"]),
    ([b"1", b"true"], ["id 1", "primary key"]),
    ([b"null"], ["id 0", "primary key"]),
    ([b"2", b"[1]"], ["id 1", "primary key"]),
    ([b'""'], ["id 0", "primary key"]),
    ([b"18446744073709551616"], ["id 0", "64-bit"]),
    ([b"1e300"], ["id 0", "2^53"]),
    ([], ["no ids"]),
]


def test_invalid_writes_change_nothing(dogs: StorageClient) -> None:
    before = state(dogs)
    for records, words in BAD_RECORDS:
        for method, request_type in [
            ("Insert", pb.InsertRequest),
            ("Update", pb.UpdateRequest),
            ("Upsert", pb.UpsertRequest),
        ]:
            error = dogs.expect(
                INVALID, method, request_type(database="dev", table="dog", records=records), *words
            )
            info = error_info(error)
            assert (info.domain, info.reason) == ("shoal", "INVALID_ARGUMENT")
            assert state(dogs) == before, (method, records)


def test_invalid_deletes_change_nothing(dogs: StorageClient) -> None:
    before = state(dogs)
    for keys, words in BAD_IDS:
        dogs.expect(
            INVALID, "Delete", pb.DeleteRequest(database="dev", table="dog", ids=keys), *words
        )
        assert state(dogs) == before, keys


def test_writes_to_missing_tables_are_not_found(dogs: StorageClient) -> None:
    not_found = grpc.StatusCode.NOT_FOUND
    for method, request_type in [
        ("Insert", pb.InsertRequest),
        ("Update", pb.UpdateRequest),
        ("Upsert", pb.UpsertRequest),
    ]:
        dogs.expect(
            not_found,
            method,
            request_type(database="dev", table="cat", records=[b'{"id": 1}']),
            "dev.cat",
            "does not exist",
        )
        dogs.expect(
            not_found,
            method,
            request_type(database="nope", table="dog", records=[b'{"id": 1}']),
            "nope",
            "does not exist",
        )
    dogs.expect(
        not_found, "Delete", pb.DeleteRequest(database="dev", table="cat", ids=ids([1])), "dev.cat"
    )
    dogs.expect(
        INVALID,
        "Insert",
        pb.InsertRequest(database="dev", table="bad name", records=[b'{"id": 1}']),
        "table name",
    )
    assert [r["id"] for r in dogs.all_records("dev", "dog")] == [1, 2]


def test_records_per_request_limit(make_node: MakeNode) -> None:
    node = make_node(config={"storage": {"maxRecordsPerRequest": 10}})
    client = node.client()
    client.create_table("dev", "dog")
    ok = client.insert("dev", "dog", [{"id": i} for i in range(10)])
    assert len(ok.inserted_ids) == 10
    before = state(client)
    too_many = [orjson.dumps({"id": i, "x": 1}) for i in range(5, 16)]
    for method, request_type in [
        ("Insert", pb.InsertRequest),
        ("Update", pb.UpdateRequest),
        ("Upsert", pb.UpsertRequest),
    ]:
        error = client.expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            method,
            request_type(database="dev", table="dog", records=too_many),
            "11 records",
            "maxRecordsPerRequest",
        )
        assert error_info(error).reason == "RESOURCE_EXHAUSTED"
        assert state(client) == before
    # A transaction is one request: its operations count together.
    client.expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "Transact",
        pb.TransactRequest(
            database="dev",
            operations=[
                pb.TransactOperation(
                    table="dog", operation=types_pb2.OPERATION_UPSERT, records=too_many[:6]
                ),
                pb.TransactOperation(
                    table="dog", operation=types_pb2.OPERATION_UPSERT, records=too_many[6:]
                ),
            ],
        ),
        "maxRecordsPerRequest",
    )
    assert state(client) == before


def test_writes_survive_a_restart(node: Node, client: StorageClient) -> None:
    client.create_table("dev", "dog", indexed=["breed"])
    client.insert("dev", "dog", [{"id": i, "breed": "pug" if i % 2 else "lab"} for i in range(50)])
    client.delete("dev", "dog", [1, 2])
    client.update("dev", "dog", [{"id": 3, "breed": "lab"}])
    before = state(client)
    node.restart("storage")
    after_client = node.client()
    assert state(after_client) == before
    assert len(after_client.by_value("dev", "dog", "breed", "pug")) == 23


def test_indexes_follow_every_change(client: StorageClient) -> None:
    """After each write, an indexed search finds exactly what a scan finds."""
    client.create_table("dev", "indexed", indexed=["v"])
    client.create_table("dev", "plain")
    probes: list[Any] = [1, 1.0, True, False, 0, "a", "b", "30", 30, None, "x"]
    steps: list[tuple[str, list[dict[str, Any]]]] = [
        ("insert", [{"id": 1, "v": 1}, {"id": 2, "v": [1]}, {"id": 3, "v": [0, "a"]}]),
        ("update", [{"id": 1, "v": True}, {"id": 2, "v": [True]}, {"id": 3, "v": [False, "a"]}]),
        ("update", [{"id": 1, "v": 1.0}, {"id": 2, "v": [1.0, 1]}, {"id": 3, "v": ["a", "b"]}]),
        ("upsert", [{"id": 1, "v": [1, True]}, {"id": 2, "v": 30}, {"id": 4, "v": "30"}]),
        ("update", [{"id": 1, "v": None}, {"id": 2, "v": {"a": 1}}, {"id": 3, "v": "a"}]),
        ("update", [{"id": 1, "v": [None, "x"]}, {"id": 2, "v": [0]}, {"id": 4, "v": [30]}]),
        ("update", [{"id": 2, "v": [False]}, {"id": 4, "v": ["30", 30]}]),
    ]
    for i, (method, records) in enumerate(steps):
        for table in ("indexed", "plain"):
            getattr(client, method)("dev", table, records)
        for probe in probes:
            found = [
                sorted(r["id"] for r in client.by_value("dev", t, "v", probe))
                for t in ("indexed", "plain")
            ]
            assert found[0] == found[1], (i, probe)
    client.delete("dev", "indexed", [1, 2])
    assert client.by_value("dev", "indexed", "v", None) == []
    assert client.by_value("dev", "indexed", "v", False) == []


def test_a_record_without_its_primary_key_gets_a_generated_one(dogs: StorageClient) -> None:
    inserted = dogs.insert("dev", "dog", [{"name": "Rex"}])
    (key,) = [orjson.loads(i) for i in inserted.inserted_ids]
    assert isinstance(key, str) and str(uuid.UUID(key)) == key
    assert dogs.get("dev", "dog", [key]) == [{"name": "Rex", "id": key}]
    upserted = dogs.upsert("dev", "dog", [{"name": "Max"}])
    assert orjson.loads(upserted.upserted_ids[0]) != key
    dogs.expect(
        INVALID,
        "Update",
        pb.UpdateRequest(database="dev", table="dog", records=[b'{"name": "x"}']),
        "record 0",
        "primary key",
    )


def test_typed_attributes_are_checked_on_every_write_path(client: StorageClient) -> None:
    client.call(
        "CreateTable",
        pb.CreateTableRequest(
            database="dev",
            table="t",
            attributes=[
                pb.AttributeDefinition(name="score", type="number"),
                pb.AttributeDefinition(name="n", type="Int", indexed=True),
            ],
            schema_defined=True,
        ),
    )
    info = client.describe("dev", "t")
    assert {a.name: (a.type, a.indexed) for a in info.attributes} == {
        "id": ("", True),
        "score": ("Number", False),
        "n": ("Int", True),
    }
    assert info.schema_defined and not info.record_timestamps
    client.insert("dev", "t", [{"id": 1, "score": 1.5, "n": 2}])
    before = state(client, "dev", "t")
    bad = [b'{"id": 2, "score": 1}', b'{"id": 3, "score": "high"}']
    for method, request_type in [
        ("Insert", pb.InsertRequest),
        ("Update", pb.UpdateRequest),
        ("Upsert", pb.UpsertRequest),
    ]:
        error = client.expect(
            INVALID,
            method,
            request_type(database="dev", table="t", records=bad),
            'Value "high" in property score must be a number',
        )
        assert error_info(error).reason == "ATTRIBUTE_TYPE"
        assert state(client, "dev", "t") == before
    client.expect(
        INVALID,
        "Transact",
        pb.TransactRequest(
            database="dev",
            operations=[
                pb.TransactOperation(
                    table="t",
                    operation=types_pb2.OPERATION_INSERT,
                    records=[b'{"id": 4, "n": 0.5}'],
                )
            ],
        ),
        "Value 0.5 in property n must be an integer",
    )
    assert state(client, "dev", "t") == before
    client.expect(
        INVALID,
        "CreateTable",
        pb.CreateTableRequest(
            database="dev", table="u", attributes=[pb.AttributeDefinition(name="x", type="Colour")]
        ),
        "unknown type 'Colour'",
    )


def test_a_key_of_a_non_string_type_is_not_generated(client: StorageClient) -> None:
    client.call(
        "CreateTable",
        pb.CreateTableRequest(
            database="dev", table="n", attributes=[pb.AttributeDefinition(name="id", type="Int")]
        ),
    )
    client.expect(
        INVALID,
        "Insert",
        pb.InsertRequest(database="dev", table="n", records=[b'{"v": 1}']),
        "missing primary key attribute 'id' (a key of type Int is not generated)",
    )
    assert [orjson.loads(i) for i in client.insert("dev", "n", [{"id": 7}]).inserted_ids] == [7]
