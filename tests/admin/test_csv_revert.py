"""CSV loads and transaction reverts through the admin service's Execute (real processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.csvload import CHUNK_BYTES
from tests.conftest import MakeNode
from tests.harness.admin import AdminClient
from tests.harness.node import Node

INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION = 3, 5, 7, 9


@pytest.fixture
def admin_node(make_node: MakeNode) -> Node:
    return make_node(services=("storage", "replicator", "admin"))


@pytest.fixture
def admin(admin_node: Node) -> AdminClient:
    client = admin_node.admin()
    client.ok({"operation": "create_table", "database": "dev", "table": "dog"})
    return client


def records(admin: AdminClient, table: str = "dog") -> dict[Any, Any]:
    """Every record of dev.<table>, by primary key, without Harper's record timestamps
    (tests/admin/test_harper_data.py pins those)."""
    found = admin.ok(
        {
            "operation": "search_by_value",
            "database": "dev",
            "table": table,
            "attribute": "id",
            "value": "*",
        }
    )
    return {r["id"]: without_timestamps(r) for r in found}


def without_timestamps(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("__createdtime__", "__updatedtime__")}


def load(admin: AdminClient, operation: dict[str, Any]) -> dict[str, Any]:
    """A CSV load, run as Harper runs it (a job): its message and counts once complete."""
    job = admin.job(operation)
    assert job["status"] == "COMPLETE" and job["type"] == operation["operation"], job
    return {"message": job["message"], **job["result"]}


def load_error(admin: AdminClient, operation: dict[str, Any]) -> str:
    """The message of a CSV load whose job ended in ERROR."""
    job = admin.job(operation)
    assert job["status"] == "ERROR" and "result" not in job, job
    return str(job["message"])


def count(admin: AdminClient) -> int:
    described = admin.ok({"operation": "describe_table", "database": "dev", "table": "dog"})
    return int(described["record_count"])


def last_transaction(admin: AdminClient) -> dict[str, Any]:
    """The newest entry of dev's transaction log."""
    log = admin.ok({"operation": "read_transaction_log", "database": "dev"})
    entry: dict[str, Any] = log[-1]
    return entry


def revert(admin: AdminClient, entry: dict[str, Any], **extra: Any) -> tuple[Any, int]:
    return admin.execute(
        {
            "operation": "revert_transaction",
            "database": "dev",
            "origin": entry["origin"],
            "version": entry["version"],
            **extra,
        }
    )


# -- CSV -------------------------------------------------------------------------------------


def test_csv_data_load_inserts_and_upserts(admin: AdminClient) -> None:
    loaded = load(
        admin,
        {
            "operation": "csv_data_load",
            "database": "dev",
            "table": "dog",
            "data": 'id,name,age,tags\n1,Penny,5,"[""calm""]"\n2,Kato,3,\n',
        },
    )
    assert loaded == {
        "message": "successfully loaded 2 of 2 records",
        "rows": 2,
        "written": 2,
        "skipped": 0,
        "failed": 0,
        "errors": [],
    }
    assert records(admin) == {
        1: {"id": 1, "name": "Penny", "age": 5, "tags": ["calm"]},
        2: {"id": 2, "name": "Kato", "age": 3},
    }
    again = load(
        admin,
        {"operation": "csv_data_load", "schema": "dev", "table": "dog", "data": "id,age\n1,9\n"},
    )
    assert (again["written"], again["skipped"]) == (0, 1)  # insert skips existing keys
    upserted = load(
        admin,
        {
            "operation": "csv_data_load",
            "action": "upsert",
            "database": "dev",
            "table": "dog",
            "data": "id,age\n2,4\n3,1\nnot,a,row\n",
        },
    )
    assert (upserted["rows"], upserted["written"], upserted["failed"]) == (3, 2, 1)
    assert upserted["errors"] == [{"line": 4, "message": "line 4 has 3 fields, the header has 2"}]
    assert records(admin) == {
        1: {"id": 1, "name": "Penny", "age": 5, "tags": ["calm"]},
        2: {"id": 2, "name": "Kato", "age": 4},
        3: {"id": 3, "age": 1},
    }
    updated = load(
        admin,
        {
            "operation": "csv_data_load",
            "action": "update",
            "database": "dev",
            "table": "dog",
            "data": "id,name\n3,Rex\n4,Ghost\n",
        },
    )
    assert (updated["written"], updated["skipped"]) == (1, 1)
    assert records(admin)[3] == {"id": 3, "age": 1, "name": "Rex"} and count(admin) == 3


