"""Membership operations: add, update, remove and list the members of the cluster.

The members are the rows of the replicated table ``system.hdb_nodes``
(services/common/members.py). Changing a row here is all it takes: the row replicates to
every member, and every node's replicator dials (or drops) the node it describes. Rows
are written with the node-internal identity (the ``system`` database is reserved), after
the caller was checked to be a super user, and always as attribute merges, so a node
writing its own row at the same time does not erase the settings written here.

The typed RPCs and Execute both call ``Nodes``; a lock serializes membership changes of
this node so that "is it a member?" and the write cannot interleave with another change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.cluster import Cluster
from services.admin.node import AdminNode
from services.common import members
from services.common.config import ConfigError, Route
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.routes import from_proto, to_proto

Row = dict[str, Any]


@dataclass
class Configured:
    """Outcome of configure_cluster."""

    added: list[Row] = field(default_factory=list)
    updated: list[Row] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _problem(exc: ConfigError, where: str = "") -> InvalidArgument:
    return InvalidArgument(where + "; ".join(exc.problems))


def validated_row(row: Row, node_name: str, shard: int | None, where: str = "") -> Row:
    """The complete row for a requested one: parsed like a route in shoal.yaml."""
    try:
        route = members.to_route(row, node_name)
    except ConfigError as exc:
        raise _problem(exc, where) from exc
    if route.hostname == node_name:
        raise InvalidArgument(f"{where}{node_name} is this node itself")
    return members.to_row(route, shard)


def row_from_route(message: Any, node_name: str, shard: int | None, where: str = "") -> Row:
    """A row from a typed ``shoal.replicator.v1.Route``."""
    try:
        (route,) = from_proto([message], node_name)
    except ConfigError as exc:
        raise _problem(exc, where) from exc
    if route.hostname == node_name:
        raise InvalidArgument(f"{where}{node_name} is this node itself")
    return members.to_row(route, shard)


def node_message(row: Row, node_name: str) -> apb.Node:
    """The typed form of a row."""
    message = apb.Node(name=str(row.get(members.PRIMARY_KEY, "")), url=str(row.get("url") or ""))
    try:
        route: Route | None = members.to_route(row, node_name)
    except ConfigError:
        route = None
    if route is not None:
        message.route.CopyFrom(to_proto(route))
    shard = row.get("shard")
    if isinstance(shard, int) and not isinstance(shard, bool):
        message.shard = shard
    return message


# Columns of a member row that a configured route to the same node replaces.
ROUTE_COLUMNS = frozenset({"url", "replicates", "subscriptions", "start_time"})


class Nodes:
    """Membership operations of one node."""

    def __init__(self, node: AdminNode, cluster: Cluster) -> None:
        self.node = node
        self.cluster = cluster
        self.name = node.config.node_name
        self._lock = asyncio.Lock()

    async def read(self) -> members.Membership:
        """This node's hdb_nodes, tombstones included."""
        request = spb.SnapshotRequest(database=members.DATABASE, tables=[members.TABLE])
        chunks = await self.node.stream(
            self.node.storage_node.Snapshot, request, self.node.internal
        )
        return members.parse_rows([r for c in chunks for r in c.rows], self.name)

    async def _write(self, rows: Iterable[Row]) -> None:
        records = [orjson.dumps(r) for r in rows]
        if records:
            request = spb.UpsertRequest(
                database=members.DATABASE, table=members.TABLE, records=records, merge=True
            )
            await self.node.call(self.node.storage.Upsert, request, self.node.internal)

    async def _delete(self, names: Iterable[str]) -> None:
        ids = [orjson.dumps(n) for n in names]
        if ids:
            request = spb.DeleteRequest(database=members.DATABASE, table=members.TABLE, ids=ids)
            await self.node.call(self.node.storage.Delete, request, self.node.internal)

    async def add(self, row: Row) -> Row:
        name = row[members.PRIMARY_KEY]
        async with self._lock:
            current = await self.read()
            if name in current.rows:
                raise AlreadyExists(f"{name} is already a member of the cluster")
            await self._write([row])
        return row

    async def record(self, row: Row) -> Row:
        """Write a member's row whether or not it is there already: the end of a join
        this node started, whose target may be recorded already (its replicator records
        a peer admitted by the join as soon as it connects, and the target's own row
        replicates here), which is no reason to answer that the join failed. A row there
        already keeps what the new one leaves unset (None)."""
        name = row[members.PRIMARY_KEY]
        async with self._lock:
            old = (await self.read()).rows.get(name)
            if old is not None:
                row = {**old, **{k: v for k, v in row.items() if v is not None or k not in old}}
            await self._write([row])
        return row

    async def admit(self, row: Row) -> None:
        """Record a node this node signs a certificate for (the certificate exchange): its
        row is written unless it is a member already with the same url; a member with
        another url is refused (PermissionDenied), so no certificate is issued for it."""
        name = row[members.PRIMARY_KEY]
        async with self._lock:
            current = await self.read()
            old = current.rows.get(name)
            if old is not None:
                if old.get("url") != row.get("url"):
                    raise PermissionDenied(
                        f"{name} is already a member with url {old.get('url')!r}, not"
                        f" {row.get('url')!r}: no certificate is issued for another"
                        " member's name"
                    )
                return
            await self._write([row])

    async def update(self, name: str, changes: Row) -> Row:
        """Apply ``changes`` (columns) to a member's row; the result is validated whole.
        A change of the connection settings (url, replicates, subscriptions, start_time)
        is refused (FAILED_PRECONDITION) while this node has a route to the member in
        shoal.yaml: the route wins over the row here, so it would seem to succeed and
        change nothing on this node. (Revoked certificates and the shard count whatever
        the route says.)"""
        overridden = sorted(set(changes) & ROUTE_COLUMNS)
        if overridden and any(r.hostname == name for r in self.cluster.routes()):
            raise FailedPrecondition(
                f"this node has a route to {name} in shoal.yaml (replication.routes), which"
                f" wins over its member row's {', '.join(overridden)} here: change the route"
                " (cluster_set_routes, cluster_delete_routes), or update the node from a"
                " member with no route to it",
                reason="ROUTE_WINS",
            )
        async with self._lock:
            current = await self.read()
            old = current.rows.get(name)
            if old is None:
                raise NotFound(f"{name} is not a member of the cluster")
            merged = {**old, **changes, members.PRIMARY_KEY: name}
            row = validated_row(merged, self.name, merged.get("shard"))
            await self._write([row])
        return row

    async def clear_own_shard(self) -> bool:
        """Set this node's own row's shard to none (it left every shard); False when it
        has no live row."""
        async with self._lock:
            current = await self.read()
            if self.name not in current.rows:
                return False
            await self._write([{members.PRIMARY_KEY: self.name, "shard": None}])
        return True

    async def remove(self, name: str) -> Row:
        if name == self.name:
            raise InvalidArgument(
                f"{name} is this node itself: remove it from another member of the cluster"
            )
        async with self._lock:
            current = await self.read()
            old = current.rows.get(name)
            if old is None:
                raise NotFound(f"{name} is not a member of the cluster")
            await self._delete([name])
        if any(r.hostname == name for r in self.cluster.routes()):
            await self.cluster.delete_routes([name])
        return old

    async def configure(self, rows: list[Row]) -> Configured:
        names = [r[members.PRIMARY_KEY] for r in rows]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidArgument(f"configure_cluster: listed twice: {', '.join(twice)}")
        outcome = Configured()
        async with self._lock:
            current = await self.read()
            for row in rows:
                name = row[members.PRIMARY_KEY]
                (outcome.updated if name in current.rows else outcome.added).append(row)
            outcome.removed = sorted(
                n for n in current.rows if n != self.name and n not in set(names)
            )
            # Removals first: a removed node that still hears from this one learns of its
            # removal before it learns of the new members (and stops dialing members).
            await self._delete(outcome.removed)
            await self._write(rows)
        return outcome


def start_time_text(value: Any, operation: str) -> Any:
    """Harper's start_time as ISO text (Unix milliseconds are accepted too)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC).isoformat().replace("+00:00", "Z")
    if value is None or isinstance(value, str):
        return value
    raise InvalidArgument(f"{operation}: 'start_time' must be an ISO time or Unix milliseconds")
