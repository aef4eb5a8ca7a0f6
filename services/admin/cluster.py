"""Cluster operations: status and routes. The typed RPCs and Execute both call these.

Routes live in the node's shoal.yaml (`replication.routes`): the file is the source of
truth, re-read on every call, rewritten atomically after validation, and then the
replicator is told the complete new list. Edits are serialized by one lock, so two
concurrent changes cannot lose each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.node import AdminNode
from services.common.config import ConfigError, Route, load_config
from services.common.errors import FailedPrecondition, InvalidArgument, ShoalError
from services.common.routes import (
    configured_entries,
    from_proto,
    to_proto,
    to_yaml,
    with_routes,
    write_config_data,
)

RESIDENCY_STATUS_TIMEOUT_S = 5.0  # the storage's residency status in ClusterStatus


@dataclass
class RouteChange:
    """Routes changed and skipped by a set or delete; ``entries``: the changed routes as
    shoal.yaml holds them (a string or a mapping each, in the form they were given)."""

    changed: list[Route] = field(default_factory=list)
    skipped: list[Route] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    entries: list[Any] = field(default_factory=list)


class Cluster:
    """Cluster operations of one node."""

    def __init__(self, node: AdminNode) -> None:
        self.node = node
        # Serializes changes of shoal.yaml: routes and set_configuration (shards.py).
        self.config_lock = asyncio.Lock()

    async def status(self) -> apb.ClusterStatusResponse:
        reply = await self.node.call(
            self.node.replicator.Status, rpb.StatusRequest(), self.node.internal, "the replicator"
        )
        status = apb.ClusterStatusResponse(
            node_name=reply.node_name,
            is_enabled=True,
            connections=reply.connections,
            removed=reply.removed,
            shard=reply.shard if reply.HasField("shard") else None,
        )
        try:
            residency = await self.node.call(
                self.node.storage.ResidencyStatus,
                spb.ResidencyStatusRequest(),
                self.node.internal,
                deadline_s=RESIDENCY_STATUS_TIMEOUT_S,
            )
            status.residency.CopyFrom(residency)
        except ShoalError as exc:
            status.residency_error = exc.message
        return status

    def configuration(self) -> dict[str, Any]:
        """This node's shoal.yaml as JSON, without the bootstrap credentials (``admin``)."""
        source = self.node.config.source
        if source is None:
            raise FailedPrecondition("this node was started without a configuration file")
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        data.pop("admin", None)
        return dict(data)

    def routes(self) -> list[Route]:
        source = self.node.config.source
        if source is None:
            return list(self.node.config.replication.routes)
        return list(load_config(source).replication.routes)

    def route_entries(self) -> list[tuple[Route, Any]]:
        """Each route with its entry as shoal.yaml holds it (a string or a mapping, in the
        form it was given: Harper answers routes so)."""
        source = self.node.config.source
        if source is None:
            return [(r, to_yaml(r)) for r in self.node.config.replication.routes]
        routes = list(load_config(source).replication.routes)
        return list(zip(routes, configured_entries(source, routes), strict=True))

    def _validate(self, routes: Iterable[rpb.Route]) -> list[Route]:
        try:
            return from_proto(routes, self.node.config.node_name)
        except ConfigError as exc:
            raise InvalidArgument("; ".join(exc.problems)) from exc

    async def _apply(self, entries: list[tuple[Route, Any]]) -> None:
        """Validate the new routes with the whole file, have the replicator apply them,
        and only then write shoal.yaml: a refused change leaves both as they were."""
        source = self.node.config.source
        routes = [r for r, _ in entries]
        data = None
        if source is not None:
            try:
                data = with_routes(source, routes, [e for _, e in entries])
            except ConfigError as exc:
                raise InvalidArgument("; ".join(exc.problems)) from exc
        request = rpb.SetRoutesRequest(routes=[to_proto(r) for r in routes])
        await self.node.call(
            self.node.replicator.SetRoutes, request, self.node.internal, "the replicator"
        )
        if source is not None and data is not None:
            write_config_data(source, data)

    async def set_routes(
        self, requested: Iterable[rpb.Route], given: Mapping[str, Any] | None = None
    ) -> RouteChange:
        """Add routes to peers without one (the others are skipped). ``given``: the
        shoal.yaml entry of a route by host name, in the form its caller gave it (else
        the route's shortest form)."""
        additions = self._validate(requested)
        async with self.config_lock:
            current = self.route_entries()
            known = {r.hostname for r, _ in current}
            change = RouteChange()
            for route in additions:
                if route.hostname in known:
                    change.skipped.append(route)
                else:
                    change.changed.append(route)
                    change.entries.append((given or {}).get(route.hostname) or to_yaml(route))
                    known.add(route.hostname)
            if change.changed:
                await self._apply(current + list(zip(change.changed, change.entries, strict=True)))
            return change

    async def delete_routes(self, hostnames: Iterable[str]) -> RouteChange:
        names = list(dict.fromkeys(hostnames))
        if not names:
            raise InvalidArgument("no routes given")
        async with self.config_lock:
            current = self.route_entries()
            change = RouteChange()
            by_name = {r.hostname: (r, e) for r, e in current}
            for name in names:
                if name in by_name:
                    route, entry = by_name.pop(name)
                    change.changed.append(route)
                    change.entries.append(entry)
                else:
                    change.missing.append(name)
            if change.changed:
                await self._apply(list(by_name.values()))
            return change