def test_bad_csv_is_refused_and_loads_nothing(admin: AdminClient) -> None:
    # Refused at once (the body), or by the job (storage's checks of the CSV and table).
    cases: list[tuple[dict[str, Any], int | None, str]] = [
        ({"data": "name,age\nPenny,5\n", "action": "update"}, None, "no 'id' column"),
        ({"data": "id,name,name\n1,a,b\n"}, None, "names a column twice"),
        ({"data": ""}, None, "needs a header row"),
        ({"data": "id\n1\n", "action": "delete"}, INVALID_ARGUMENT, "insert, update or upsert"),
        ({"data": 42}, INVALID_ARGUMENT, "'data' must be a string"),
        ({}, INVALID_ARGUMENT, "'data' is required"),
        ({"data": "id\n1\n", "table": "cat"}, None, "cat"),
    ]
    for fields, code, words in cases:
        operation = {"operation": "csv_data_load", "database": "dev", "table": "dog", **fields}
        if code is None:
            assert words in load_error(admin, operation), fields
            continue
        result, got = admin.execute(operation)
        assert got == code and words in result["error"], (fields, result)
    assert count(admin) == 0 and records(admin) == {}


def test_csv_file_load_streams_a_large_file(admin: AdminClient, tmp_path: Path) -> None:
    path = tmp_path / "dogs.csv"
    rows = 20_000
    with path.open("w") as file:
        file.write("id,name,weight,good\n")
        for i in range(rows):
            file.write(f'{i},"dog, number {i}",{i / 10},{str(i % 2 == 0).lower()}\n')
    assert path.stat().st_size > 2 * CHUNK_BYTES  # several chunks on the way to storage
    loaded = load(
        admin,
        {"operation": "csv_file_load", "database": "dev", "table": "dog", "file_path": str(path)},
    )
    assert (loaded["rows"], loaded["written"], loaded["failed"]) == (rows, rows, 0)
    assert count(admin) == rows
    found = admin.ok(
        {"operation": "search_by_id", "database": "dev", "table": "dog", "ids": [0, 19_999]}
    )
    assert [without_timestamps(r) for r in found] == [
        {"id": 0, "name": "dog, number 0", "weight": 0, "good": True},
        {"id": 19_999, "name": "dog, number 19999", "weight": 1999.9, "good": False},
    ]


def test_csv_file_load_refusals(admin_node: Node, admin: AdminClient, tmp_path: Path) -> None:
    good = tmp_path / "dogs.csv"
    good.write_text("id\n1\n")
    cases: list[tuple[str, int, str]] = [
        (str(tmp_path / "missing.csv"), NOT_FOUND, "no file"),
        (str(tmp_path), INVALID_ARGUMENT, "is a directory"),
        ("dogs.csv", INVALID_ARGUMENT, "absolute path"),
    ]
    for path, code, words in cases:
        result, got = admin.execute(
            {"operation": "csv_file_load", "database": "dev", "table": "dog", "file_path": path}
        )
        assert got == code and words in result["error"], (path, result)
    result, got = admin.execute({"operation": "csv_file_load", "database": "dev", "table": "dog"})
    assert got == INVALID_ARGUMENT and "'file_path' is required" in result["error"]

    permission = {"dev": {"tables": {"dog": {"read": True, "insert": True, "update": True}}}}
    admin.ok({"operation": "add_role", "role": "loader", "permission": permission})
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw-ann", "role": "loader"})
    ann = admin_node.admin("ann", "pw-ann")
    result, got = ann.execute(
        {"operation": "csv_file_load", "database": "dev", "table": "dog", "file_path": str(good)}
    )
    assert got == PERMISSION_DENIED and "super user" in result["reason"]
    assert count(admin) == 0
    # The same user loads CSV text, with its own role checked by storage.
    data = {"operation": "csv_data_load", "database": "dev", "table": "dog", "data": "id\n7\n"}
    assert load(ann, data)["written"] == 1
    assert "ann" in load_error(ann, {**data, "table": "cat"})
    assert records(admin) == {7: {"id": 7}}


