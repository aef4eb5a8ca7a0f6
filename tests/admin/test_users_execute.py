"""Users and roles through Execute, and roles enforced on operations run by the admin."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import MakeNode

PERMISSION_DENIED, NOT_FOUND = 7, 5


def test_users_and_roles_through_execute(make_node: MakeNode) -> None:
    node = make_node(services=("storage", "replicator", "admin"))
    admin = node.admin()
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog"})
    admin.ok({"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1}]})
    permission = {
        "super_user": False,
        "dev": {
            "tables": {"dog": {"read": True, "insert": False, "update": False, "delete": False}}
        },
    }
    role = admin.ok({"operation": "add_role", "role": "reader", "permission": permission})
    assert role["role"] == "reader" and role["permission"]["dev"]["tables"]["dog"]["read"] is True
    assert admin.ok(
        {"operation": "add_user", "username": "ann", "password": "pw-ann", "role": "reader"}
    ) == {"message": "ann successfully added"}
    users = {u["username"]: u for u in admin.ok({"operation": "list_users"})}
    assert users["ann"]["role"]["role"] == "reader" and users["ann"]["active"] is True
    assert {r["role"] for r in admin.ok({"operation": "list_roles"})} >= {"reader", "super_user"}

    ann = node.admin("ann", "pw-ann")
    by_id = {"operation": "search_by_id", "database": "dev", "table": "dog", "ids": [1]}
    assert ann.ok({**by_id, "get_attributes": ["id"]}) == [{"id": 1}]
    result, code = ann.execute(
        {"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 2}]}
    )
    assert code == PERMISSION_DENIED and "ann" in result["reason"]
    result, code = ann.execute({"operation": "cluster_status"})
    assert code == PERMISSION_DENIED and "super user" in result["reason"]
    assert ann.ok({"operation": "user_info"})["username"] == "ann"
    assert admin.ok(
        {
            "operation": "search_by_value",
            "database": "dev",
            "table": "dog",
            "attribute": "id",
            "value": "*",
            "get_attributes": ["id"],
        }
    ) == [{"id": 1}]

    admin.ok({"operation": "alter_user", "username": "ann", "active": False})
    with pytest.raises(grpc.RpcError) as refused:  # not authenticated: the call itself fails
        ann.execute({"operation": "user_info"})
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    result, code = admin.execute({"operation": "drop_role", "id": "nope"})
    assert code == NOT_FOUND
    assert admin.ok({"operation": "drop_user", "username": "ann"}) == {
        "message": "ann successfully deleted"
    }
    assert admin.ok({"operation": "drop_role", "id": "reader"}) == {
        "message": "reader successfully deleted"
    }
