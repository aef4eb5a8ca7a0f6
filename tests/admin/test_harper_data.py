"""Harper's form of the data operations through Execute on real processes: generated
primary keys, typed attributes, record timestamps, ``get_attributes: ["*"]`` and the
describe operations' fields."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.conftest import MakeNode
from tests.harness.admin import AdminClient
from tests.harness.node import Node

INVALID_ARGUMENT = 3
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture
def admin_node(make_node: MakeNode) -> Node:
    return make_node(services=("storage", "replicator", "admin"))


@pytest.fixture
def admin(admin_node: Node) -> AdminClient:
    return admin_node.admin()


def _all(
    admin: AdminClient, table: str, attributes: list[str] | None = None
) -> list[dict[str, Any]]:
    body = {
        "operation": "search_by_value",
        "database": "dev",
        "table": table,
        "search_attribute": "id",
        "search_value": "*",
        "get_attributes": attributes or ["*"],
    }
    return list(admin.ok(body))


def test_insert_without_a_primary_key_generates_a_uuid(admin: AdminClient) -> None:
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"})
    inserted = admin.ok(
        {"operation": "insert", "database": "dev", "table": "dog", "records": [{"name": "Penny"}]}
    )
    assert set(inserted) == {"message", "inserted_hashes", "skipped_hashes"}
    assert inserted["message"] == "inserted 1 of 1 records"
    (key,) = inserted["inserted_hashes"]
    assert isinstance(key, str) and UUID.match(key)
    found = admin.ok(
        {
            "operation": "search_by_id",
            "database": "dev",
            "table": "dog",
            "ids": [key],
            "get_attributes": ["id", "name"],
        }
    )
    assert found == [{"id": key, "name": "Penny"}]
    upserted = admin.ok(
        {"operation": "upsert", "database": "dev", "table": "dog", "records": [{"name": "Kato"}]}
    )
    assert UUID.match(upserted["upserted_hashes"][0])
    result, code = admin.execute(
        {"operation": "update", "database": "dev", "table": "dog", "records": [{"name": "x"}]}
    )
    assert code == INVALID_ARGUMENT and "primary key" in result["error"]


def test_typed_attributes_refuse_a_value_of_the_wrong_type(admin: AdminClient) -> None:
    admin.ok(
        {
            "operation": "create_table",
            "database": "dev",
            "table": "score",
            "primary_key": "id",
            "attributes": [
                {"name": "id", "type": "ID"},
                {"name": "score", "type": "Float", "indexed": True},
                {"name": "name", "type": "String"},
                {"name": "count", "type": "Int"},
                {"name": "ok", "type": "Boolean"},
                {"name": "when", "type": "Date"},
            ],
        }
    )
    good = {"id": 1, "score": 2.5, "name": "a", "count": 3, "ok": True, "when": "2024-01-02"}
    admin.ok({"operation": "insert", "database": "dev", "table": "score", "records": [good]})
    result, code = admin.execute(
        {
            "operation": "insert",
            "database": "dev",
            "table": "score",
            "records": [{"id": 2, "score": 1}, {"id": 3, "score": "high"}],
        }
    )
    assert code == INVALID_ARGUMENT
    assert result == {"error": 'Value "high" in property score must be a number'}
    for record, message in [
        ({"id": 4, "name": 5}, "Value 5 in property name must be a string"),
        (
            {"id": 4, "count": 1.5},
            "Value 1.5 in property count must be an integer (from -2147483648 to 2147483647)",
        ),
        ({"id": 4, "ok": "yes"}, 'Value "yes" in property ok must be a boolean'),
        ({"id": 4, "when": "soon"}, 'Value "soon" in property when must be a Date'),
    ]:
        for operation in ("insert", "upsert"):
            result, code = admin.execute(
                {"operation": operation, "database": "dev", "table": "score", "records": [record]}
            )
            assert (result, code) == ({"error": message}, INVALID_ARGUMENT)
    result, code = admin.execute(
        {
            "operation": "update",
            "database": "dev",
            "table": "score",
            "records": [{"id": 1, "score": "x"}],
        }
    )
    assert code == INVALID_ARGUMENT and "in property score must be a number" in result["error"]
    # Nothing of a refused request was written; null is accepted for every type.
    assert [r["id"] for r in _all(admin, "score")] == [1]
    admin.ok(
        {
            "operation": "update",
            "database": "dev",
            "table": "score",
            "records": [{"id": 1, "score": None}],
        }
    )
    described = admin.ok({"operation": "describe_table", "database": "dev", "table": "score"})
    types = {a["attribute"]: a.get("type") for a in described["attributes"]}
    assert types == {
        "id": "ID",
        "score": "Float",
        "name": "String",
        "count": "Int",
        "ok": "Boolean",
        "when": "Date",
    }
    assert described["schema_defined"] is True
    result, code = admin.execute(
        {
            "operation": "create_table",
            "database": "dev",
            "table": "bad",
            "attributes": [{"name": "x", "type": "Colour"}],
        }
    )
    assert code == INVALID_ARGUMENT and "unknown type 'Colour'" in result["error"]


def test_dynamic_tables_carry_harper_timestamps(admin: AdminClient) -> None:
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"})
    before = time.time() * 1000
    admin.ok(
        {
            "operation": "insert",
            "database": "dev",
            "table": "dog",
            "records": [{"id": 1, "name": "Penny"}, {"id": 2, "age": 3}],
        }
    )
    (first, second) = _all(admin, "dog")
    created = first["__createdtime__"]
    assert isinstance(created, int) and before - 1000 <= created <= time.time() * 1000 + 1000
    assert first["__updatedtime__"] == created
    # get_attributes ["*"]: every attribute the table knows, null where a record has none.
    assert first == {
        "id": 1,
        "name": "Penny",
        "age": None,
        "__createdtime__": created,
        "__updatedtime__": created,
    }
    assert second["name"] is None and second["age"] == 3
    time.sleep(0.01)
    admin.ok(
        {"operation": "update", "database": "dev", "table": "dog", "records": [{"id": 1, "age": 5}]}
    )
    (first, _) = _all(admin, "dog")
    assert first["__createdtime__"] == created and first["__updatedtime__"] > created
    # Without "*", only what is asked.
    assert _all(admin, "dog", ["id", "name"]) == [{"id": 1, "name": "Penny"}, {"id": 2}]


def test_describe_operations_show_harpers_fields(admin: AdminClient) -> None:
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"})
    admin.ok(
        {"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1, "a": 1}]}
    )
    table = admin.ok({"operation": "describe_table", "database": "dev", "table": "dog"})
    assert {
        "schema",
        "name",
        "hash_attribute",
        "audit",
        "schema_defined",
        "attributes",
        "sources",
        "record_count",
        "table_size",
        "db_size",
        "db_audit_size",
        "last_updated_record",
    } <= set(table)
    assert table["schema"] == "dev" and table["name"] == "dog" and table["hash_attribute"] == "id"
    assert table["audit"] is True and table["schema_defined"] is False
    assert table["sources"] == [] and table["record_count"] == 1
    assert all(isinstance(table[k], int) for k in ("table_size", "db_size", "db_audit_size"))
    assert isinstance(table["last_updated_record"], float)
    assert abs(table["last_updated_record"] - time.time() * 1000) < 60_000
    assert table["attributes"] == [
        {"attribute": "id", "indexed": True, "is_primary_key": True},
        {"attribute": "__createdtime__", "indexed": False},
        {"attribute": "__updatedtime__", "indexed": False},
        {"attribute": "a", "indexed": False},
    ]
    database = admin.ok({"operation": "describe_database", "database": "dev"})
    assert set(database) == {"dog"} and steady(database["dog"]) == steady(table)
    everything = admin.ok({"operation": "describe_all"})
    assert set(everything["dev"]) == {"dog"} and steady(everything["dev"]["dog"]) == steady(table)


def steady(described: dict[str, Any]) -> dict[str, Any]:
    """A table's description without the size estimates (RocksDB's, which move as it
    flushes and compacts)."""
    return {
        k: v for k, v in described.items() if k not in ("table_size", "db_size", "db_audit_size")
    }


def test_audit_entries_hold_whole_records_and_group_by_user(
    admin: AdminClient, admin_node: Node
) -> None:
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"})
    admin.ok({"operation": "add_role", "role": "writer", "permission": {"super_user": True}})
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw", "role": "writer"})
    admin.ok(
        {
            "operation": "insert",
            "database": "dev",
            "table": "dog",
            "records": [{"id": 1, "name": "Penny", "age": 5}],
        }
    )
    admin_node.admin("ann", "pw").ok(
        {"operation": "update", "database": "dev", "table": "dog", "records": [{"id": 1, "age": 6}]}
    )
    # read_transaction_log: record writes only (the table's creation is not an entry).
    log = admin.ok({"operation": "read_transaction_log", "database": "dev", "table": "dog"})
    assert [e["operation"] for e in log] == ["insert", "update"]
    update = log[1]
    (record,) = update["records"]
    (original,) = update["original_records"]
    assert {k: record[k] for k in ("id", "name", "age")} == {"id": 1, "name": "Penny", "age": 6}
    assert {k: original[k] for k in ("id", "name", "age")} == {"id": 1, "name": "Penny", "age": 5}
    assert record["__createdtime__"] == original["__createdtime__"]
    assert record["__updatedtime__"] >= original["__updatedtime__"]
    by_user = admin.ok(
        {
            "operation": "read_audit_log",
            "database": "dev",
            "table": "dog",
            "search_type": "username",
            "search_values": ["admin", "ann"],
        }
    )
    assert set(by_user) == {"admin", "ann"}
    assert [e["operation"] for e in by_user["admin"]] == ["insert"]
    assert [e["operation"] for e in by_user["ann"]] == ["update"]
    assert by_user["ann"][0]["records"] == [record]
    assert {
        "operation",
        "user_name",
        "timestamp",
        "hash_values",
        "records",
        "original_records",
    } <= set(by_user["ann"][0])
    everything = admin.ok({"operation": "read_audit_log", "database": "dev", "table": "dog"})
    assert isinstance(everything, list) and len(everything) == 2


JOB_KEYS = {
    "__createdtime__",
    "__updatedtime__",
    "created_datetime",
    "end_datetime",
    "id",
    "job_body",
    "message",
    "start_datetime",
    "status",
    "type",
    "user",
    "start_datetime_converted",
    "end_datetime_converted",
}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_csv_loads_and_log_deletion_run_as_jobs(admin: AdminClient, admin_node: Node) -> None:
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"})
    before = int(time.time() * 1000)
    started = admin.ok(
        {
            "operation": "csv_data_load",
            "database": "dev",
            "table": "dog",
            "data": "id,name\n1,Penny\n2,Kato\n",
        }
    )
    job_id = started["job_id"]
    assert UUID.match(job_id)
    assert started == {"message": f"Starting job with id {job_id}", "job_id": job_id}
    job = admin.job({"operation": "csv_data_load", "database": "dev", "table": "dog",
                     "action": "upsert", "data": "id,age\n1,5\n"})  # fmt: skip
    (first,) = admin.ok({"operation": "get_job", "id": job_id})
    assert set(first) == JOB_KEYS | {"result"}
    assert first["id"] == job_id and first["type"] == "csv_data_load"
    assert first["status"] == "COMPLETE" and first["user"] == "admin"
    assert first["message"] == "successfully loaded 2 of 2 records"
    assert first["result"] == {"rows": 2, "written": 2, "skipped": 0, "failed": 0, "errors": []}
    assert first["job_body"] is None
    assert before <= first["start_datetime"] <= first["end_datetime"]
    assert ISO.match(first["start_datetime_converted"])
    assert ISO.match(first["end_datetime_converted"])
    assert job["status"] == "COMPLETE" and job["message"] == "successfully loaded 1 of 1 records"
    # A load that fails is a job in ERROR, with the reason as its message.
    failed = admin.job(
        {"operation": "csv_data_load", "database": "dev", "table": "cat", "data": "id\n1\n"}
    )
    assert failed["status"] == "ERROR" and "cat" in failed["message"]
    assert set(failed) == JOB_KEYS
    deleted = admin.job(
        {"operation": "delete_audit_logs_before", "database": "dev", "timestamp": before}
    )
    assert deleted["status"] == "COMPLETE" and deleted["type"] == "delete_audit_logs_before"
    assert deleted["message"].startswith("deleted ")
    assert admin.ok({"operation": "get_job", "id": "no-such-job"}) == []
    found = admin.ok(
        {
            "operation": "search_jobs_by_start_date",
            "from_date": time.strftime(
                "%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime(before / 1000 - 1)
            ),
            "to_date": int(time.time() * 1000) + 1000,
        }
    )
    assert found[0]["id"] == job_id and len(found) == 4
    assert all(set(j) >= JOB_KEYS for j in found)
    # A user sees their own jobs only; searching all jobs needs a super user.
    permission = {"dev": {"tables": {"dog": {"read": True, "insert": True, "update": True}}}}
    admin.ok({"operation": "add_role", "role": "loader", "permission": permission})
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw", "role": "loader"})
    ann = admin_node.admin("ann", "pw")
    assert ann.ok({"operation": "get_job", "id": job_id}) == []
    own = ann.job({"operation": "csv_data_load", "database": "dev", "table": "dog",
                   "data": "id\n9\n"})  # fmt: skip
    assert own["user"] == "ann" and own["status"] == "COMPLETE"
    assert admin.ok({"operation": "get_job", "id": own["id"]})[0]["user"] == "ann"
    _, code = ann.execute({"operation": "search_jobs_by_start_date", "from_date": 0, "to_date": 1})
    assert code == 7
    result, code = admin.execute(
        {"operation": "search_jobs_by_start_date", "from_date": "yesterday", "to_date": 1}
    )
    assert code == INVALID_ARGUMENT and "'from_date' must be a date" in result["error"]


def test_csv_loads_generate_keys_and_check_types(admin: AdminClient) -> None:
    admin.ok(
        {
            "operation": "create_table",
            "database": "dev",
            "table": "score",
            "primary_key": "id",
            "attributes": [{"name": "id", "type": "ID"}, {"name": "score", "type": "Float"}],
        }
    )
    job = admin.job(
        {
            "operation": "csv_data_load",
            "database": "dev",
            "table": "score",
            "data": "score,name\n1.5,a\nhigh,b\n",
        }
    )
    assert job["status"] == "COMPLETE" and job["message"] == "successfully loaded 1 of 2 records"
    assert job["result"]["errors"] == [
        {"line": 3, "message": 'line 3: Value "high" in property score must be a number'}
    ]
    (record,) = _all(admin, "score")
    assert UUID.match(record["id"]) and record["score"] == 1.5 and record["name"] == "a"
