"""The registry of Harper's operations, without a node: the access check comes before the
body is read, parsers validate with the same messages, and the write table answers in
Harper's shapes."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.admin.node import Caller
from services.admin.operations import OPERATIONS, Body, Execute, answer, run
from services.admin.operations.data import WRITES
from services.common.auth import Identity
from services.common.errors import InvalidArgument

CODE_INVALID_ARGUMENT = 3
CODE_PERMISSION_DENIED = 7


class FakeExecute:
    """What the handlers under test use of an Execute call: the caller and storage."""

    def __init__(self, super_user: bool = True, reply: Any = None) -> None:
        self.caller = Caller(Identity("alice", super_user=super_user), ())
        self.reply = reply
        self.calls: list[tuple[str, Any]] = []

    async def storage(self, method: str, request: Any) -> Any:
        self.calls.append((method, request))
        return self.reply


async def run_json(ex: FakeExecute, operation: dict[str, Any]) -> tuple[Any, int]:
    return await run(cast(Execute, ex), orjson.dumps(operation))


def test_every_operation_has_a_parser_and_a_handler() -> None:
    for name, operation in OPERATIONS.items():
        assert callable(operation.parse), name
        assert callable(operation.handle), name
    assert set(WRITES) <= set(OPERATIONS)


async def test_unknown_and_missing_operations_answer_harpers_text() -> None:
    result, code = await run_json(FakeExecute(), {"operation": "nope"})
    assert code == CODE_INVALID_ARGUMENT
    assert result == {"error": "Operation 'nope' not found"}
    result, code = await run_json(FakeExecute(), {})
    assert result == {"error": "'operation' is required"}


async def test_a_super_user_operation_is_refused_before_its_body_is_read() -> None:
    result, code = await run_json(
        FakeExecute(super_user=False), {"operation": "get_backup", "database": 1}
    )
    assert code == CODE_PERMISSION_DENIED
    assert result == {
        "error": "This operation is not authorized due to role restrictions and/or invalid"
        " database items",
        "unauthorized_access": ["Operation 'get_backup' is restricted to 'super_user' roles"],
        "invalid_schema_items": [],
        "reason": "get_backup needs a super user; alice is not one",
    }


async def test_replicated_needs_a_super_user_only_when_asked_for() -> None:
    ex = FakeExecute(super_user=False, reply=spb.CreateDatabaseResponse())
    result, code = await run_json(ex, {"operation": "create_database", "replicated": True})
    assert code == CODE_PERMISSION_DENIED
    assert (
        result["reason"] == "create_database with 'replicated' needs a super user; alice is not one"
    )
    result, code = await run_json(ex, {"operation": "create_schema", "schema": "dev"})
    assert (result, code) == ({"message": "database 'dev' successfully created"}, 0)
    assert ex.calls == [("CreateDatabase", spb.CreateDatabaseRequest(database="dev"))]


@pytest.mark.parametrize(
    ("operation", "error"),
    [
        ({"operation": "insert", "records": []}, "insert: 'table' is required"),
        ({"operation": "update", "table": "t"}, "update: 'records' is required"),
        (
            {"operation": "upsert", "table": "t", "records": [1]},
            "upsert: every record must be a JSON object",
        ),
        ({"operation": "delete", "table": "t", "ids": 1}, "delete: 'ids' must be an array"),
        ({"operation": "search_by_value", "table": "t"}, "search_by_value: 'value' is required"),
        (
            {"operation": "read_audit_log", "table": "t", "search_type": "x"},
            "read_audit_log: 'search_type' must be hash_value, username or timestamp",
        ),
    ],
)
async def test_parsers_refuse_with_the_operation_and_field_named(
    operation: dict[str, Any], error: str
) -> None:
    ex = FakeExecute()
    assert await run_json(ex, operation) == ({"error": error}, CODE_INVALID_ARGUMENT)
    assert ex.calls == []


def test_a_write_parses_into_its_storage_request() -> None:
    body = Body(
        {
            "operation": "delete",
            "schema": "s",
            "table": "t",
            "hash_values": [1, "a"],
            "replicated_confirmation": 2,
            "replicateTo": ["b"],
        }
    )
    request = OPERATIONS["delete"].parse(body)
    assert request.message == spb.DeleteRequest(
        database="s",
        table="t",
        ids=[b"1", b'"a"'],
        replicated_confirmation=2,
        replicate_to=types_pb2.ReplicateTo(nodes=["b"]),
    )
    with pytest.raises(InvalidArgument, match="insert: 'replicateTo' must be a number"):
        OPERATIONS["insert"].parse(
            Body({"operation": "insert", "table": "t", "records": [], "replicateTo": 0})
        )


@pytest.mark.parametrize(
    ("name", "reply", "expected"),
    [
        (
            "insert",
            spb.InsertResponse(inserted_ids=[b"1"], skipped_ids=[b"2"]),
            {"message": "inserted 1 of 2 records", "inserted_hashes": [1], "skipped_hashes": [2]},
        ),
        (
            "update",
            spb.UpdateResponse(updated_ids=[b"1", b"2"]),
            {"message": "updated 2 of 2 records", "update_hashes": [1, 2], "skipped_hashes": []},
        ),
        (
            "upsert",
            spb.UpsertResponse(upserted_ids=[b'"a"']),
            {"message": "upserted 1 of 1 records", "upserted_hashes": ["a"]},
        ),
        (
            "delete",
            spb.DeleteResponse(deleted_ids=[], skipped_ids=[b"3"]),
            {
                "message": "0 of 1 records successfully deleted",
                "deleted_hashes": [],
                "skipped_hashes": [3],
            },
        ),
    ],
)
async def test_the_write_table_answers_in_harpers_shapes(
    name: str, reply: Any, expected: dict[str, Any]
) -> None:
    ex = FakeExecute(reply=reply)
    field = "ids" if name == "delete" else "records"
    result, code = await run_json(ex, {"operation": name, "table": "t", field: []})
    assert (result, code) == (expected, 0)
    assert list(result) == list(expected)  # the keys in Harper's order
    assert ex.calls[0][0] == WRITES[name].rpc


def test_an_answer_too_deep_for_json_is_data_loss() -> None:
    deep: Any = []
    for _ in range(600):
        deep = [deep]
    response = answer(deep, 0)
    assert response.code == 15
    assert b"nested deeper than JSON output allows" in response.result
