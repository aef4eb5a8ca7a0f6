"""System and analytics: the machine and node summary, the node's configuration and its
restart, and the analytics history. All need a super user (the registry checks)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from shoal.storage.v1 import storage_pb2 as spb

from services.admin import analytics as history
from services.admin import clusterwide, shards
from services.admin.configuration import settings_from
from services.admin.operations.body import MAX_MS, MAX_UINT32, Body, Json
from services.admin.operations.data import attributes, conditions
from services.admin.operations.execute import Execute
from services.common import sysinfo
from services.common.analytics import AGGREGATE_PERIOD_MS, MAX_TIME_MS
from services.common.errors import InvalidArgument

# The node's own sections, after the machine's (sysinfo.py), in Harper's order; Harper
# also calls `metrics` `database_metrics`.
_NODE_SECTIONS = ("table_size", "metrics", "threads", "replication")
_ALIASES = {"database_metrics": "metrics"}


def parse_system_information(body: Body) -> list[str] | None:
    """The sections asked for (None: every one)."""
    names = body.names("attributes", what="names")
    return [_ALIASES.get(n, n) for n in names] or None


def _threads(processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Harper's ``threads`` (its worker threads): Shoal's processes, one each."""
    return [
        {"threadId": i, "name": p["service"], "pid": p["pid"], "threads": p["threads"]}
        for i, p in enumerate(processes)
    ]


async def system_information(ex: Execute, attributes: list[str] | None) -> Json:
    """Harper's sections: the machine's (psutil, sysinfo.py), then table sizes and
    statistics from this node's storage, its processes as Harper's threads, and a
    replication summary from its replicator."""
    wanted = list(dict.fromkeys(attributes)) if attributes else None
    config = ex.node.config
    machine = [a for a in wanted if a not in _NODE_SECTIONS] if wanted else None
    if machine is not None and "threads" in (wanted or ()) and "processes" not in machine:
        machine.append("processes")  # the threads are the processes
    result: dict[str, Any] = {}
    if machine is None or machine:
        found = await asyncio.to_thread(
            sysinfo.system_information, machine, config=config, config_path=config.source
        )
        result = {k: v for k, v in found.items() if wanted is None or k in wanted}
        processes = found.get("processes")
        if processes is None and "harperdb_processes" in found:
            own = found["harperdb_processes"]
            processes = own["core"] + own["clustering"]
    else:
        processes = None
    if wanted is None or "table_size" in wanted or "metrics" in wanted:
        reply = await ex.storage("DescribeAll", spb.DescribeAllRequest())
        if wanted is None or "table_size" in wanted:
            result["table_size"] = [
                {
                    "schema": db.name,
                    "table": t.name,
                    "record_count": t.record_count,
                    "database": db.name,
                }
                for db in reply.databases
                for t in db.tables
            ]
        if wanted is None or "metrics" in wanted:
            result["metrics"] = {
                db.name: {"tables": {t.name: {"entryCount": t.record_count} for t in db.tables}}
                for db in reply.databases
            }
    if wanted is None or "threads" in wanted:
        result["threads"] = _threads(processes or [])
    if wanted is None or "replication" in wanted:
        status = await ex.cluster.status()
        result["replication"] = {
            "node_name": status.node_name,
            "removed": status.removed,
            "connections": [
                {
                    "name": c.peer,
                    "connected": c.connected,
                    "backlog_transactions": sum(d.backlog_transactions for d in c.databases),
                }
                for c in status.connections
            ],
        }
    if wanted is not None:
        return {k: result[k] for k in wanted if k in result}
    return result


# -- configuration and restarts --------------------------------------------------------------


async def get_configuration(ex: Execute, request: None) -> Json:
    return ex.cluster.configuration()


@dataclass(frozen=True)
class SetConfiguration:
    replicated: bool
    keep: bool  # keep_sharded_data (always, with replicated)
    settings: dict[str, Any]
    body: Body


