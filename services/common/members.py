"""Cluster membership: the rows of ``system.hdb_nodes`` and the routes they stand for.

``system.hdb_nodes`` is a replicated table (Harper's columns), one row per node:

    {"name": "127.0.0.2", "url": "shoals://127.0.0.2:9933", "replicates": true,
     "subscriptions": [], "start_time": null, "shard": null, "revoked_certificates": []}

A node's name is also the host its peers dial, so ``url``'s host is always ``name``.
The admin service writes rows (add_node, update_node, remove_node); every node writes its
own row when it first starts; the replicator reads them and dials every member. A deleted
row (a tombstone) means the node was removed from the cluster.

The conversion goes through the same parser as ``replication.routes`` in shoal.yaml, so a
row is valid exactly when the same route in the config file would be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from shoal.storage.v1 import types_pb2

from services.common.config import (
    ConfigError,
    Route,
    ShoalConfig,
    parse_config,
    parse_time,
)
from services.common.routes import subscriptions_yaml

DATABASE = "system"
TABLE = "hdb_nodes"
PRIMARY_KEY = "name"


def advertised_url(config: ShoalConfig, secure: bool) -> str:
    """How peers reach this node: ``replication.url``, else from hostname and ports."""
    replication = config.replication
    if replication.url:
        return replication.url
    host = f"[{replication.hostname}]" if ":" in replication.hostname else replication.hostname
    if replication.secure_port is not None and (secure or replication.port is None):
        return f"shoals://{host}:{replication.secure_port}"
    return f"ws://{host}:{replication.port}"


def route_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as a `replication.routes` entry of shoal.yaml."""
    entry: dict[str, Any] = {}
    url = row.get("url")
    if isinstance(url, str) and url:
        entry["url"] = url
    else:
        entry["hostname"] = row.get(PRIMARY_KEY)
    for column, key in (
        ("replicates", "replicates"),
        ("subscriptions", "subscriptions"),
        ("start_time", "startTime"),
        ("revoked_certificates", "revokedCertificates"),
    ):
        value = row.get(column)
        if value not in (None, [], ""):
            entry[key] = value
    return entry


def to_route(row: Mapping[str, Any], node_name: str) -> Route:
    """The route a row stands for; ConfigError naming the bad column otherwise."""
    name = row.get(PRIMARY_KEY)
    if not isinstance(name, str) or not name:
        raise ConfigError(["hdb_nodes: a node needs a 'name'"])
    config = parse_config(
        {"replication": {"hostname": node_name, "routes": [route_entry(row)]}}, env={}
    )
    route = config.replication.routes[0]
    if route.hostname != name:
        raise ConfigError(
            [f"hdb_nodes: the url of node {name!r} names another host ({route.hostname!r})"]
        )
    return route


def to_row(route: Route, shard: int | None = None) -> dict[str, Any]:
    """The hdb_nodes row for a route (every column present, so updates are whole)."""
    replicates: bool | dict[str, bool] = True
    if not (route.replicates.sends and route.replicates.receives):
        replicates = {"sends": route.replicates.sends, "receives": route.replicates.receives}
    if route.secure is None:
        url = route.hostname if route.port is None else f"{route.hostname}:{route.port}"
    else:
        scheme = "shoals" if route.secure else "ws"
        url = f"{scheme}://{route.hostname}" + (f":{route.port}" if route.port else "")
    start = None
    if route.start_time is not None:
        start = route.start_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {
        PRIMARY_KEY: route.hostname,
        "url": url,
        "replicates": replicates,
        "subscriptions": subscriptions_yaml(route.subscriptions),
        "start_time": start,
        "shard": shard,
        "revoked_certificates": list(route.revoked_certificates),
    }


def start_time(row: Mapping[str, Any] | None) -> datetime | None:
    """A row's `start_time` (None when absent or unreadable)."""
    value = row.get("start_time") if row is not None else None
    if value in (None, ""):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    try:
        return parse_time(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Membership:
    """What one node's hdb_nodes says: live members and removed (tombstoned) names."""

    members: dict[str, Route] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()
    problems: tuple[str, ...] = ()

    def includes(self, name: str) -> bool:
        return name in self.rows


def parse_rows(rows: list[types_pb2.SnapshotRow], node_name: str) -> Membership:
    """Members from snapshot rows of hdb_nodes: live rows become routes, tombstones mark
    removed nodes, and rows that do not parse are reported and skipped."""
    routes: dict[str, Route] = {}
    live: dict[str, dict[str, Any]] = {}
    removed: set[str] = set()
    problems: list[str] = []
    for row in rows:
        name = orjson.loads(row.id)
        doc = orjson.loads(row.state)[3]
        if not isinstance(name, str):
            continue
        if not doc:  # a tombstone (attributes patched after a delete make it live again)
            removed.add(name)
            continue
        live[name] = doc
        if name == node_name:
            continue
        try:
            routes[name] = to_route(doc, node_name)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return Membership(routes, live, frozenset(removed), tuple(problems))
