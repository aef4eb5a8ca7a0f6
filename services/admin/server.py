"""The AdminService handlers: typed RPCs and Execute share cluster.py and storage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.storage.v1 import storage_pb2 as spb

from services.admin import analytics, clusterwide, operations, shards
from services.admin.backup import Backups, drain
from services.admin.budget import BudgetSettings, MemoryBudget, estimate
from services.admin.certificates import (
    Certificates,
    NewCertificate,
    certificate_message,
)
from services.admin.cluster import Cluster
from services.admin.configuration import settings_from
from services.admin.exchange import Exchange, JoinRequest, authorization_header
from services.admin.node import AdminNode, Caller, current_caller
from services.admin.nodes import Nodes, node_message, row_from_route
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.routes import to_proto

Ctx = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """gRPC edge of the admin service."""

    def __init__(self, node: AdminNode) -> None:
        self.node = node
        self.cluster = Cluster(node)
        self.backups = Backups(node)
        self.nodes = Nodes(node, self.cluster)
        self.certificates = Certificates(node)
        self.exchange = Exchange(node, self.nodes)
        api = node.config.operations_api
        self.budget = MemoryBudget(BudgetSettings(api.max_request_memory, api.max_memory))

    def _caller(self, context: Ctx) -> Caller:
        return current_caller(tuple(context.invocation_metadata() or ()), self.node.secret)

    async def Execute(self, request: apb.ExecuteRequest, context: Ctx) -> apb.ExecuteResponse:
        return await self.execute(
            self._caller(context), request.operation, context.time_remaining()
        )

    async def execute(
        self, caller: Caller, operation: bytes, time_remaining: float | None
    ) -> apb.ExecuteResponse:
        """One JSON operation for ``caller``: the one path of Execute and of the HTTP form
        of the operations API (services/admin/http.py). Refused before it is parsed when
        its estimate does not fit (budget.py): ResourceExhausted, raised."""
        reservation = self.budget.reserve(estimate(operation))
        try:
            execute = operations.Execute(
                self.node,
                caller,
                self.cluster,
                self.nodes,
                self.certificates,
                self.exchange,
                operations.deadline_of(time_remaining),
                reservation,
            )
            result, code = await operations.run(execute, operation)
            return operations.answer(result, code)
        finally:
            reservation.release()

    # -- backups ------------------------------------------------------------------------

    async def GetBackup(
        self, request: apb.GetBackupRequest, context: Ctx
    ) -> AsyncIterator[apb.GetBackupResponse]:
        self._caller(context).require_super_user("get_backup")
        stream = self.backups.stream(request.database)
        async for chunk in stream.chunks():
            yield apb.GetBackupResponse(chunk=chunk)
        assert stream.result is not None
        yield apb.GetBackupResponse(info=stream.result.info())

    async def RestoreBackup(
        self, request_iterator: AsyncIterator[apb.RestoreBackupRequest], context: Ctx
    ) -> apb.RestoreBackupResponse:
        try:
            self._caller(context).require_super_user("restore_backup")
        except PermissionDenied:
            await drain(request_iterator)
            raise
        result = await self.backups.restore_upload(request_iterator)
        return result.response()

    async def ClusterStatus(
        self, request: apb.ClusterStatusRequest, context: Ctx
    ) -> apb.ClusterStatusResponse:
        self._caller(context).require_super_user("cluster_status")
        return await self.cluster.status()

    async def GetRoutes(self, request: apb.GetRoutesRequest, context: Ctx) -> apb.GetRoutesResponse:
        self._caller(context).require_super_user("cluster_get_routes")
        return apb.GetRoutesResponse(routes=[to_proto(r) for r in self.cluster.routes()])

    async def SetRoutes(self, request: apb.SetRoutesRequest, context: Ctx) -> apb.SetRoutesResponse:
        self._caller(context).require_super_user("cluster_set_routes")
        change = await self.cluster.set_routes(request.routes)
        return apb.SetRoutesResponse(
            set=[to_proto(r) for r in change.changed], skipped=[to_proto(r) for r in change.skipped]
        )

    async def DeleteRoutes(
        self, request: apb.DeleteRoutesRequest, context: Ctx
    ) -> apb.DeleteRoutesResponse:
        self._caller(context).require_super_user("cluster_delete_routes")
        change = await self.cluster.delete_routes(request.hostnames)
        return apb.DeleteRoutesResponse(
            deleted=[to_proto(r) for r in change.changed], skipped=change.missing
        )

    # -- analytics ----------------------------------------------------------------------

    async def GetAnalytics(
        self, request: apb.GetAnalyticsRequest, context: Ctx
    ) -> apb.GetAnalyticsResponse:
        caller = self._caller(context)
        caller.require_super_user("get_analytics")
        query = analytics.query_from_proto(request)
        rows = await analytics.get_analytics(self.node, caller, query)
        return apb.GetAnalyticsResponse(rows=[analytics.row_to_proto(r) for r in rows])

    async def ListMetrics(
        self, request: apb.ListMetricsRequest, context: Ctx
    ) -> apb.ListMetricsResponse:
        types = list(request.metric_types) or ["builtin"]
        return apb.ListMetricsResponse(metrics=analytics.list_metrics(self._caller(context), types))

    # -- membership ---------------------------------------------------------------------

    def _shard(self, request: Any) -> int | None:
        return request.shard if request.HasField("shard") else None

    async def AddNode(self, request: apb.AddNodeRequest, context: Ctx) -> apb.AddNodeResponse:
        self._caller(context).require_super_user("add_node")
        row = row_from_route(request.route, self.nodes.name, self._shard(request))
        if request.authorization:
            if request.HasField("admin_port") and not 0 < request.admin_port <= 65535:
                raise InvalidArgument("AddNode: 'admin_port' must be a port number (1 to 65535)")
            join = JoinRequest(
                row=row,
                authorization=authorization_header(request.authorization, "AddNode"),
                verify_tls=request.verify_tls if request.HasField("verify_tls") else True,
                admin_port=request.admin_port if request.HasField("admin_port") else None,
            )
            written = await self.exchange.join(join)
        else:
            written = await self.nodes.add(row)
        return apb.AddNodeResponse(node=node_message(written, self.nodes.name))

    async def SignNodeCertificate(
        self, request: apb.SignNodeCertificateRequest, context: Ctx
    ) -> apb.SignNodeCertificateResponse:
        self._caller(context).require_super_user("SignNodeCertificate")
        return await self.exchange.sign(request)

    async def UpdateNode(
        self, request: apb.UpdateNodeRequest, context: Ctx
    ) -> apb.UpdateNodeResponse:
        self._caller(context).require_super_user("update_node")
        row = row_from_route(request.route, self.nodes.name, self._shard(request))
        if not request.HasField("shard"):
            row.pop("shard")
        written = await self.nodes.update(request.route.hostname, row)
        return apb.UpdateNodeResponse(node=node_message(written, self.nodes.name))

    async def RemoveNode(
        self, request: apb.RemoveNodeRequest, context: Ctx
    ) -> apb.RemoveNodeResponse:
        self._caller(context).require_super_user("remove_node")
        removed = await self.nodes.remove(request.name)
        return apb.RemoveNodeResponse(node=node_message(removed, self.nodes.name))

    async def ListNodes(self, request: apb.ListNodesRequest, context: Ctx) -> apb.ListNodesResponse:
        self._caller(context).require_super_user("list_nodes")
        membership = await self.nodes.read()
        return apb.ListNodesResponse(
            nodes=[node_message(r, self.nodes.name) for _, r in sorted(membership.rows.items())],
            removed=sorted(membership.removed),
        )

    async def ConfigureCluster(
        self, request: apb.ConfigureClusterRequest, context: Ctx
    ) -> apb.ConfigureClusterResponse:
        self._caller(context).require_super_user("configure_cluster")
        rows = [
            row_from_route(r, self.nodes.name, None, f"routes[{i}]: ")
            for i, r in enumerate(request.routes)
        ]
        for row in rows:
            row.pop("shard")
        done = await self.nodes.configure(rows)
        name = self.nodes.name
        return apb.ConfigureClusterResponse(
            added=[node_message(r, name) for r in done.added],
            updated=[node_message(r, name) for r in done.updated],
            removed=done.removed,
        )

    # -- certificates -------------------------------------------------------------------

    async def AddCertificate(
        self, request: apb.AddCertificateRequest, context: Ctx
    ) -> apb.AddCertificateResponse:
        self._caller(context).require_super_user("add_certificate")
        new = NewCertificate(
            name=request.name,
            certificate=request.certificate,
            private_key=request.private_key,
            is_authority=request.is_authority if request.HasField("is_authority") else None,
        )
        row = await self.certificates.add(new)
        return apb.AddCertificateResponse(certificate=certificate_message(row))

    async def ListCertificates(
        self, request: apb.ListCertificatesRequest, context: Ctx
    ) -> apb.ListCertificatesResponse:
        self._caller(context).require_super_user("list_certificates")
        rows = await self.certificates.list()
        return apb.ListCertificatesResponse(certificates=[certificate_message(r) for r in rows])

    async def RemoveCertificate(
        self, request: apb.RemoveCertificateRequest, context: Ctx
    ) -> apb.RemoveCertificateResponse:
        self._caller(context).require_super_user("remove_certificate")
        row = await self.certificates.remove(request.name)
        return apb.RemoveCertificateResponse(certificate=certificate_message(row))

    # -- cluster-wide operations --------------------------------------------------------

    async def SetConfiguration(
        self, request: apb.SetConfigurationRequest, context: Ctx
    ) -> apb.SetConfigurationResponse:
        caller = self._caller(context)
        caller.require_super_user("set_configuration")
        try:
            settings = orjson.loads(request.settings)
        except orjson.JSONDecodeError as exc:
            raise InvalidArgument(f"set_configuration: settings are not valid JSON: {exc}") from exc
        if not isinstance(settings, dict):
            raise InvalidArgument("set_configuration: settings must be a JSON object")
        settings = settings_from(settings)
        keep = request.keep_sharded_data or request.replicated
        outcome = await shards.set_configuration(self.nodes, settings, keep)
        reply = apb.SetConfigurationResponse(keys=outcome.keys)
        if outcome.shard_change is not None:
            reply.shard_change.CopyFrom(outcome.shard_change.message())
        if request.replicated:
            # Every member moves to the one shard, keeping what it holds (see shards.py).
            names = await clusterwide.members(self.nodes, self.cluster)
            operation = {"operation": "set_configuration", **settings, "keep_sharded_data": True}
            metadata = caller.member_metadata("set_configuration with replicated")
            results = await clusterwide.fan_out(
                self.node, names, operation, metadata, limit_s=clusterwide.MEMBER_RESTART_TIMEOUT_S
            )
            reply.replicated.extend(r.message() for r in results)
        return reply

    async def Rebalance(self, request: apb.RebalanceRequest, context: Ctx) -> apb.RebalanceResponse:
        caller = self._caller(context)
        caller.require_super_user("rebalance")
        reply = await self.node.call(
            self.node.storage.Rebalance,
            spb.RebalanceRequest(database=request.database, dry_run=request.dry_run),
            caller.metadata,
        )
        response = apb.RebalanceResponse(progress=reply.progress)
        if request.replicated:
            names = await clusterwide.members(self.nodes, self.cluster)
            operation = {
                "operation": "rebalance",
                "database": request.database,
                "dry_run": request.dry_run,
            }
            results = await clusterwide.fan_out(self.node, names, operation, caller.metadata)
            response.replicated.extend(r.message() for r in results)
        return response

    async def Restart(self, request: apb.RestartRequest, context: Ctx) -> apb.RestartResponse:
        caller = self._caller(context)
        caller.require_super_user("restart")
        services = clusterwide.services_to_restart(request.services)
        metadata = caller.member_metadata("restart with replicated") if request.replicated else ()
        done = await clusterwide.restart(
            self.node, self.nodes, self.cluster, services, request.replicated, metadata
        )
        return apb.RestartResponse(
            services=done.services, replicated=[r.message() for r in done.replicated]
        )
