"""Roles' permissions (Harper's format) and the one check every storage RPC makes.

A role's permission is a JSON object::

    {"super_user": false,
     "dev": {"tables": {"dog": {"read": true, "insert": true,
                                "update": false, "delete": false}}}}

``super_user`` and each table permission default to false when left out. Harper's other
role kinds are read too: ``structure_user`` (true: may create and drop databases, tables
and attributes, with every table permission on every database; a list of database names:
so within those databases) and ``cluster_user`` (Harper's role for nodes: every table
permission on every database, as Harper gives it). Harper's ``attribute_permissions`` is
accepted only when empty (attribute-level permissions are not supported); any other key
is INVALID_ARGUMENT naming it. A parsed ``Permission`` keeps the normalized JSON (sorted
keys, every default of a table spelled out, ``structure_user`` and ``cluster_user`` as
given) to hand back to callers.

The node-internal identity and super users may do anything; other users carry their
role's ``Permission`` in their identity (``UserIdentity``), so a check is a dict lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from services.common.auth import Identity
from services.common.errors import InvalidArgument, PermissionDenied
from services.storage.schema import NAME_PATTERN

READ = "read"
INSERT = "insert"
UPDATE = "update"
UPSERT = "upsert"  # needs both insert and update
DELETE = "delete"
TABLE_PERMISSIONS = (READ, INSERT, UPDATE, DELETE)

_NEEDS: dict[str, tuple[str, ...]] = {
    READ: (READ,),
    INSERT: (INSERT,),
    UPDATE: (UPDATE,),
    UPSERT: (INSERT, UPDATE),
    DELETE: (DELETE,),
}
_PHRASES = {
    READ: "read table",
    INSERT: "insert into table",
    UPDATE: "update table",
    UPSERT: "upsert into table",
    DELETE: "delete from table",
}
_NOTHING: frozenset[str] = frozenset()


@dataclass(frozen=True, eq=False)
class Permission:
    """A role's parsed permission."""

    super_user: bool
    grants: Mapping[tuple[str, str], frozenset[str]]  # (database, table) -> granted
    json: bytes  # normalized JSON
    # Harper's structure_user: True (every database) or the databases it covers.
    structure_user: bool | frozenset[str] = False
    cluster_user: bool = False

    def structures(self, database: str) -> bool:
        """Whether the role manages ``database``'s structure (and all its tables)."""
        if self.super_user or self.structure_user is True:
            return True
        return isinstance(self.structure_user, frozenset) and database in self.structure_user

    def allows(self, action: str, database: str, table: str) -> bool:
        """Whether a table permission (read, insert, update or delete) is granted."""
        if self.cluster_user or self.structures(database):
            return True
        return action in self.grants.get((database, table), _NOTHING)

    def reads_in(self, database: str) -> bool:
        """Whether some table of ``database`` may be read."""
        return (
            self.cluster_user
            or self.structures(database)
            or any(d == database and READ in granted for (d, _), granted in self.grants.items())
        )


def _bad(path: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"permission key {path!r}: {why}")


def _table_permission(path: str, value: object) -> frozenset[str]:
    if not isinstance(value, dict):
        raise _bad(path, "must be an object of read, insert, update and delete flags")
    granted: set[str] = set()
    for key, flag in value.items():
        if key == "attribute_permissions":
            if flag not in ([], None):
                raise _bad(f"{path}.{key}", "attribute-level permissions are not supported")
            continue
        if key not in TABLE_PERMISSIONS:
            raise _bad(
                f"{path}.{key}", "unknown key (a table takes read, insert, update and delete)"
            )
        if not isinstance(flag, bool):
            raise _bad(f"{path}.{key}", "must be true or false")
        if flag:
            granted.add(key)
    return frozenset(granted)


def _database_permission(database: str, value: object) -> dict[str, frozenset[str]]:
    if not NAME_PATTERN.match(database):
        raise _bad(database, "unknown key (use super_user or a valid database name)")
    if not isinstance(value, dict):
        raise _bad(database, 'must be an object {"tables": {...}}')
    tables: dict[str, frozenset[str]] = {}
    for key, tables_value in value.items():
        if key != "tables":
            raise _bad(f"{database}.{key}", 'unknown key (a database takes only "tables")')
        if not isinstance(tables_value, dict):
            raise _bad(f"{database}.tables", "must be an object of tables")
        for table, table_value in tables_value.items():
            path = f"{database}.tables.{table}"
            if not NAME_PATTERN.match(table):
                raise _bad(path, "not a valid table name")
            tables[table] = _table_permission(path, table_value)
    return tables


