"""The registry of Harper's operations: each name maps to one parser, one handler and
who may call it; ``run`` serves one Execute call through it.

A parser reads and validates the body (``Body``) into a request and touches nothing; a
handler carries the request out. Run checks the access first, so a caller without the
right is refused before the body is read, as Harper does.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from shoal.admin.v1 import admin_pb2 as apb

from services.admin.operations import (
    backups,
    cluster,
    data,
    jobs,
    logs,
    schema,
    system,
    tokens,
    users,
)
from services.admin.operations.body import MAX_OPERATION_DEPTH, Body, Json, nothing, whole
from services.admin.operations.execute import Execute
from services.admin.operations.forbidden import forbidden_json
from services.common import jsoninput
from services.common.errors import DataLoss, InvalidArgument, PermissionDenied, ShoalError

R = TypeVar("R")


class Access(enum.Enum):
    ANY = "any"  # storage applies the caller's role
    SUPER_USER = "super user"  # checked here, before the body is read
    REPLICATED = "super user with replicated"  # ...only when `replicated` is true


@dataclass(frozen=True)
class Operation(Generic[R]):
    parse: Callable[[Body], R]
    handle: Callable[[Execute, R], Awaitable[Json]]
    access: Access = Access.ANY


SUPER, REPLICATED = Access.SUPER_USER, Access.REPLICATED
WRITE = {name: Operation(spec.parse, data.write) for name, spec in data.WRITES.items()}
SEARCH_BY_ID = Operation(data.parse_search_by_id, data.search_by_id)
DESCRIBE_DATABASE = Operation(schema.parse_describe_database, schema.describe_database)
CREATE_DATABASE = Operation(schema.parse_create_database, schema.create_database, REPLICATED)
DROP_DATABASE = Operation(schema.parse_drop_database, schema.drop_database, REPLICATED)
RESTART = Operation(system.parse_restart, system.restart, SUPER)
UPDATE_NODE = Operation(cluster.parse_update_node, cluster.update_node, SUPER)

OPERATIONS: dict[str, Operation[Any]] = {
    # data (the writes are the table data.WRITES)
    "insert": WRITE["insert"],
    "update": WRITE["update"],
    "upsert": WRITE["upsert"],
    "delete": WRITE["delete"],
    "search_by_id": SEARCH_BY_ID,
    "search_by_hash": SEARCH_BY_ID,
    "search_by_value": Operation(data.parse_search_by_value, data.search_by_value),
    "search_by_conditions": Operation(data.parse_search_by_conditions, data.search_by_conditions),
    "csv_data_load": Operation(data.parse_csv_data_load, data.csv_data_load),
    "csv_file_load": Operation(data.parse_csv_file_load, data.csv_file_load, SUPER),
    # schema
    "describe_all": Operation(nothing, schema.describe_all),
    "describe_database": DESCRIBE_DATABASE,
    "describe_schema": DESCRIBE_DATABASE,
    "describe_table": Operation(schema.parse_describe_table, schema.describe_table),
    "create_database": CREATE_DATABASE,
    "create_schema": CREATE_DATABASE,
    "drop_database": DROP_DATABASE,
    "drop_schema": DROP_DATABASE,
    "create_table": Operation(schema.parse_create_table, schema.create_table),
    "drop_table": Operation(schema.parse_drop_table, schema.drop_table, REPLICATED),
    "create_attribute": Operation(schema.parse_create_attribute, schema.create_attribute),
    "drop_attribute": Operation(schema.parse_drop_attribute, schema.drop_attribute, REPLICATED),
    # logs and audit
    "read_transaction_log": Operation(logs.parse_read_transaction_log, logs.read_transaction_log),
    "read_audit_log": Operation(logs.parse_read_audit_log, logs.read_audit_log),
    "delete_audit_logs_before": Operation(
        logs.parse_delete_audit_logs_before, logs.delete_audit_logs_before
    ),
    "revert_transaction": Operation(logs.parse_revert_transaction, logs.revert_transaction),
    # jobs
    "get_job": Operation(jobs.parse_get_job, jobs.get_job),
    "search_jobs_by_start_date": Operation(
        jobs.parse_search_jobs_by_start_date, jobs.search_jobs_by_start_date, SUPER
    ),
    # users and roles
    "add_user": Operation(users.parse_add_user, users.add_user),
    "alter_user": Operation(users.parse_alter_user, users.alter_user),
    "drop_user": Operation(users.parse_drop_user, users.drop_user),
    "list_users": Operation(nothing, users.list_users),
    "user_info": Operation(nothing, users.user_info),
    "add_role": Operation(users.parse_add_role, users.add_role),
    "alter_role": Operation(users.parse_alter_role, users.alter_role),
    "drop_role": Operation(users.parse_drop_role, users.drop_role),
    "list_roles": Operation(nothing, users.list_roles),
    # tokens (Harper's; storage issues and checks them)
    "create_authentication_tokens": Operation(
        tokens.parse_create_authentication_tokens, tokens.create_authentication_tokens
    ),
    "refresh_operation_token": Operation(
        tokens.parse_refresh_operation_token, tokens.refresh_operation_token
    ),
    # backups
    "get_backup": Operation(backups.parse_get_backup, backups.get_backup, SUPER),
    "restore_backup": Operation(whole, backups.restore_backup, SUPER),
    # system and analytics
    "system_information": Operation(
        system.parse_system_information, system.system_information, SUPER
    ),
    "get_configuration": Operation(nothing, system.get_configuration, SUPER),
    "set_configuration": Operation(system.parse_set_configuration, system.set_configuration, SUPER),
    "restart": RESTART,
    "restart_service": RESTART,
    "get_analytics": Operation(system.parse_get_analytics, system.get_analytics, SUPER),
    "list_metrics": Operation(system.parse_list_metrics, system.list_metrics, SUPER),
    # cluster
    "cluster_status": Operation(nothing, cluster.cluster_status, SUPER),
    "rebalance": Operation(cluster.parse_rebalance, cluster.rebalance, SUPER),
    "cluster_get_routes": Operation(nothing, cluster.cluster_get_routes, SUPER),
    "cluster_set_routes": Operation(
        cluster.parse_cluster_set_routes, cluster.cluster_set_routes, SUPER
    ),
    "cluster_delete_routes": Operation(
        cluster.parse_cluster_delete_routes, cluster.cluster_delete_routes, SUPER
    ),
    # membership
    "add_node": Operation(whole, cluster.add_node, SUPER),
    "update_node": UPDATE_NODE,
    "set_node_replication": UPDATE_NODE,
    "remove_node": Operation(cluster.parse_remove_node, cluster.remove_node, SUPER),
    "configure_cluster": Operation(whole, cluster.configure_cluster, SUPER),
    # certificates
    "add_certificate": Operation(cluster.parse_add_certificate, cluster.add_certificate, SUPER),
    "list_certificates": Operation(nothing, cluster.list_certificates, SUPER),
    "remove_certificate": Operation(
        cluster.parse_remove_certificate, cluster.remove_certificate, SUPER
    ),
}


def check_access(ex: Execute, operation: Operation[Any], body: Body) -> None:
    """PERMISSION_DENIED unless the caller may run the operation as the body asks."""
    if operation.access is SUPER:
        ex.caller.require_super_user(body.operation)
    elif operation.access is REPLICATED and body.flag("replicated", default=False):
        ex.caller.require_super_user(f"{body.operation} with 'replicated'")


async def run(execute: Execute, raw: bytes) -> tuple[Json, int]:
    """Run one JSON operation; returns (Harper response or {"error": ...}, gRPC code)."""
    try:
        parsed = jsoninput.loads(raw, MAX_OPERATION_DEPTH, "the limit of an operation")
    except jsoninput.Refused as exc:
        return {"error": f"the operation is refused: {exc}"}, InvalidArgument.code.value[0]
    if not isinstance(parsed, dict):
        return {"error": "the operation must be a JSON object"}, InvalidArgument.code.value[0]
    body = Body(parsed)
    operation = OPERATIONS.get(body.operation)
    if operation is None:
        # Harper's text (the operations Shoal knows: docs/operations.md).
        message = (
            f"Operation '{body.operation}' not found"
            if body.operation
            else "'operation' is required"
        )
        return {"error": message}, InvalidArgument.code.value[0]
    try:
        check_access(execute, operation, body)
        return await operation.handle(execute, operation.parse(body)), 0
    except PermissionDenied as exc:
        return forbidden_json(exc, body.operation), exc.code.value[0]
    except ShoalError as exc:
        return {"error": exc.message}, exc.code.value[0]


def answer(result: Json, code: int) -> apb.ExecuteResponse:
    """An operation's answer, as JSON. A record stored before storage.maxNestingDepth
    existed may nest deeper than JSON output allows (a log entry holding one): the
    answer is then an error naming the cause (DATA_LOSS), never a failed call."""
    try:
        return apb.ExecuteResponse(result=orjson.dumps(result), code=code)
    except orjson.JSONEncodeError as exc:
        error = (
            f"the answer cannot be written as JSON ({exc}): it holds a record nested deeper"
            " than JSON output allows, stored before storage.maxNestingDepth existed; read"
            " the records one by one and delete or rewrite that one"
        )
        return apb.ExecuteResponse(
            result=orjson.dumps({"error": error}), code=DataLoss.code.value[0]
        )