# -- revert ----------------------------------------------------------------------------------


def test_revert_restores_exactly_the_prior_records(admin: AdminClient) -> None:
    base = {
        1: {"id": 1, "name": "Penny", "age": 5},
        2: {"id": 2, "name": "Kato", "age": 3},
        3: {"id": 3, "name": "Rex", "tags": ["big"]},
    }
    admin.ok(
        {"operation": "insert", "database": "dev", "table": "dog", "records": list(base.values())}
    )

    # An update: one patch within existing attributes, one adding an attribute.
    admin.ok(
        {
            "operation": "update",
            "database": "dev",
            "table": "dog",
            "records": [{"id": 1, "age": 6, "color": "red"}, {"id": 2, "age": 4}],
        }
    )
    update = last_transaction(admin)
    reverted = admin.ok(
        {
            "operation": "revert_transaction",
            "database": "dev",
            "origin": update["origin"],
            "version": str(update["version"]),  # a string of digits is accepted too
        }
    )
    assert reverted["reverted"]["version"] == update["version"]
    assert [(r["hash_value"], r["operation"]) for r in reverted["records"]] == [
        (1, "update"),
        (2, "update"),
    ]
    assert reverted["message"].endswith("2 of 2 records set back")
    assert records(admin) == base

    # The revert is itself a logged transaction, naming what it reverted.
    entry = last_transaction(admin)
    assert entry["version"] == reverted["version"] and entry["origin"] == reverted["origin"]
    assert entry["reverts"] == {"origin": update["origin"], "version": update["version"]}
    assert entry["user_name"] == "admin" and sorted(entry["hash_values"]) == [1, 2]

    # A delete, reverted by its Harper timestamp (the origin left out).
    admin.ok({"operation": "delete", "database": "dev", "table": "dog", "ids": [3]})
    delete = last_transaction(admin)
    assert records(admin).keys() == {1, 2}
    restored = admin.ok(
        {"operation": "revert_transaction", "database": "dev", "timestamp": delete["timestamp"]}
    )
    assert [(r["hash_value"], r["operation"]) for r in restored["records"]] == [(3, "insert")]
    assert records(admin) == base

    # An insert: the records it created are deleted; reverting that revert brings them back.
    new = [{"id": 10, "name": "Ghost"}, {"id": 11, "name": "Nymeria"}]
    admin.ok({"operation": "insert", "database": "dev", "table": "dog", "records": new})
    insert = last_transaction(admin)
    result, code = revert(admin, insert)
    assert code == 0 and [r["operation"] for r in result["records"]] == ["delete", "delete"]
    assert records(admin) == base and count(admin) == 3
    undo = last_transaction(admin)
    result, code = revert(admin, undo)
    assert code == 0 and records(admin) == {**base, 10: new[0], 11: new[1]}