def permission_from_json(data: object) -> Permission:
    """Validate a decoded permission object (INVALID_ARGUMENT naming the bad key)."""
    if not isinstance(data, dict):
        raise InvalidArgument("permission must be a JSON object")
    super_user = False
    cluster_user = False
    structure_user: bool | frozenset[str] = False
    grants: dict[tuple[str, str], frozenset[str]] = {}
    normalized: dict[str, Any] = {}
    for key, value in data.items():
        if key == "super_user":
            if not isinstance(value, bool):
                raise _bad(key, "must be true or false")
            super_user = value
            continue
        if key == "cluster_user":
            if not isinstance(value, bool):
                raise _bad(key, "must be true or false")
            cluster_user = value
            normalized[key] = value
            continue
        if key == "structure_user":
            structure_user = _structure_user(value)
            normalized[key] = value
            continue
        tables = _database_permission(key, value)
        normalized[key] = {
            "tables": {
                table: {action: action in granted for action in TABLE_PERMISSIONS}
                for table, granted in tables.items()
            }
        }
        for table, granted in tables.items():
            grants[(key, table)] = granted
    normalized["super_user"] = super_user
    return Permission(
        super_user=super_user,
        grants=grants,
        json=orjson.dumps(normalized, option=orjson.OPT_SORT_KEYS),
        structure_user=structure_user,
        cluster_user=cluster_user,
    )


def _structure_user(value: object) -> bool | frozenset[str]:
    """Harper's ``structure_user``: true or false, or a list of database names."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(d, str) for d in value):
        bad = [d for d in value if not NAME_PATTERN.match(d)]
        if bad:
            raise _bad("structure_user", f"{bad[0]!r} is not a valid database name")
        return frozenset(value)
    raise _bad("structure_user", "must be true or false, or a list of database names")


def parse_permission(raw: bytes) -> Permission:
    """Validate a permission sent as JSON bytes."""
    if not raw:
        raise InvalidArgument('permission is required (a JSON object such as {"super_user": true})')
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"permission is not valid JSON: {exc}") from exc
    return permission_from_json(data)


SUPER_USER_PERMISSION = permission_from_json({"super_user": True})
CLUSTER_USER_PERMISSION = permission_from_json({"cluster_user": True})
NO_PERMISSION = permission_from_json({})


@dataclass(frozen=True)
class UserIdentity(Identity):
    """An authenticated user with its role's permission."""

    role: str = ""
    permission: Permission = NO_PERMISSION


def permission_of(who: Identity) -> Permission:
    """What the caller may do."""
    if who.super_user:
        return SUPER_USER_PERMISSION
    return who.permission if isinstance(who, UserIdentity) else NO_PERMISSION


def can(who: Identity, action: str, database: str, table: str) -> bool:
    """Whether ``who`` may do ``action`` (read, insert, update, upsert, delete) on a table."""
    if who.super_user:
        return True
    permission = permission_of(who)
    return all(permission.allows(a, database, table) for a in _NEEDS[action])


def require(who: Identity, action: str, database: str, table: str) -> None:
    """PERMISSION_DENIED unless ``who`` may do ``action`` on ``database.table``."""
    if who.super_user:  # the node-internal identity is a super user too
        return
    if not can(who, action, database, table):
        needs = _NEEDS[action]
        detail = f" (it needs {' and '.join(needs)})" if len(needs) > 1 else ""
        raise PermissionDenied(
            f"user {who.name!r} may not {_PHRASES[action]} {database}.{table}{detail}",
            metadata={"user": who.name, "action": action, "database": database, "table": table},
        )


def require_reads_in(who: Identity, database: str) -> None:
    """PERMISSION_DENIED unless ``who`` may read some table of ``database``."""
    if not permission_of(who).reads_in(database):
        raise PermissionDenied(
            f"user {who.name!r} may not describe database {database}:"
            " its role can read no table of it",
            metadata={"user": who.name, "action": "describe", "database": database},
        )


def require_structure(who: Identity, database: str, what: str) -> None:
    """PERMISSION_DENIED unless ``who`` may change ``database``'s structure: a super user,
    or a ``structure_user`` role covering the database; ``what`` completes "may not ..."."""
    if who.super_user or permission_of(who).structures(database):
        return
    raise PermissionDenied(
        f"user {who.name!r} may not {what}: that needs a super user or structure_user role",
        metadata={"user": who.name, "action": what, "database": database},
    )


def require_super_user(who: Identity, what: str) -> None:
    """PERMISSION_DENIED unless ``who`` is a super user; ``what`` completes "may not ..."."""
    if not who.super_user:
        raise PermissionDenied(
            f"user {who.name!r} may not {what}: that needs a super user role",
            metadata={"user": who.name, "action": what},
        )
