"""Users and roles: local to each node; the typed path is storage's own user RPCs."""

from __future__ import annotations

from typing import Any

import orjson
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.operations.body import Body, Json
from services.admin.operations.execute import Execute
from services.common import analytics, certificate_table, members
from services.common.errors import InvalidArgument

# The tables of the `system` database, which Harper's list_users shows in each role.
SYSTEM_TABLES = [
    certificate_table.TABLE,
    members.TABLE,
    analytics.AGGREGATE_TABLE,
    analytics.RAW_TABLE,
]


def expanded_json(permission: bytes, system_tables: list[str]) -> dict[str, Any]:
    """A role's permission as Harper's ``list_users`` shows it: with a permission for
    each table of the ``system`` database (read for a super user, nothing else)."""
    expanded: dict[str, Any] = orjson.loads(permission) if permission else {}
    super_user = bool(expanded.get("super_user"))
    system = expanded.setdefault("system", {})
    tables = system.setdefault("tables", {}) if isinstance(system, dict) else {}
    for table in system_tables:
        tables[table] = {
            "read": super_user,
            "insert": False,
            "update": False,
            "delete": False,
            "attribute_permissions": [],
        }
    return expanded


def _user_json(user: spb.User, roles: dict[str, spb.Role]) -> Json:
    """A user as Harper's list_users shows it: its role whole, the role's permission
    expanded with the system tables (readable by a super user only)."""
    role = roles.get(user.role)
    return {
        "username": user.username,
        "active": user.active,
        "role": {
            "role": user.role,
            "id": user.role,
            "permission": expanded_json(role.permission, SYSTEM_TABLES) if role else {},
        },
    }


def _role_json(role: spb.Role) -> Json:
    return {"role": role.name, "id": role.name, "permission": orjson.loads(role.permission)}


async def _roles(ex: Execute) -> dict[str, spb.Role]:
    reply = await ex.storage("ListRoles", spb.ListRolesRequest())
    return {r.name: r for r in reply.roles}


def parse_add_user(body: Body) -> spb.AddUserRequest:
    request = spb.AddUserRequest(
        username=body.text("username"), password=body.text("password"), role=body.text("role")
    )
    if "active" in body.data:
        request.active = body.flag("active", default=True)
    return request


async def add_user(ex: Execute, request: spb.AddUserRequest) -> Json:
    await ex.storage("AddUser", request)
    return {"message": f"{request.username} successfully added"}


def parse_alter_user(body: Body) -> spb.AlterUserRequest:
    request = spb.AlterUserRequest(username=body.text("username"))
    if "password" in body.data:
        request.password = body.text("password")
    if "role" in body.data:
        request.role = body.text("role")
    if "active" in body.data:
        request.active = body.flag("active", default=True)
    return request


async def alter_user(ex: Execute, request: spb.AlterUserRequest) -> Json:
    await ex.storage("AlterUser", request)
    return {"message": f"{request.username} successfully updated"}


def parse_drop_user(body: Body) -> spb.DropUserRequest:
    return spb.DropUserRequest(username=body.text("username"))


async def drop_user(ex: Execute, request: spb.DropUserRequest) -> Json:
    await ex.storage("DropUser", request)
    return {"message": f"{request.username} successfully deleted"}


async def list_users(ex: Execute, request: None) -> Json:
    roles = await _roles(ex)
    reply = await ex.storage("ListUsers", spb.ListUsersRequest())
    return [_user_json(u, roles) for u in reply.users]


async def user_info(ex: Execute, request: None) -> Json:
    reply = await ex.storage("Authenticate", spb.AuthenticateRequest())
    return {
        "username": reply.username,
        "active": True,  # an inactive user cannot sign in
        "role": {
            "role": reply.role,
            "id": reply.role,
            "permission": orjson.loads(reply.permission) if reply.permission else {},
        },
        "super_user": reply.super_user,
    }


def _permission(body: Body) -> bytes:
    permission = body.value("permission")
    if not isinstance(permission, dict):
        raise InvalidArgument(f"{body.operation}: 'permission' must be an object")
    return orjson.dumps(permission)


def parse_add_role(body: Body) -> spb.AddRoleRequest:
    return spb.AddRoleRequest(name=body.text("role"), permission=_permission(body))


async def add_role(ex: Execute, request: spb.AddRoleRequest) -> Json:
    reply = await ex.storage("AddRole", request)
    return _role_json(reply.role)


def parse_alter_role(body: Body) -> spb.AlterRoleRequest:
    return spb.AlterRoleRequest(name=body.text("role", "id"), permission=_permission(body))


async def alter_role(ex: Execute, request: spb.AlterRoleRequest) -> Json:
    reply = await ex.storage("AlterRole", request)
    return _role_json(reply.role)


def parse_drop_role(body: Body) -> spb.DropRoleRequest:
    return spb.DropRoleRequest(name=body.text("id", "role"))


async def drop_role(ex: Execute, request: spb.DropRoleRequest) -> Json:
    await ex.storage("DropRole", request)
    return {"message": f"{request.name} successfully deleted"}


async def list_roles(ex: Execute, request: None) -> Json:
    return [_role_json(r) for r in (await _roles(ex)).values()]
