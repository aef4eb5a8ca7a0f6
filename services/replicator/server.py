"""The replicator's gRPC handlers: peers' Replicate streams (ReplicatorService, on the
replication ports) and the node-internal RPCs (ReplicatorNodeService, on the node-local
socket only)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc

from services.common.auth import BearerToken, parse_authorization
from services.common.config import ConfigError
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.common.routes import from_proto, to_proto
from services.common.tls import peer_names
from services.replicator.confirmation import Group
from services.replicator.handover import hand_over
from services.replicator.peer import ConnectionLost
from services.replicator.peercheck import PeerCertificate
from services.replicator.replicator import Replicator
from services.replicator.transport import AcceptedStream

log = logging.getLogger("shoal.replicator")
Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_WAIT_MS = 3_600_000


class ReplicatorServicer(replicator_pb2_grpc.ReplicatorServiceServicer):
    """The peers' edge of the replicator."""

    def __init__(self, replicator: Replicator) -> None:
        self.replicator = replicator

    async def Replicate(  # type: ignore[override]
        self, request_iterator: AsyncIterator[rpb.ReplicateRequest], context: Ctx
    ) -> None:
        auth = context.auth_context()
        secure = auth.get("transport_security_type") == [b"ssl"]
        names = peer_names(auth) if secure else None
        certificate = None
        if secure:
            pem = list(auth.get("x509_pem_cert", []))
            if pem:
                certificate = PeerCertificate.from_pem(pem[0])
            if not names or certificate is None:
                # gRPC requires a client certificate, so this is a certificate naming
                # nothing: refused here, and logged with what is known of it.
                log.warning(
                    "refused a dialer from %s (%s): a client certificate naming the node is"
                    " required on the secure replication port",
                    context.peer(),
                    certificate.describe() if certificate is not None else "no certificate",
                )
                raise Unauthenticated(
                    "a client certificate is required on the secure replication port"
                )
        try:
            await self.replicator.accept(
                AcceptedStream(context, context.peer()), names, certificate
            )
        except ConnectionLost:
            return


class ReplicatorNodeServicer(replicator_pb2_grpc.ReplicatorNodeServiceServicer):
    """The node's own services' edge of the replicator (node identity only)."""

    def __init__(self, replicator: Replicator, node_secret: str) -> None:
        self.replicator = replicator
        self._secret = node_secret

    def _internal(self, context: Ctx) -> None:
        credentials = parse_authorization(tuple(context.invocation_metadata() or ()))
        if not isinstance(credentials, BearerToken):
            raise PermissionDenied("this RPC is for the node's own services")
        if not hmac.compare_digest(credentials.token.encode(), self._secret.encode()):
            raise Unauthenticated("invalid node credentials")

    async def Status(self, request: rpb.StatusRequest, context: Ctx) -> rpb.StatusResponse:
        self._internal(context)
        return self.replicator.status()

    async def SetRoutes(self, request: rpb.SetRoutesRequest, context: Ctx) -> rpb.SetRoutesResponse:
        self._internal(context)
        try:
            routes = from_proto(request.routes, self.replicator.name)
        except ConfigError as exc:
            raise InvalidArgument("; ".join(exc.problems)) from exc
        self.replicator.set_routes(routes)
        return rpb.SetRoutesResponse(routes=[to_proto(r) for r in routes])

    async def ListRecipients(
        self, request: rpb.ListRecipientsRequest, context: Ctx
    ) -> rpb.ListRecipientsResponse:
        self._internal(context)
        if not request.database:
            raise InvalidArgument("ListRecipients needs a database")
        return rpb.ListRecipientsResponse(
            peers=self.replicator.recipients(request.database, request.tables)
        )

    async def FetchRecords(
        self, request: rpb.FetchRecordsRequest, context: Ctx
    ) -> rpb.FetchRecordsResponse:
        self._internal(context)
        return await self.replicator.fetches.fetch(request)

    async def HandOver(self, request: rpb.HandOverRequest, context: Ctx) -> rpb.HandOverResponse:
        self._internal(context)
        return await hand_over(self.replicator, request)

    async def WaitReplicated(
        self, request: rpb.WaitReplicatedRequest, context: Ctx
    ) -> rpb.WaitReplicatedResponse:
        self._internal(context)
        if not request.database:
            raise InvalidArgument("WaitReplicated needs a database")
        if request.version == 0:
            raise InvalidArgument("WaitReplicated needs the version of a committed transaction")
        if request.count < 1 and not request.groups:
            raise InvalidArgument(
                "WaitReplicated needs a count of at least 1 peer or a group of peers"
            )
        groups = []
        for i, group in enumerate(request.groups):
            members = frozenset(group.peers)
            if not members or len(members) != len(group.peers) or "" in members:
                raise InvalidArgument(
                    f"WaitReplicated group {i} needs distinct, non-empty peer names"
                )
            if not 1 <= group.count <= len(members):
                raise InvalidArgument(
                    f"WaitReplicated group {i} count must be 1 to its {len(members)} peers,"
                    f" not {group.count}"
                )
            groups.append(Group(members, group.count))
        if not 1 <= request.timeout_ms <= MAX_WAIT_MS:
            raise InvalidArgument(
                f"WaitReplicated timeout_ms must be 1 to {MAX_WAIT_MS}, not {request.timeout_ms}"
            )
        peers = await self.replicator.confirmations.wait(
            request.database,
            request.version,
            request.count,
            request.timeout_ms / 1000,
            groups,
        )
        return rpb.WaitReplicatedResponse(confirmed_peers=peers)
