"""Users, roles and permission checks of the storage service (Harper semantics: local to
each node, never replicated), and the sign-in lockout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import timestamp_pb2
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.common.errors import retry_delay_s
from tests.conftest import MakeCluster, MakeNode
from tests.harness.client import StorageClient, cond, error_info, ids
from tests.harness.node import Node
from tests.harness.wait import wait_for

DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
FAILED_SIGN_IN = "Login failed"
READER_PASSWORD = "reader-password"


def tables(**per_table: dict[str, bool]) -> dict[str, Any]:
    """A permission granting flags on tables of ``dev``: ``tables(dog={"read": True})``."""
    return {"super_user": False, "dev": {"tables": per_table}}


def full(permission: dict[str, Any]) -> dict[str, Any]:
    """The normalized form storage returns: every table flag spelled out."""
    out: dict[str, Any] = {"super_user": permission.get("super_user", False)}
    for database, value in permission.items():
        if database == "super_user":
            continue
        out[database] = {
            "tables": {
                table: {a: flags.get(a, False) for a in ("read", "insert", "update", "delete")}
                for table, flags in value["tables"].items()
            }
        }
    return out


def add_role(client: StorageClient, name: str, permission: dict[str, Any]) -> pb.Role:
    request = pb.AddRoleRequest(name=name, permission=orjson.dumps(permission))
    return client.call("AddRole", request).role


def add_user(
    client: StorageClient,
    name: str,
    role: str,
    password: str = READER_PASSWORD,
    active: bool | None = None,
) -> pb.User:
    request = pb.AddUserRequest(username=name, password=password, role=role)
    if active is not None:
        request.active = active
    return client.call("AddUser", request).user


def users(client: StorageClient) -> list[tuple[str, str, bool]]:
    return [
        (u.username, u.role, u.active)
        for u in client.call("ListUsers", pb.ListUsersRequest()).users
    ]


def roles(client: StorageClient) -> dict[str, Any]:
    """The roles but the built-in cluster_user (Harper's), which is always there."""
    reply = client.call("ListRoles", pb.ListRolesRequest())
    listed = {r.name: orjson.loads(r.permission) for r in reply.roles}
    assert listed.pop("cluster_user") == {"cluster_user": True, "super_user": False}
    return listed


def whoami(client: StorageClient) -> pb.AuthenticateResponse:
    return client.call("Authenticate", pb.AuthenticateRequest())


def alter_user(client: StorageClient, name: str, **fields: Any) -> pb.User:
    return client.call("AlterUser", pb.AlterUserRequest(username=name, **fields)).user


def state(admin: StorageClient, database: str = "dev") -> Any:
    """Everything a refused write could have changed."""
    described = admin.call("DescribeDatabase", pb.DescribeDatabaseRequest(database=database))
    return (
        {t.name: admin.all_records(database, t.name) for t in described.database.tables},
        [
            (t.name, t.record_count, [a.name for a in t.attributes])
            for t in described.database.tables
        ],
        len(admin.transactions(database)),
    )


def csv(*lines: str) -> Iterator[pb.LoadCsvRequest]:
    yield pb.LoadCsvRequest(header=pb.LoadCsvHeader(database="dev", table="dog"))
    yield pb.LoadCsvRequest(chunk="\n".join(lines).encode())


def csv_with(
    operation: types_pb2.Operation.ValueType, table: str, *lines: str
) -> Iterator[pb.LoadCsvRequest]:
    yield pb.LoadCsvRequest(
        header=pb.LoadCsvHeader(database="dev", table=table, operation=operation)
    )
    yield pb.LoadCsvRequest(chunk="\n".join(lines).encode())


@pytest.fixture
def dev(client: StorageClient) -> StorageClient:
    """``dev.dog`` and ``dev.cat`` with a record each, plus ``other.bird``."""
    client.create_table("dev", "dog", indexed=["name"])
    client.create_table("dev", "cat")
    client.create_table("other", "bird")
    client.insert("dev", "dog", [{"id": 1, "name": "Penny"}])
    client.insert("dev", "cat", [{"id": 1, "name": "Tom"}])
    return client


def denied(client: StorageClient, method: str, request: Any, *words: str) -> None:
    error = client.expect(DENIED, method, request, *words)
    info = error_info(error)
    assert (info.domain, info.reason) == ("shoal", "PERMISSION_DENIED")


# -- users -----------------------------------------------------------------------------


def test_users_are_added_listed_altered_and_dropped(node: Node, client: StorageClient) -> None:
    add_role(client, "reader", tables(dog={"read": True}))
    added = add_user(client, "bob", "reader")
    assert (added.username, added.role, added.active) == ("bob", "reader", True)
    # A user message never carries a password or hash.
    assert {f.name for f in pb.User.DESCRIPTOR.fields} == {"username", "role", "active"}
    inactive = add_user(client, "carol", "reader", active=False)
    assert inactive.active is False
    assert users(client) == [
        ("admin", "super_user", True),
        ("bob", "reader", True),
        ("carol", "reader", False),
    ]

    bob = node.client("bob", READER_PASSWORD)
    me = whoami(bob)
    assert (me.username, me.role, me.super_user, me.internal) == ("bob", "reader", False, False)
    assert orjson.loads(me.permission) == full(tables(dog={"read": True}))
    node.client("carol", READER_PASSWORD).expect(
        UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN
    )

    # A new password takes effect at once, although the old one was cached.
    changed = alter_user(client, "bob", password="new-password")
    assert (changed.username, changed.role, changed.active) == ("bob", "reader", True)
    bob.expect(UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN)
    bob = node.client("bob", "new-password")
    assert whoami(bob).username == "bob"

    # So do the role and the active flag.
    assert alter_user(client, "bob", role="super_user").role == "super_user"
    assert whoami(bob).super_user is True
    assert alter_user(client, "bob", role="reader").role == "reader"
    assert whoami(bob).super_user is False
    assert alter_user(client, "bob", active=False).active is False
    bob.expect(UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN)
    assert alter_user(client, "carol", active=True).active is True
    assert whoami(node.client("carol", READER_PASSWORD)).username == "carol"

    # Users and roles survive a restart.
    node.restart("storage")
    assert users(node.client()) == [
        ("admin", "super_user", True),
        ("bob", "reader", False),
        ("carol", "reader", True),
    ]
    carol = node.client("carol", READER_PASSWORD)
    assert orjson.loads(whoami(carol).permission) == full(tables(dog={"read": True}))

    node.client().call("DropUser", pb.DropUserRequest(username="carol"))
    carol.expect(UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN)
    assert [u[0] for u in users(node.client())] == ["admin", "bob"]


def test_user_rpc_errors(node: Node, client: StorageClient) -> None:
    add_role(client, "reader", tables(dog={"read": True}))
    add_user(client, "bob", "reader")
    before = users(client)

    def add(username: str, password: str, role: str) -> pb.AddUserRequest:
        return pb.AddUserRequest(username=username, password=password, role=role)

    client.expect(INVALID, "AddUser", add("", "pw", "reader"), "user name is required")
    client.expect(INVALID, "AddUser", add("bad name", "pw", "reader"), "invalid user name")
    client.expect(INVALID, "AddUser", add("a:b", "pw", "reader"), "invalid user name")
    client.expect(INVALID, "AddUser", add("dave", "", "reader"), "password")
    client.expect(INVALID, "AddUser", add("dave", "pw", ""), "role is required")
    client.expect(NOT_FOUND, "AddUser", add("dave", "pw", "writer"), "role", "writer")
    client.expect(EXISTS, "AddUser", add("bob", "pw", "reader"), "bob")
    client.expect(EXISTS, "AddUser", add("admin", "pw", "super_user"), "admin")

    alter = pb.AlterUserRequest
    client.expect(NOT_FOUND, "AlterUser", alter(username="dave", active=True), "dave")
    client.expect(INVALID, "AlterUser", alter(username="bob"), "nothing to change")
    client.expect(INVALID, "AlterUser", alter(username="bob", password=""), "password")
    client.expect(INVALID, "AlterUser", alter(username="bob", role=""), "role")
    client.expect(NOT_FOUND, "AlterUser", alter(username="bob", role="writer"), "writer")
    client.expect(INVALID, "AlterUser", alter(username="no such", active=True), "user name")

    client.expect(NOT_FOUND, "DropUser", pb.DropUserRequest(username="dave"), "dave")
    client.expect(INVALID, "DropUser", pb.DropUserRequest(username=""), "user name")
    # Nothing changed, and bob's password is still the old one.
    assert users(client) == before
    assert whoami(node.client("bob", READER_PASSWORD)).role == "reader"


def test_last_active_super_user_is_protected(node: Node, client: StorageClient) -> None:
    add_role(client, "reader", tables(dog={"read": True}))
    last = "without an active super user"
    for method, request in [
        ("DropUser", pb.DropUserRequest(username="admin")),
        ("AlterUser", pb.AlterUserRequest(username="admin", role="reader")),
        ("AlterUser", pb.AlterUserRequest(username="admin", active=False)),
    ]:
        error = client.expect(PRECONDITION, method, request, last)
        assert error_info(error).reason == "LAST_SUPER_USER"
    # An inactive super user does not count.
    add_user(client, "sleeper", "super_user", active=False)
    client.expect(PRECONDITION, "DropUser", pb.DropUserRequest(username="admin"), last)
    # A custom role with super_user counts; removing super_user from it is checked too.
    add_role(client, "ops", {"super_user": True})
    add_user(client, "op", "ops", password="op-password")
    op = node.client("op", "op-password")
    assert whoami(op).super_user is True
    op.call("DropUser", pb.DropUserRequest(username="admin"))
    assert [u[0] for u in users(op)] == ["op", "sleeper"]
    error = op.expect(
        PRECONDITION,
        "AlterRole",
        pb.AlterRoleRequest(name="ops", permission=orjson.dumps(tables(dog={"read": True}))),
        last,
    )
    assert error_info(error).reason == "LAST_SUPER_USER"
    op.expect(PRECONDITION, "DropUser", pb.DropUserRequest(username="op"), last)
    # With another active super user, the role can lose super_user.
    alter_user(op, "sleeper", active=True)
    op.call("AlterRole", pb.AlterRoleRequest(name="ops", permission=b'{"super_user": false}'))
    assert whoami(op).super_user is False
    denied(op, "ListUsers", pb.ListUsersRequest(), "'op'", "list users", "super user")


# -- roles -----------------------------------------------------------------------------


def test_roles_are_added_listed_altered_and_dropped(client: StorageClient) -> None:
    assert roles(client) == {"super_user": {"super_user": True}}
    permission = {
        "dev": {"tables": {"dog": {"read": True, "insert": True, "attribute_permissions": []}}}
    }
    role = add_role(client, "writer", permission)
    assert role.name == "writer"
    assert orjson.loads(role.permission) == {
        "super_user": False,
        "dev": {
            "tables": {"dog": {"read": True, "insert": True, "update": False, "delete": False}}
        },
    }
    add_role(client, "empty", {})
    assert roles(client) == {
        "empty": {"super_user": False},
        "super_user": {"super_user": True},
        "writer": orjson.loads(role.permission),
    }
    altered = client.call(
        "AlterRole",
        pb.AlterRoleRequest(name="writer", permission=orjson.dumps(tables(cat={"delete": True}))),
    ).role
    assert orjson.loads(altered.permission) == full(tables(cat={"delete": True}))
    assert roles(client)["writer"] == full(tables(cat={"delete": True}))

    add_user(client, "bob", "writer")
    error = client.expect(
        PRECONDITION, "DropRole", pb.DropRoleRequest(name="writer"), "writer", "bob"
    )
    assert error_info(error).reason == "ROLE_IN_USE"
    client.call("DropRole", pb.DropRoleRequest(name="empty"))
    client.call("DropUser", pb.DropUserRequest(username="bob"))
    client.call("DropRole", pb.DropRoleRequest(name="writer"))
    assert roles(client) == {"super_user": {"super_user": True}}


def test_role_rpc_errors(client: StorageClient) -> None:
    add_role(client, "reader", tables(dog={"read": True}))
    before = roles(client)

    def add(name: str, permission: bytes) -> pb.AddRoleRequest:
        return pb.AddRoleRequest(name=name, permission=permission)

    client.expect(INVALID, "AddRole", add("", b"{}"), "role name is required")
    client.expect(INVALID, "AddRole", add("bad role", b"{}"), "invalid role name")
    client.expect(INVALID, "AddRole", add("r", b""), "permission is required")
    client.expect(INVALID, "AddRole", add("r", b"{nope"), "not valid JSON")
    client.expect(INVALID, "AddRole", add("r", b"[]"), "JSON object")
    bad_keys = [
        ({"super_user": "yes"}, "super_user"),
        ({"dev": True}, "dev"),
        ({"dev": {"tables": {"dog": {"read": True}}, "views": {}}}, "dev.views"),
        ({"dev": {"tables": []}}, "dev.tables"),
        ({"dev": {"tables": {"dog": {"drop": True}}}}, "dev.tables.dog.drop"),
        ({"dev": {"tables": {"dog": {"read": 1}}}}, "dev.tables.dog.read"),
        ({"dev": {"tables": {"dog": []}}}, "dev.tables.dog"),
        ({"dev": {"tables": {"bad name": {}}}}, "dev.tables.bad name"),
        ({"bad db": {"tables": {}}}, "bad db"),
        (
            {"dev": {"tables": {"dog": {"attribute_permissions": [{"attribute_name": "x"}]}}}},
            "dev.tables.dog.attribute_permissions",
        ),
    ]
    for permission, key in bad_keys:
        client.expect(INVALID, "AddRole", add("r", orjson.dumps(permission)), f"'{key}'")
    client.expect(EXISTS, "AddRole", add("reader", b"{}"), "reader")
    client.expect(EXISTS, "AddRole", add("super_user", b'{"super_user": true}'), "super_user")

    alter = pb.AlterRoleRequest
    client.expect(NOT_FOUND, "AlterRole", alter(name="writer", permission=b"{}"), "writer")
    client.expect(INVALID, "AlterRole", alter(name="super_user", permission=b"{}"), "built-in")
    client.expect(
        INVALID,
        "AlterRole",
        alter(name="reader", permission=b'{"dev": {"tables": {"dog": {"read": "yes"}}}}'),
        "dev.tables.dog.read",
    )
    client.expect(NOT_FOUND, "DropRole", pb.DropRoleRequest(name="writer"), "writer")
    client.expect(INVALID, "DropRole", pb.DropRoleRequest(name="super_user"), "built-in")
    client.expect(INVALID, "DropRole", pb.DropRoleRequest(name=""), "role name")
    assert roles(client) == before


def test_user_and_role_rpcs_need_a_super_user(node: Node, client: StorageClient) -> None:
    add_role(client, "reader", tables(dog={"read": True}))
    add_user(client, "bob", "reader")
    bob = node.client("bob", READER_PASSWORD)
    calls = [
        (
            "AddUser",
            pb.AddUserRequest(username="eve", password="pw", role="super_user"),
            "add users",
        ),
        ("AlterUser", pb.AlterUserRequest(username="bob", role="super_user"), "alter users"),
        ("DropUser", pb.DropUserRequest(username="admin"), "drop users"),
        ("ListUsers", pb.ListUsersRequest(), "list users"),
        (
            "AddRole",
            pb.AddRoleRequest(name="evil", permission=b'{"super_user": true}'),
            "add roles",
        ),
        ("AlterRole", pb.AlterRoleRequest(name="reader", permission=b"{}"), "alter roles"),
        ("DropRole", pb.DropRoleRequest(name="reader"), "drop roles"),
        ("ListRoles", pb.ListRolesRequest(), "list roles"),
    ]
    for method, request, action in calls:
        denied(bob, method, request, "'bob'", action, "super user")
    assert users(client) == [("admin", "super_user", True), ("bob", "reader", True)]
    assert roles(client) == {
        "reader": full(tables(dog={"read": True})),
        "super_user": {"super_user": True},
    }
    # The node-internal identity may administer users (the admin service calls as it).
    internal = node.internal_client()
    add_user(internal, "eve", "reader")
    assert [u[0] for u in users(internal)] == ["admin", "bob", "eve"]


def test_authenticate_returns_the_callers_identity(node: Node, client: StorageClient) -> None:
    me = whoami(client)
    assert (me.username, me.role, me.super_user, me.internal) == (
        "admin",
        "super_user",
        True,
        False,
    )
    assert orjson.loads(me.permission) == {"super_user": True}
    internal = whoami(node.internal_client())
    assert (internal.username, internal.role, internal.super_user, internal.internal) == (
        "node:" + node.name,
        "",
        True,
        True,
    )
    assert orjson.loads(internal.permission) == {"super_user": True}
    add_role(client, "nothing", {})
    add_user(client, "nobody", "nothing")
    nobody = whoami(node.client("nobody", READER_PASSWORD))
    assert (nobody.username, nobody.role, nobody.super_user) == ("nobody", "nothing", False)
    assert orjson.loads(nobody.permission) == {"super_user": False}
    node.client("nobody", "wrong").expect(
        UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN
    )


# -- enforcement -----------------------------------------------------------------------


def test_a_read_only_role_can_read_but_not_write(node: Node, dev: StorageClient) -> None:
    add_role(dev, "reader", tables(dog={"read": True}))
    add_user(dev, "bob", "reader")
    bob = node.client("bob", READER_PASSWORD)
    assert bob.get("dev", "dog", [1]) == [{"id": 1, "name": "Penny"}]
    assert bob.by_value("dev", "dog", "name", "Pen*") == [{"id": 1, "name": "Penny"}]
    assert bob.by_conditions("dev", "dog", [cond("id", "equals", 1)]) == [
        {"id": 1, "name": "Penny"}
    ]
    assert bob.describe("dev", "dog").record_count == 1
    before = state(dev)

    record = [orjson.dumps({"id": 2, "name": "Kato"})]
    writes = [
        ("Insert", pb.InsertRequest(database="dev", table="dog", records=record), "insert into"),
        ("Update", pb.UpdateRequest(database="dev", table="dog", records=record), "update"),
        ("Upsert", pb.UpsertRequest(database="dev", table="dog", records=record), "upsert into"),
        ("Delete", pb.DeleteRequest(database="dev", table="dog", ids=ids([1])), "delete from"),
    ]
    for method, request, action in writes:
        denied(bob, method, request, "'bob'", action, "dev.dog")
    denied_csv = bob.expect(DENIED, "LoadCsv", csv("id,name", "3,Rex"), "'bob'", "insert into")
    assert error_info(denied_csv).reason == "PERMISSION_DENIED"
    operation = pb.TransactOperation(
        table="dog", operation=types_pb2.OPERATION_DELETE, ids=ids([1])
    )
    denied(
        bob,
        "Transact",
        pb.TransactRequest(database="dev", operations=[operation]),
        "'bob'",
        "delete from",
        "dev.dog",
    )
    schema = [
        ("CreateDatabase", pb.CreateDatabaseRequest(database="x"), "create database x"),
        ("DropDatabase", pb.DropDatabaseRequest(database="dev"), "drop database dev"),
        ("CreateTable", pb.CreateTableRequest(database="dev", table="x"), "create table dev.x"),
        ("DropTable", pb.DropTableRequest(database="dev", table="dog"), "drop table dev.dog"),
        (
            "CreateAttribute",
            pb.CreateAttributeRequest(database="dev", table="dog", attribute="age", indexed=True),
            "create attribute dev.dog.age",
        ),
        (
            "DropAttribute",
            pb.DropAttributeRequest(database="dev", table="dog", attribute="name"),
            "drop attribute dev.dog.name",
        ),
    ]
    for method, request, action in schema:
        denied(bob, method, request, "'bob'", action, "super user")
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    logs = [
        ("ReadTransactionLog", pb.ReadTransactionLogRequest(database="dev"), "transaction log"),
        ("ReadAuditLog", pb.ReadAuditLogRequest(database="dev", table="dog"), "audit log"),
        ("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=now), "delete log"),
    ]
    for method, request, action in logs:
        denied(bob, method, request, "'bob'", action, "super user")
    # The node-internal RPCs are not on the client port at all.
    bob.expect(grpc.StatusCode.UNIMPLEMENTED, "GetPositions", pb.GetPositionsRequest())
    # Nothing changed: records, counts, attributes and the log.
    assert state(dev) == before
    assert len(dev.transactions("other")) == 1  # its table creation only
    assert sorted(d.name for d in dev.call("DescribeAll", pb.DescribeAllRequest()).databases) == [
        "dev",
        "other",
    ]


def test_permissions_are_per_table(node: Node, dev: StorageClient) -> None:
    add_role(
        dev,
        "dogs",
        tables(dog={"read": True, "insert": True, "update": True}, cat={"insert": True}),
    )
    add_user(dev, "bob", "dogs")
    bob = node.client("bob", READER_PASSWORD)
    bob.insert("dev", "dog", [{"id": 2, "name": "Kato"}])
    bob.upsert("dev", "dog", [{"id": 3, "name": "Rex"}])
    bob.update("dev", "dog", [{"id": 1, "age": 5}])
    assert bob.all_records("dev", "dog") == [
        {"id": 1, "name": "Penny", "age": 5},
        {"id": 2, "name": "Kato"},
        {"id": 3, "name": "Rex"},
    ]
    bob.insert("dev", "cat", [{"id": 2, "name": "Felix"}])
    before = state(dev)
    denied(
        bob,
        "SearchById",
        pb.SearchByIdRequest(database="dev", table="cat", ids=ids([1])),
        "'bob'",
        "read table dev.cat",
    )
    record = [orjson.dumps({"id": 9})]
    denied(
        bob,
        "Upsert",
        pb.UpsertRequest(database="dev", table="cat", records=record),
        "'bob'",
        "upsert into table dev.cat",
        "insert and update",
    )
    denied(
        bob,
        "Delete",
        pb.DeleteRequest(database="dev", table="dog", ids=ids([1])),
        "delete from table dev.dog",
    )
    denied(
        bob,
        "Insert",
        pb.InsertRequest(database="other", table="bird", records=record),
        "insert into table other.bird",
    )
    # Refused before anything is looked up: a table that does not exist is not revealed.
    denied(
        bob,
        "Insert",
        pb.InsertRequest(database="dev", table="ghost", records=record),
        "insert into table dev.ghost",
    )
    denied(
        bob,
        "SearchByValue",
        pb.SearchByValueRequest(database="nope", table="ghost", attribute="id", value=b'"*"'),
        "read table nope.ghost",
    )
    # A super user still gets NOT_FOUND there.
    dev.expect(NOT_FOUND, "SearchById", pb.SearchByIdRequest(database="dev", table="ghost"))
    # LoadCsv is checked against its operation.
    reply = bob.call("LoadCsv", csv("id,name", "4,Bo"))
    assert (reply.rows, reply.written) == (1, 1)
    bob.expect(
        DENIED,
        "LoadCsv",
        csv_with(types_pb2.OPERATION_UPSERT, "cat", "id,name", "5,Max"),
        "upsert into table dev.cat",
    )
    bob.call("LoadCsv", csv_with(types_pb2.OPERATION_UPDATE, "dog", "id,name", "4,Boo"))
    assert bob.get("dev", "dog", [4, 5]) == [{"id": 4, "name": "Boo"}]
    after = state(dev)
    assert after[0]["cat"] == before[0]["cat"]
    assert dev.all_records("other", "bird") == []


def test_role_changes_apply_to_the_next_call(node: Node, dev: StorageClient) -> None:
    add_role(dev, "reader", tables(dog={"read": True}))
    add_user(dev, "bob", "reader")
    bob = node.client("bob", READER_PASSWORD)
    assert bob.get("dev", "dog", [1]) == [{"id": 1, "name": "Penny"}]  # signed in and cached
    denied(
        bob,
        "Insert",
        pb.InsertRequest(database="dev", table="dog", records=[b'{"id": 2}']),
        "insert into table dev.dog",
    )
    dev.call(
        "AlterRole",
        pb.AlterRoleRequest(
            name="reader", permission=orjson.dumps(tables(dog={"read": True, "insert": True}))
        ),
    )
    assert list(bob.insert("dev", "dog", [{"id": 2}]).inserted_ids) == [b"2"]
    dev.call(
        "AlterRole",
        pb.AlterRoleRequest(name="reader", permission=orjson.dumps(tables(cat={"read": True}))),
    )
    denied(
        bob,
        "SearchById",
        pb.SearchByIdRequest(database="dev", table="dog", ids=ids([1])),
        "read table dev.dog",
    )
    assert bob.get("dev", "cat", [1]) == [{"id": 1, "name": "Tom"}]


def test_describe_shows_only_readable_tables(node: Node, dev: StorageClient) -> None:
    add_role(
        dev,
        "reader",
        tables(dog={"read": True}, cat={"insert": True, "update": True, "delete": True}),
    )
    add_user(dev, "bob", "reader")
    bob = node.client("bob", READER_PASSWORD)
    everything = dev.call("DescribeAll", pb.DescribeAllRequest()).databases
    assert [(d.name, [t.name for t in d.tables]) for d in everything] == [
        ("dev", ["cat", "dog"]),
        ("other", ["bird"]),
    ]
    visible = bob.call("DescribeAll", pb.DescribeAllRequest()).databases
    assert [(d.name, [t.name for t in d.tables]) for d in visible] == [("dev", ["dog"])]
    assert visible[0].tables[0] == dev.describe("dev", "dog")
    described = bob.call("DescribeDatabase", pb.DescribeDatabaseRequest(database="dev")).database
    assert [t.name for t in described.tables] == ["dog"]
    denied(
        bob,
        "DescribeDatabase",
        pb.DescribeDatabaseRequest(database="other"),
        "'bob'",
        "describe database other",
    )
    denied(
        bob,
        "DescribeTable",
        pb.DescribeTableRequest(database="dev", table="cat"),
        "'bob'",
        "read table dev.cat",
    )
    # A role with no permission sees nothing, and the call still succeeds.
    add_role(dev, "nothing", {})
    add_user(dev, "nobody", "nothing")
    nobody = node.client("nobody", READER_PASSWORD)
    assert list(nobody.call("DescribeAll", pb.DescribeAllRequest()).databases) == []


def test_transact_with_one_forbidden_operation_changes_nothing(
    node: Node, dev: StorageClient
) -> None:
    add_role(
        dev,
        "writer",
        tables(dog={"read": True, "insert": True, "update": True}, cat={"read": True}),
    )
    add_user(dev, "bob", "writer")
    bob = node.client("bob", READER_PASSWORD)
    before = state(dev)

    def operation(table: str, kind: types_pb2.Operation.ValueType, *records: Any) -> Any:
        return pb.TransactOperation(
            table=table, operation=kind, records=[orjson.dumps(r) for r in records]
        )

    allowed = [
        operation("dog", types_pb2.OPERATION_INSERT, {"id": 2, "name": "Kato"}),
        operation("dog", types_pb2.OPERATION_UPSERT, {"id": 3, "name": "Rex"}),
    ]
    for forbidden in [
        operation("cat", types_pb2.OPERATION_INSERT, {"id": 2, "name": "Felix"}),
        operation("cat", types_pb2.OPERATION_UPDATE, {"id": 1, "name": "Tim"}),
        pb.TransactOperation(table="dog", operation=types_pb2.OPERATION_DELETE, ids=ids([1])),
    ]:
        denied(
            bob,
            "Transact",
            pb.TransactRequest(database="dev", operations=[*allowed, forbidden]),
            "'bob'",
        )
    assert state(dev) == before
    reply = bob.call("Transact", pb.TransactRequest(database="dev", operations=allowed))
    assert reply.version > 0
    assert bob.all_records("dev", "dog") == [
        {"id": 1, "name": "Penny"},
        {"id": 2, "name": "Kato"},
        {"id": 3, "name": "Rex"},
    ]
    assert dev.transactions("dev")[-1].user == "bob"


# -- lockout ---------------------------------------------------------------------------


def test_lockout_after_consecutive_failures(make_node: MakeNode) -> None:
    node = make_node(
        config={"authentication": {"initialBackoff": "2s", "sourceLockoutAttempts": 0}}
    )
    admin = node.client()
    add_role(admin, "reader", {})
    add_user(admin, "bob", "reader")
    request = pb.AuthenticateRequest()

    def fail(username: str, password: str) -> str:
        error = node.client(username, password).expect(
            UNAUTHENTICATED, "Authenticate", request, FAILED_SIGN_IN
        )
        return error.details() or ""

    def throttled(username: str, password: str) -> float:
        error = node.client(username, password).expect(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "Authenticate", request, "try again in"
        )
        assert error_info(error).reason == "SIGN_IN_THROTTLED"
        delay = retry_delay_s(error)
        assert delay is not None and 0 < delay <= 2.0
        return delay

    # Failures must be consecutive: a success in between starts the count again.
    for _ in range(4):
        fail("bob", "wrong")
    assert whoami(node.client("bob", READER_PASSWORD)).username == "bob"
    for _ in range(4):
        fail("bob", "wrong")
    assert whoami(node.client("bob", READER_PASSWORD)).username == "bob"

    messages = {fail("bob", f"wrong-{i}") for i in range(5)}
    # Throttled: the right password waits too (it is not checked), saying for how long.
    throttled("bob", READER_PASSWORD)
    # An unknown user name is counted and throttled the same way.
    messages |= {fail("mallory", f"guess-{i}") for i in range(5)}
    throttled("mallory", "guess-5")
    assert messages == {FAILED_SIGN_IN}
    # Other users are not affected.
    assert whoami(admin).username == "admin"

    bob = node.client("bob", READER_PASSWORD)
    assert wait_for(lambda: _signs_in(bob), 20, "the wait to end")
    # After the wait, five new failures are needed again.
    for _ in range(4):
        fail("bob", "wrong")
    assert whoami(node.client("bob", READER_PASSWORD)).username == "bob"


def _signs_in(client: StorageClient) -> bool:
    try:
        return bool(whoami(client).username)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False


def test_altering_a_user_clears_its_lock(make_node: MakeNode) -> None:
    node = make_node(
        config={
            "authentication": {
                "lockoutAttempts": 2,
                "initialBackoff": "1h",
                "lockoutDuration": "1h",
            }
        }
    )
    admin = node.client()
    add_role(admin, "reader", {})
    add_user(admin, "bob", "reader")
    for _ in range(2):
        node.client("bob", "wrong").expect(
            UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN
        )
    bob = node.client("bob", READER_PASSWORD)
    bob.expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "Authenticate", pb.AuthenticateRequest(), "try again"
    )
    alter_user(admin, "bob", password="fresh-password")
    assert whoami(node.client("bob", "fresh-password")).username == "bob"


# -- replication -----------------------------------------------------------------------


@pytest.mark.cluster
def test_users_and_roles_are_not_replicated(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    admin_a = a.client()
    admin_a.create_table("dev", "dog")
    add_role(admin_a, "reader", tables(dog={"read": True}))
    add_user(admin_a, "bob", "reader")
    admin_a.insert("dev", "dog", [{"id": 1, "name": "Penny"}])
    admin_b = b.client()
    # The data written after the user replicates...
    wait_for(
        lambda: admin_b.get("dev", "dog", [1]) == [{"id": 1, "name": "Penny"}],
        60,
        "the record on node 1",
    )
    cluster.wait_converged()
    # ...the user and the role do not.
    assert users(admin_b) == [("admin", "super_user", True)]
    assert roles(admin_b) == {"super_user": {"super_user": True}}
    b.client("bob", READER_PASSWORD).expect(
        UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN
    )
    assert whoami(a.client("bob", READER_PASSWORD)).role == "reader"
    # Each node has its own: the same names can be added on node 1 independently.
    add_role(admin_b, "reader", tables(dog={"read": True, "insert": True}))
    add_user(admin_b, "bob", "reader", password="other-password")
    assert whoami(b.client("bob", "other-password")).username == "bob"
    a.client("bob", "other-password").expect(
        UNAUTHENTICATED, "Authenticate", pb.AuthenticateRequest(), FAILED_SIGN_IN
    )
    assert roles(admin_a)["reader"] == full(tables(dog={"read": True}))
