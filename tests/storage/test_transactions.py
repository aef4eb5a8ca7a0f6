"""Transact: several operations across tables of one database, all-or-nothing."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
import pytest
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.harness.client import StorageClient, ids, loads

INSERT = types_pb2.OPERATION_INSERT
UPDATE = types_pb2.OPERATION_UPDATE
UPSERT = types_pb2.OPERATION_UPSERT
DELETE = types_pb2.OPERATION_DELETE


def op(
    table: str, operation: types_pb2.Operation.ValueType, *records: dict[str, Any]
) -> pb.TransactOperation:
    return pb.TransactOperation(
        table=table, operation=operation, records=[orjson.dumps(r) for r in records]
    )


def delete(table: str, *keys: Any) -> pb.TransactOperation:
    return pb.TransactOperation(table=table, operation=DELETE, ids=ids(keys))


def transact(client: StorageClient, *operations: pb.TransactOperation) -> pb.TransactResponse:
    return client.call("Transact", pb.TransactRequest(database="shop", operations=operations))


def everything(client: StorageClient) -> Any:
    return (
        client.all_records("shop", "order"),
        client.all_records("shop", "stock", "sku"),
        client.describe("shop", "order").record_count,
        client.describe("shop", "stock").record_count,
        [(a.name, a.indexed) for a in client.describe("shop", "order").attributes],
        len(client.transactions("shop")),
    )


@pytest.fixture
def shop(client: StorageClient) -> StorageClient:
    client.create_table("shop", "order", indexed=["customer"])
    client.create_table("shop", "stock", primary_key="sku")
    client.insert("shop", "stock", [{"sku": "apple", "count": 10}, {"sku": "pear", "count": 3}])
    client.insert("shop", "order", [{"id": 1, "customer": "ann", "items": ["pear"]}])
    return client


def test_operations_across_tables_commit_with_one_version(shop: StorageClient) -> None:
    log_before = shop.transactions("shop")
    reply = transact(
        shop,
        op("order", INSERT, {"id": 2, "customer": "bob", "items": ["apple"]}),
        op("stock", UPDATE, {"sku": "apple", "count": 9}, {"sku": "kiwi", "count": 1}),
        op("stock", UPSERT, {"sku": "plum", "count": 5}),
        delete("order", 1, 404),
    )
    assert reply.version > 0
    assert [(loads(r.written_ids), loads(r.skipped_ids)) for r in reply.results] == [
        ([2], []),
        (["apple"], ["kiwi"]),
        (["plum"], []),
        ([1], [404]),
    ]
    assert shop.all_records("shop", "order") == [{"id": 2, "customer": "bob", "items": ["apple"]}]
    assert shop.all_records("shop", "stock", "sku") == [
        {"sku": "apple", "count": 9},
        {"sku": "pear", "count": 3},
        {"sku": "plum", "count": 5},
    ]
    log_after = shop.transactions("shop")
    assert len(log_after) == len(log_before) + 1
    txn = log_after[-1]
    assert txn.version == reply.version
    assert txn.local_time == reply.version
    assert txn.user == "admin"
    assert txn.database == "shop"
    writes = sorted((w.table, orjson.loads(w.id), w.kind, w.operation) for w in txn.writes)
    assert writes == [
        ("order", 1, types_pb2.WRITE_KIND_DELETE, DELETE),
        ("order", 2, types_pb2.WRITE_KIND_PUT, INSERT),
        ("stock", "apple", types_pb2.WRITE_KIND_PATCH, UPDATE),
        ("stock", "plum", types_pb2.WRITE_KIND_PUT, UPSERT),
    ]
    assert sorted(t.name for t in txn.tables) == ["order", "stock"]
    # The per-table view of the log shows the same single transaction.
    assert shop.transactions("shop", "order")[-1].version == reply.version
    assert shop.transactions("shop", "stock")[-1].version == reply.version


def test_operations_see_earlier_ones(shop: StorageClient) -> None:
    reply = transact(
        shop,
        op("order", INSERT, {"id": 5, "customer": "cy", "total": 1}),
        op("order", UPDATE, {"id": 5, "total": 2, "paid": True}),
        op("order", INSERT, {"id": 6, "customer": "dee"}),
        delete("order", 6),
        op("order", UPDATE, {"id": 6, "customer": "ghost"}),
        op("order", INSERT, {"id": 5, "customer": "dup"}),
        op("stock", UPDATE, {"sku": "pear", "count": 2}),
        op("stock", UPDATE, {"sku": "pear", "reserved": 1}),
        op("order", INSERT, {"id": 7, "customer": "eve"}),
        delete("order", 7),
        op("order", INSERT, {"id": 7, "customer": "eve again"}),
    )
    assert [(loads(r.written_ids), loads(r.skipped_ids)) for r in reply.results] == [
        ([5], []),
        ([5], []),
        ([6], []),
        ([6], []),
        ([], [6]),  # deleted by the operation before
        ([], [5]),  # inserted by the first operation
        (["pear"], []),
        (["pear"], []),
        ([7], []),
        ([7], []),
        ([7], []),
    ]
    assert shop.get("shop", "order", [5, 6, 7]) == [
        {"id": 5, "customer": "cy", "total": 2, "paid": True},
        {"id": 7, "customer": "eve again"},
    ]
    assert shop.get("shop", "stock", ["pear"]) == [{"sku": "pear", "count": 2, "reserved": 1}]
    assert [r["id"] for r in shop.by_value("shop", "order", "customer", "eve again")] == [7]
    assert shop.by_value("shop", "order", "customer", "dee") == []
    assert shop.describe("shop", "order").record_count == 3
    # At most one write per record in the logged transaction, with the combined effect.
    txn = shop.transactions("shop")[-1]
    assert txn.version == reply.version
    keys = [(w.table, orjson.loads(w.id)) for w in txn.writes]
    assert len(keys) == len(set(keys))
    by_key = {(w.table, orjson.loads(w.id)): w for w in txn.writes}
    assert by_key[("order", 5)].kind == types_pb2.WRITE_KIND_PUT
    assert orjson.loads(by_key[("order", 5)].value) == {
        "id": 5,
        "customer": "cy",
        "total": 2,
        "paid": True,
    }
    assert by_key[("stock", "pear")].kind == types_pb2.WRITE_KIND_PATCH
    assert orjson.loads(by_key[("stock", "pear")].prior) == {"sku": "pear", "count": 3}


def test_a_failing_operation_aborts_everything(shop: StorageClient) -> None:
    before = everything(shop)
    good = [
        op("order", INSERT, {"id": 10, "customer": "zed", "new_attribute": 1}),
        op("stock", UPDATE, {"sku": "apple", "count": 0}),
        delete("order", 1),
    ]
    failures: list[tuple[list[pb.TransactOperation], grpc.StatusCode, list[str]]] = [
        (
            [*good, pb.TransactOperation(table="stock", operation=UPDATE, records=[b"{oops"])],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 3", "json"],
        ),
        (
            # An update needs the key (an insert would generate it).
            [good[0], op("stock", UPDATE, {"count": 1}), *good[1:]],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 1", "primary key", "sku"],
        ),
        (
            [*good, op("order", INSERT, {"id": 11}, {"id": 11})],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 3", "twice"],
        ),
        (
            [*good, pb.TransactOperation(table="order", operation=DELETE, ids=[b"true"])],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 3", "primary key"],
        ),
        (
            [*good, pb.TransactOperation(table="order", operation=INSERT)],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 3", "no records"],
        ),
        (
            [*good, pb.TransactOperation(table="order", operation=DELETE)],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 3", "no ids"],
        ),
        (
            [
                *good,
                pb.TransactOperation(
                    table="order", operation=types_pb2.OPERATION_UNSPECIFIED, records=[b"{}"]
                ),
            ],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["operation 3", "operation must be"],
        ),
        (
            [*good, op("nope", INSERT, {"id": 1})],
            grpc.StatusCode.NOT_FOUND,
            ["shop.nope", "does not exist"],
        ),
        (
            [op("bad name", INSERT, {"id": 1}), *good],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["table name"],
        ),
    ]
    for operations, code, words in failures:
        shop.expect(
            code, "Transact", pb.TransactRequest(database="shop", operations=operations), *words
        )
        assert everything(shop) == before, words
    shop.expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "Transact",
        pb.TransactRequest(database="shop"),
        "at least one operation",
    )
    shop.expect(
        grpc.StatusCode.NOT_FOUND,
        "Transact",
        pb.TransactRequest(database="nowhere", operations=good),
        "nowhere",
    )
    assert everything(shop) == before
    # The same good operations on their own do commit.
    reply = transact(shop, *good)
    assert reply.version > 0
    assert shop.get("shop", "order", [1, 10]) == [{"id": 10, "customer": "zed", "new_attribute": 1}]


def test_only_skips_write_nothing(shop: StorageClient) -> None:
    before = everything(shop)
    reply = transact(
        shop,
        op("order", INSERT, {"id": 1, "customer": "again"}),
        op("stock", UPDATE, {"sku": "missing", "count": 1}),
        delete("order", 99),
    )
    assert reply.version == 0
    assert [(loads(r.written_ids), loads(r.skipped_ids)) for r in reply.results] == [
        ([], [1]),
        ([], ["missing"]),
        ([], [99]),
    ]
    assert everything(shop) == before
