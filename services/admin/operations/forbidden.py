"""Harper's answer to a forbidden operation (its 403 body), from a PERMISSION_DENIED.

Harper answers::

    {"error": "This operation is not authorized due to role restrictions and/or invalid
               database items",
     "unauthorized_access": [...], "invalid_schema_items": [...]}

``unauthorized_access`` holds, for an operation only a super user may run, Harper's
sentence ``Operation 'add_user' is restricted to 'super_user' roles``; for a table the
role may not use, ``{"schema", "table", "required_table_permissions",
"required_attribute_permissions"}``. ``invalid_schema_items`` names what the role may not
see. Shoal adds ``reason``, its own sentence of what was refused.
"""

from __future__ import annotations

from services.admin.operations.body import Json
from services.common.errors import PermissionDenied

FORBIDDEN = (
    "This operation is not authorized due to role restrictions and/or invalid database items"
)
# Harper's table permissions an action needs (storage's permissions.py names the actions).
_NEEDS = {
    "read": ["read"],
    "insert": ["insert"],
    "update": ["update"],
    "upsert": ["insert", "update"],
    "delete": ["delete"],
}


def restricted(operation: str) -> str:
    """Harper's sentence for an operation only a super user may run."""
    return f"Operation '{operation}' is restricted to 'super_user' roles"


def forbidden_json(error: PermissionDenied, operation: str) -> Json:
    """Harper's body for ``error``, raised while running ``operation``, when the caller's
    role refused it (the refusal names the user); any other refusal (a file the service
    may not read, credentials another node refused) is answered as other errors are."""
    metadata = error.metadata
    if "user" not in metadata:
        return {"error": error.message}
    action = metadata.get("action", "")
    database, table = metadata.get("database"), metadata.get("table")
    unauthorized: list[Json] = []
    invalid: list[str] = []
    if action in _NEEDS and database and table:
        unauthorized.append(
            {
                "schema": database,
                "table": table,
                "required_table_permissions": _NEEDS[action],
                "required_attribute_permissions": [],
            }
        )
    elif action == "describe" and database:
        invalid.append(f"database '{database}' does not exist")
    else:
        unauthorized.append(restricted(operation))
    return {
        "error": FORBIDDEN,
        "unauthorized_access": unauthorized,
        "invalid_schema_items": invalid,
        "reason": error.message,
    }