def parse_set_configuration(body: Body) -> SetConfiguration:
    replicated = body.flag("replicated", default=False)
    keep = body.flag("keep_sharded_data", default=False) or replicated
    return SetConfiguration(replicated, keep, settings_from(body.data), body)


async def set_configuration(ex: Execute, request: SetConfiguration) -> Json:
    outcome = await shards.set_configuration(ex.nodes, request.settings, request.keep)
    result: dict[str, Any] = {
        "message": "Configuration successfully set. Restart the node (restart) for the new"
        " settings to take effect."
    }
    if outcome.shard_change is not None:
        result["message"] = (
            f"Configuration successfully set; this node {outcome.shard_change.sentence()}."
            " Other new settings take effect at the next restart (restart)."
        )
        result["shardChange"] = outcome.shard_change.json()
    if not request.replicated:
        return result
    # Every member moves to the one shard, keeping what it holds (the shards merge);
    # a shard change restarts a member's replicator, hence the longer limit.
    names = await clusterwide.members(ex.nodes, ex.cluster)
    metadata = ex.caller.member_metadata("set_configuration with 'replicated'")
    operation = {**request.body.data, "keep_sharded_data": True}
    results = await clusterwide.fan_out(
        ex.node, names, operation, metadata, limit_s=clusterwide.MEMBER_RESTART_TIMEOUT_S
    )
    return {**result, "replicated": [r.json() for r in results]}


@dataclass(frozen=True)
class Restart:
    operation: str  # restart or restart_service
    replicated: bool
    services: list[str]  # in restart order


def parse_restart(body: Body) -> Restart:
    replicated = body.flag("replicated", default=False)
    if body.operation == "restart_service":
        services = clusterwide.services_to_restart([body.text("service")])
    else:
        names = body.names("services", what="service names")
        services = clusterwide.services_to_restart(names)
    return Restart(body.operation, replicated, services)


async def restart(ex: Execute, request: Restart) -> Json:
    metadata = (
        ex.caller.member_metadata(f"{request.operation} with 'replicated'")
        if request.replicated
        else ()
    )
    done = await clusterwide.restart(
        ex.node, ex.nodes, ex.cluster, request.services, request.replicated, metadata
    )
    if done.services:
        here = [s for s in done.services if s != "admin"]
        message = f"restarted {', '.join(here)}" if here else ""
        if "admin" in done.services:
            message += ("; " if message else "") + "the admin service restarts now"
    else:
        message = "the rolling restart stopped before this node; nothing was restarted here"
    result: dict[str, Any] = {"message": message, "services": done.services}
    if request.replicated:
        result["replicated"] = [r.json() for r in done.replicated]
    return result


# -- analytics -------------------------------------------------------------------------------


def _time_ms(body: Body, name: str, default: int) -> int:
    value = body.value(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_MS:
        raise InvalidArgument(f"{body.operation}: '{name}' must be a time in Unix milliseconds")
    return int(value)


def parse_get_analytics(body: Body) -> history.AnalyticsQuery:
    return history.AnalyticsQuery(
        metric=body.text("metric"),
        start_ms=_time_ms(body, "start_time", 0),
        end_ms=_time_ms(body, "end_time", MAX_TIME_MS),
        period_ms=body.number("period", default=AGGREGATE_PERIOD_MS, maximum=MAX_UINT32),
        attributes=tuple(attributes(body)),
        conditions=tuple(conditions(body.array("conditions", required=False), body.operation)),
    )


async def get_analytics(ex: Execute, query: history.AnalyticsQuery) -> Json:
    return await history.get_analytics(ex.node, ex.caller, query)


def parse_list_metrics(body: Body) -> list[str]:
    return body.names("metric_types", what="strings") or ["builtin"]


async def list_metrics(ex: Execute, types: list[str]) -> Json:
    return history.list_metrics(ex.caller, types)