def test_revert_refuses_records_changed_later_unless_forced(admin: AdminClient) -> None:
    admin.ok(
        {
            "operation": "insert",
            "database": "dev",
            "table": "dog",
            "records": [{"id": 1, "v": 1}, {"id": 2, "v": 1}],
        }
    )
    insert = last_transaction(admin)
    admin.ok(
        {"operation": "update", "database": "dev", "table": "dog", "records": [{"id": 2, "v": 2}]}
    )
    later = last_transaction(admin)
    result, code = revert(admin, insert)
    assert code == FAILED_PRECONDITION
    assert f"dog 2 (changed by version {later['version']} of {later['origin']})" in result["error"]
    assert "force" in result["error"] and "dog 1 " not in result["error"]
    assert records(admin) == {1: {"id": 1, "v": 1}, 2: {"id": 2, "v": 2}}  # nothing changed

    forced = admin.ok(
        {
            "operation": "revert_transaction",
            "database": "dev",
            "origin": insert["origin"],
            "version": insert["version"],
            "force": True,
        }
    )
    assert [r["later_writes"] for r in forced["records"]] == [
        [],
        [{"origin": later["origin"], "version": later["version"], "timestamp": later["timestamp"]}],
    ]
    assert records(admin) == {} and count(admin) == 0

    # Reverting again finds nothing left to set back.
    again = admin.ok(
        {
            "operation": "revert_transaction",
            "database": "dev",
            "origin": insert["origin"],
            "version": insert["version"],
            "force": True,
        }
    )
    assert [r["operation"] for r in again["records"]] == ["unchanged", "unchanged"]
    assert again["version"] == 0


def test_revert_errors(admin_node: Node, admin: AdminClient) -> None:
    admin.ok({"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1}]})
    insert = last_transaction(admin)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"version": 12345, "origin": insert["origin"]}, NOT_FOUND, "no transaction"),
        ({"version": insert["version"], "origin": "elsewhere"}, NOT_FOUND, "no transaction"),
        ({"timestamp": 1.5}, NOT_FOUND, "no transaction"),
        ({"timestamp": 1e300}, INVALID_ARGUMENT, "Unix milliseconds"),
        ({"version": insert["version"], "database": "nope"}, NOT_FOUND, "nope"),
        ({"origin": insert["origin"]}, INVALID_ARGUMENT, "'version' (or 'timestamp')"),
        ({"version": -1}, INVALID_ARGUMENT, "'version' must be"),
        ({"version": insert["version"], "force": "yes"}, INVALID_ARGUMENT, "true or false"),
    ]
    for fields, code, words in cases:
        result, got = admin.execute(
            {"operation": "revert_transaction", "database": "dev", **fields}
        )
        assert got == code and words in result["error"], (fields, result)
    # The table's creation: logged (it replicates), but not an entry of Harper's
    # read_transaction_log, which shows record writes only; the typed log has it.
    assert all(e["hash_values"] for e in admin.ok(
        {"operation": "read_transaction_log", "database": "dev"}
    ))  # fmt: skip
    chunks = admin_node.client().stream(
        "ReadTransactionLog", spb.ReadTransactionLogRequest(database="dev")
    )
    creation = next(t for c in chunks for t in c.transactions if not t.writes)
    create = {"origin": creation.origin, "version": creation.version}
    result, code = revert(admin, create)
    assert code == INVALID_ARGUMENT and "wrote no records" in result["error"]

    # Storage checks the caller's role: reverting an insert needs delete on the table.
    permission = {"dev": {"tables": {"dog": {"read": True, "insert": True}}}}
    admin.ok({"operation": "add_role", "role": "writer", "permission": permission})
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw-ann", "role": "writer"})
    ann = admin_node.admin("ann", "pw-ann")
    result, code = revert(ann, insert)
    assert code == PERMISSION_DENIED and "may not delete from table dev.dog" in result["reason"]
    assert records(admin) == {1: {"id": 1}}
    permission["dev"]["tables"]["dog"]["delete"] = True
    admin.ok({"operation": "alter_role", "role": "writer", "permission": permission})
    result, code = revert(ann, insert)
    assert code == 0 and records(admin) == {}
    assert last_transaction(admin)["user_name"] == "ann"
