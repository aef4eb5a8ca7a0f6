"""The admin service's Execute: Harper JSON operations through real processes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MakeNode
from tests.harness.admin import AdminClient
from tests.harness.node import Node

NOT_FOUND, INVALID_ARGUMENT, ALREADY_EXISTS, PERMISSION_DENIED = 5, 3, 6, 7
TIMESTAMPS = ("__createdtime__", "__updatedtime__")


def without_timestamps(record: dict[str, Any]) -> dict[str, Any]:
    """A record without Harper's timestamps (tests/admin/test_harper_data.py pins them)."""
    return {k: v for k, v in record.items() if k not in TIMESTAMPS}


@pytest.fixture
def admin_node(make_node: MakeNode) -> Node:
    node = make_node(services=("storage", "replicator", "admin"))
    return node


@pytest.fixture
def admin(admin_node: Node) -> AdminClient:
    return admin_node.admin()


def test_schema_and_data_operations_with_harper_names(admin: AdminClient) -> None:
    assert admin.ok({"operation": "create_database", "database": "dev"}) == {
        "message": "database 'dev' successfully created"
    }
    admin.ok({"operation": "create_table", "schema": "dev", "table": "dog", "hash_attribute": "id"})
    inserted = admin.ok(
        {
            "operation": "insert",
            "schema": "dev",
            "table": "dog",
            "records": [{"id": 1, "name": "Penny", "age": 5}, {"id": 2, "name": "Kato", "age": 3}],
        }
    )
    assert inserted == {
        "message": "inserted 2 of 2 records",
        "inserted_hashes": [1, 2],
        "skipped_hashes": [],
    }
    again = admin.ok(
        {"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1}]}
    )
    assert again["skipped_hashes"] == [1] and again["inserted_hashes"] == []
    updated = admin.ok(
        {
            "operation": "update",
            "database": "dev",
            "table": "dog",
            "records": [{"id": 2, "age": 4}, {"id": 9}],
        }
    )
    assert updated == {
        "message": "updated 1 of 2 records",
        "update_hashes": [2],
        "skipped_hashes": [9],
    }
    assert admin.ok(
        {
            "operation": "upsert",
            "database": "dev",
            "table": "dog",
            "records": [{"id": 3, "name": "Rex"}],
        }
    )["upserted_hashes"] == [3]
    assert admin.ok(
        {
            "operation": "search_by_hash",
            "schema": "dev",
            "table": "dog",
            "hash_values": [2],
            "get_attributes": ["age"],
        }
    ) == [{"age": 4}]
    by_value = admin.ok(
        {
            "operation": "search_by_value",
            "database": "dev",
            "table": "dog",
            "search_attribute": "name",
            "search_value": "K*",
        }
    )
    assert [without_timestamps(r) for r in by_value] == [{"id": 2, "name": "Kato", "age": 4}]
    by_conditions = admin.ok(
        {
            "operation": "search_by_conditions",
            "database": "dev",
            "table": "dog",
            "operator": "or",
            "conditions": [
                {"search_attribute": "age", "search_type": "greater_than", "search_value": 4},
                {"attribute": "name", "comparator": "equals", "value": "Rex"},
            ],
            "sort": {"attribute": "id", "descending": True},
        }
    )
    assert [r["id"] for r in by_conditions] == [3, 1]
    deleted = admin.ok({"operation": "delete", "database": "dev", "table": "dog", "ids": [3, 42]})
    assert deleted == {
        "message": "1 of 2 records successfully deleted",
        "deleted_hashes": [3],
        "skipped_hashes": [42],
    }
    described = admin.ok({"operation": "describe_all"})
    dog = described["dev"]["dog"]
    assert dog["hash_attribute"] == "id" and dog["record_count"] == 2
    assert {a["attribute"] for a in dog["attributes"]} == {"id", "name", "age", *TIMESTAMPS}
    described = admin.ok({"operation": "describe_table", "database": "dev", "table": "dog"})
    sizes = ("table_size", "db_size", "db_audit_size")  # estimates: they move as RocksDB flushes
    assert {k: v for k, v in described.items() if k not in sizes} == {
        k: v for k, v in dog.items() if k not in sizes
    }


def test_errors_come_back_harper_style_with_the_grpc_code(admin: AdminClient) -> None:
    result, code = admin.execute({"operation": "describe_table", "database": "nope", "table": "x"})
    assert code == NOT_FOUND and "nope" in result["error"]
    result, code = admin.execute({"operation": "no_such_operation"})
    assert code == INVALID_ARGUMENT and result["error"] == "Operation 'no_such_operation' not found"
    result, code = admin.execute({"operation": "insert", "database": "dev", "table": "dog"})
    assert code == INVALID_ARGUMENT and "'records' is required" in result["error"]
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog"})
    result, code = admin.execute({"operation": "create_table", "database": "dev", "table": "dog"})
    assert code == ALREADY_EXISTS and "already exists" in result["error"]
    result, code = admin.execute(
        {"operation": "update", "database": "dev", "table": "dog", "records": [{"name": "no id"}]}
    )
    assert code == INVALID_ARGUMENT and "primary key" in result["error"]
    assert (
        admin.ok(
            {
                "operation": "search_by_value",
                "database": "dev",
                "table": "dog",
                "attribute": "id",
                "value": "*",
            }
        )
        == []
    )


def test_logs_through_execute(admin: AdminClient) -> None:
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog"})
    admin.ok(
        {"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1, "v": 1}]}
    )
    admin.ok(
        {"operation": "update", "database": "dev", "table": "dog", "records": [{"id": 1, "v": 2}]}
    )
    log = admin.ok({"operation": "read_transaction_log", "database": "dev", "table": "dog"})
    writes = [e for e in log if e["hash_values"]]
    assert [e["operation"] for e in writes] == ["insert", "update"]
    assert [without_timestamps(r) for r in writes[1]["original_records"]] == [{"id": 1, "v": 1}]
    assert writes[1]["user_name"] == "admin"
    audit = admin.ok(
        {
            "operation": "read_audit_log",
            "database": "dev",
            "table": "dog",
            "search_type": "hash_value",
            "search_values": [1],
        }
    )
    assert [e["operation"] for e in audit["1"]] == ["insert", "update"]
    by_user = admin.ok(
        {
            "operation": "read_audit_log",
            "database": "dev",
            "table": "dog",
            "search_type": "username",
            "search_values": ["nobody"],
        }
    )
    assert by_user == {}


def test_system_information(admin: AdminClient, admin_node: Node) -> None:
    info = admin.ok({"operation": "system_information", "attributes": ["memory", "processes"]})
    assert set(info) == {"memory", "processes"}
    assert info["memory"]["total"] > 0
    pids = {p["pid"] for p in info["processes"]}
    assert {admin_node.processes[s].pid for s in ("storage", "replicator", "admin")} <= pids
    admin.ok({"operation": "create_table", "database": "dev", "table": "cat"})
    admin.ok({"operation": "insert", "database": "dev", "table": "cat", "records": [{"id": 1}]})
    node_info = admin.ok(
        {"operation": "system_information", "attributes": ["table_size", "replication"]}
    )
    assert set(node_info) == {"table_size", "replication"}
    assert {"schema": "dev", "table": "cat", "record_count": 1, "database": "dev"} in node_info[
        "table_size"
    ]
    assert node_info["replication"]["node_name"] == admin_node.name
    assert node_info["replication"]["removed"] is False
    everything = admin.ok({"operation": "system_information"})
    assert {"system", "cpu", "table_size", "replication"} <= set(everything)
    _, code = admin.execute({"operation": "system_information", "attributes": ["gpu"]})
    assert code == INVALID_ARGUMENT
