"""Harper's role format through Execute: `structure_user` (true, or a list of databases),
`super_user`, `cluster_user` and the built-in `cluster_user` role; list_users showing each
role's permission with the system tables as Harper does; and Harper's body for a
forbidden operation (PERMISSION_DENIED, `unauthorized_access`, `invalid_schema_items`)."""

from __future__ import annotations

from tests.conftest import MakeNode

PERMISSION_DENIED, INVALID_ARGUMENT = 7, 3
FORBIDDEN = (
    "This operation is not authorized due to role restrictions and/or invalid database items"
)
SYSTEM_TABLES = {"hdb_certificate", "hdb_nodes", "hdb_analytics", "hdb_raw_analytics"}


def test_harpers_role_format(make_node: MakeNode) -> None:
    node = make_node(services=("storage", "replicator", "admin"))
    admin = node.admin()
    admin.ok({"operation": "create_table", "database": "dev", "table": "dog"})
    admin.ok({"operation": "create_table", "database": "other", "table": "cat"})

    # Harper's documented body, structure_user false and empty attribute_permissions.
    developer = admin.ok(
        {
            "operation": "add_role",
            "role": "developer",
            "permission": {
                "super_user": False,
                "structure_user": False,
                "dev": {
                    "tables": {
                        "dog": {
                            "read": True,
                            "insert": True,
                            "update": True,
                            "delete": False,
                            "attribute_permissions": [],
                        }
                    }
                },
            },
        }
    )
    assert developer["role"] == "developer" and developer["id"] == "developer"
    assert developer["permission"]["structure_user"] is False
    assert developer["permission"]["super_user"] is False

    # structure_user as a list of databases: structure and every table of those only.
    builder = admin.ok(
        {"operation": "add_role", "role": "builder", "permission": {"structure_user": ["dev"]}}
    )
    assert builder["permission"]["structure_user"] == ["dev"]
    admin.ok(
        {"operation": "add_user", "username": "bob", "password": "pw-bob-1", "role": "builder"}
    )
    bob = node.admin("bob", "pw-bob-1")
    bob.ok({"operation": "create_table", "database": "dev", "table": "bird"})
    bob.ok({"operation": "insert", "database": "dev", "table": "bird", "records": [{"id": 1}]})
    assert bob.ok({"operation": "search_by_id", "database": "dev", "table": "bird", "ids": [1]})
    result, code = bob.execute({"operation": "create_table", "database": "other", "table": "x"})
    assert code == PERMISSION_DENIED, result
    assert result["error"] == FORBIDDEN
    assert result["unauthorized_access"] == [
        "Operation 'create_table' is restricted to 'super_user' roles"
    ]
    result, code = bob.execute(
        {"operation": "insert", "database": "other", "table": "cat", "records": [{"id": 1}]}
    )
    assert code == PERMISSION_DENIED
    assert result["unauthorized_access"] == [
        {
            "schema": "other",
            "table": "cat",
            "required_table_permissions": ["insert"],
            "required_attribute_permissions": [],
        }
    ]
    assert result["invalid_schema_items"] == []
    # A database the role can read nothing of is, to it, a database that does not exist.
    result, code = bob.execute({"operation": "describe_database", "database": "other"})
    assert code == PERMISSION_DENIED, result
    assert result["unauthorized_access"] == []
    assert result["invalid_schema_items"] == ["database 'other' does not exist"]

    # structure_user true: every database.
    admin.ok({"operation": "add_role", "role": "architect", "permission": {"structure_user": True}})
    admin.ok(
        {"operation": "add_user", "username": "cy", "password": "pw-cy-123", "role": "architect"}
    )
    node.admin("cy", "pw-cy-123").ok(
        {"operation": "create_table", "database": "other", "table": "y"}
    )

    # A bad structure_user is refused, naming the key.
    result, code = admin.execute(
        {"operation": "add_role", "role": "bad", "permission": {"structure_user": "dev"}}
    )
    assert code == INVALID_ARGUMENT and "structure_user" in result["error"]

    # The built-in cluster_user role, and a role of Harper's cluster_user kind.
    roles = {r["role"]: r for r in admin.ok({"operation": "list_roles"})}
    assert roles["cluster_user"]["permission"]["cluster_user"] is True
    assert roles["super_user"]["permission"]["super_user"] is True
    result, code = admin.execute({"operation": "drop_role", "id": "cluster_user"})
    assert code == INVALID_ARGUMENT
    admin.ok(
        {
            "operation": "add_user",
            "username": "nod",
            "password": "pw-nod-12",
            "role": "cluster_user",
        }
    )
    nod = node.admin("nod", "pw-nod-12")
    nod.ok({"operation": "insert", "database": "other", "table": "cat", "records": [{"id": 5}]})
    result, code = nod.execute(
        {"operation": "add_user", "username": "z", "password": "z-pass-1", "role": "x"}
    )
    assert code == PERMISSION_DENIED
    assert result == {
        "error": FORBIDDEN,
        "unauthorized_access": ["Operation 'add_user' is restricted to 'super_user' roles"],
        "invalid_schema_items": [],
        "reason": result["reason"],
    }

    # list_users: each role with its permission and the system tables, as Harper shows them.
    users = {u["username"]: u for u in admin.ok({"operation": "list_users"})}
    assert set(users["bob"]) == {"username", "active", "role"}
    role = users["bob"]["role"]
    assert role["role"] == role["id"] == "builder"
    system = role["permission"]["system"]["tables"]
    assert set(system) == SYSTEM_TABLES
    assert system["hdb_nodes"] == {
        "read": False,
        "insert": False,
        "update": False,
        "delete": False,
        "attribute_permissions": [],
    }
    admin_tables = users["admin"]["role"]["permission"]["system"]["tables"]
    assert all(t["read"] is True for t in admin_tables.values())
    assert users["nod"]["role"]["permission"]["cluster_user"] is True
