"""Cluster operations: status and routes. The typed RPCs and Execute both call these.

Routes live in the node's shoal.yaml (`replication.routes`): the file is the source of
truth, re-read on every call, rewritten atomically after validation, and then the
replicator is told the complete new list. Edits are serialized by one lock, so two
concurrent changes cannot lose each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.node import AdminNode
from services.common.config import ConfigError, Route, load_config
from services.common.errors import FailedPrecondition, InvalidArgument, ShoalError
from services.common.routes import from_proto, to_proto, with_routes, write_config_data

RESIDENCY_STATUS_TIMEOUT_S = 5.0  # the storage's residency status in ClusterStatus


@dataclass
class RouteChange:
    """Routes changed and skipped by a set or delete."""

    changed: list[Route] = field(default_factory=list)
    skipped: list[Route] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


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

    def _validate(self, routes: Iterable[rpb.Route]) -> list[Route]:
        try:
            return from_proto(routes, self.node.config.node_name)
        except ConfigError as exc:
            raise InvalidArgument("; ".join(exc.problems)) from exc

    async def _apply(self, routes: list[Route]) -> None:
        """Validate the new routes with the whole file, have the replicator apply them,
        and only then write shoal.yaml: a refused change leaves both as they were."""
        source = self.node.config.source
        data = None
        if source is not None:
            try:
                data = with_routes(source, routes)
            except ConfigError as exc:
                raise InvalidArgument("; ".join(exc.problems)) from exc
        request = rpb.SetRoutesRequest(routes=[to_proto(r) for r in routes])
        await self.node.call(
            self.node.replicator.SetRoutes, request, self.node.internal, "the replicator"
        )
        if source is not None and data is not None:
            write_config_data(source, data)

    async def set_routes(self, requested: Iterable[rpb.Route]) -> RouteChange:
        additions = self._validate(requested)
        async with self.config_lock:
            current = self.routes()
            known = {r.hostname for r in current}
            change = RouteChange()
            for route in additions:
                if route.hostname in known:
                    change.skipped.append(route)
                else:
                    change.changed.append(route)
                    known.add(route.hostname)
            if change.changed:
                await self._apply(current + change.changed)
            return change

    async def delete_routes(self, hostnames: Iterable[str]) -> RouteChange:
        names = list(dict.fromkeys(hostnames))
        if not names:
            raise InvalidArgument("no routes given")
        async with self.config_lock:
            current = self.routes()
            change = RouteChange()
            by_name = {r.hostname: r for r in current}
            for name in names:
                if name in by_name:
                    change.changed.append(by_name.pop(name))
                else:
                    change.missing.append(name)
            if change.changed:
                await self._apply(list(by_name.values()))
            return change
