"""The AdminService handlers: typed RPCs and Execute share cluster.py and storage."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc

from services.admin import harper
from services.admin.cluster import Cluster
from services.admin.node import AdminNode, Caller, current_caller
from services.common.routes import to_proto

Ctx = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """gRPC edge of the admin service."""

    def __init__(self, node: AdminNode) -> None:
        self.node = node
        self.cluster = Cluster(node)

    @staticmethod
    def _caller(context: Ctx) -> Caller:
        return current_caller(tuple(context.invocation_metadata() or ()))

    async def Execute(self, request: apb.ExecuteRequest, context: Ctx) -> apb.ExecuteResponse:
        execute = harper.Execute(self.node, self._caller(context), self.cluster)
        result, code = await harper.run(execute, request.operation)
        return apb.ExecuteResponse(result=orjson.dumps(result), code=code)

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
