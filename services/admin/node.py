"""The admin service's view of its node: gRPC clients of the node's storage and
replicator, and the caller whose request is being served.

Data and user operations go to storage *with the caller's own credentials*, so storage
applies the caller's role exactly as for a direct client, and with the caller's address
(``shoal-forwarded-for``, vouched for with the node secret), so storage throttles failed
sign-ins by where the caller is, not by where this service is. Cluster operations go to the
replicator with the node-internal identity, after the admin service checked that the
caller is a super user.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from shoal.lifecycle.v1 import lifecycle_pb2_grpc
from shoal.replicator.v1 import replicator_pb2_grpc
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import storage_pb2_grpc

from services.admin.jobs import Jobs
from services.common.auth import Identity, acting_for_metadata, bearer_metadata, identity
from services.common.config import ShoalConfig
from services.common.errors import (
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    from_rpc_error,
)
from services.common.grpcserver import channel_options
from services.common.lifecycle import Lifecycle
from services.common.node_tls import NodeTls, node_channel
from services.common.sources import current_peer, forwarded_for_metadata, source_text

T = TypeVar("T")
CALL_TIMEOUT_S = 60.0
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Caller:
    """Who is calling the admin service, and the credentials to act as them."""

    identity: Identity
    metadata: Metadata

    def member_metadata(self, operation: str) -> Metadata:
        """The credentials to send other members' admin services for ``operation``: the
        caller's own. A caller signed in by its client certificate has none (its storage
        calls carry this node's secret, which must never leave the node), so
        FailedPrecondition asks for a password."""
        if isinstance(self.identity, CertificateIdentity):
            raise FailedPrecondition(
                f"{operation} runs on other members with the caller's credentials, and"
                f" {self.identity.name} signed in with a client certificate, which other"
                " members do not see: sign in with a password for it"
            )
        return self.metadata

    def require_super_user(self, operation: str) -> None:
        if not self.identity.super_user:
            raise PermissionDenied(
                f"{operation} needs a super user; {self.identity.name} is not one",
                metadata={"user": self.identity.name, "action": operation},
            )


def forwarded(metadata: Sequence[tuple[str, str | bytes]]) -> Metadata:
    """The caller's authorization metadata, to forward to storage."""
    return tuple(
        (k, v.decode() if isinstance(v, bytes) else v)
        for k, v in metadata
        if k.lower() == "authorization"
    )


def forwarded_with_source(metadata: Sequence[tuple[str, str | bytes]], secret: str) -> Metadata:
    """The caller's authorization, plus the caller's address vouched for with the node
    secret (``shoal-forwarded-for``), so storage throttles failed sign-ins by the
    caller's address rather than this service's."""
    credentials = forwarded(metadata)
    if not credentials:
        return credentials
    return (*credentials, *forwarded_for_metadata(secret, source_text(current_peer.get())))


class AdminNode:
    """Clients of this node's services."""

    def __init__(self, node_tls: NodeTls, secret: str) -> None:
        config: ShoalConfig = node_tls.config
        self.config = config
        self.node_tls = node_tls
        self.lifecycle = Lifecycle("admin")  # this process's restart (served by start_server)
        self.jobs = Jobs()  # background operations (CSV loads, deleting old logs)
        self.secret = secret
        self.internal: Metadata = bearer_metadata(secret)
        # The node-local sockets of storage and the replicator.
        max_bytes = config.storage.max_message_bytes
        self._storage_channel = node_channel(config, "storage", max_bytes)
        self._replicator_channel = node_channel(config, "replicator", max_bytes)
        self.storage = storage_pb2_grpc.StorageServiceStub(self._storage_channel)
        self.storage_node = storage_pb2_grpc.StorageNodeServiceStub(self._storage_channel)
        self.replicator = replicator_pb2_grpc.ReplicatorNodeServiceStub(self._replicator_channel)
        self.lifecycles = {
            "storage": lifecycle_pb2_grpc.LifecycleServiceStub(self._storage_channel),
            "replicator": lifecycle_pb2_grpc.LifecycleServiceStub(self._replicator_channel),
        }

    def member_channel(self, host: str) -> grpc.aio.Channel:
        """A channel to the admin service of the member ``host``: on this node's admin port
        (members are configured alike), over TLS trusting this node's CA when this node's
        admin port serves TLS."""
        address = f"[{host}]" if ":" in host else host
        address = f"{address}:{self.config.operations_api.port}"
        options = channel_options(self.config.storage.max_message_bytes)
        if self.node_tls.material is None or not self.node_tls.serves_tls("admin"):
            return grpc.aio.insecure_channel(address, options=options)
        credentials = self.node_tls.client_port_credentials("admin")
        return grpc.aio.secure_channel(address, credentials, options=options)

    async def close(self) -> None:
        await self._storage_channel.close()
        await self._replicator_channel.close()

    async def call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        metadata: Metadata,
        service: str = "storage",
        deadline_s: float = CALL_TIMEOUT_S,
    ) -> T:
        """A unary call whose errors come back as the same ShoalError (code and message)."""
        try:
            return await method(request, metadata=metadata, timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, service) from exc

    async def stream(
        self, method: Callable[..., Any], request: Any, metadata: Metadata
    ) -> list[Any]:
        """All messages of a server-streaming call, with errors mapped as in ``call``."""
        try:
            return [m async for m in method(request, metadata=metadata, timeout=CALL_TIMEOUT_S)]
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "storage") from exc


@dataclass(frozen=True)
class CertificateIdentity(Identity):
    """An admin caller authenticated by its client certificate (``operationsApi.mtls``):
    it has no credentials to forward, so storage calls act for it with the node secret
    (``forward``, see ``services.common.auth``)."""

    forward: Metadata = ()


class StorageAuthenticator:
    """Authenticates admin callers through the node's storage (where users live).

    A caller with an ``authorization`` header is checked by storage with those
    credentials, which later calls forward. A caller without one, whose verified client
    certificate names a user, is checked by storage with the node secret acting for that
    user (it must exist and be active); later calls act for the user the same way, and
    storage applies the user's role to each."""

    def __init__(self, node: AdminNode) -> None:
        self._node = node

    async def authenticate(
        self,
        metadata: tuple[tuple[str, str | bytes], ...],
        certificate_user: str | None = None,
    ) -> Identity:
        credentials = forwarded(metadata)
        if not credentials and certificate_user is not None:
            acting = acting_for_metadata(self._node.secret, certificate_user)
            reply = await self._node.call(
                self._node.storage.Authenticate, spb.AuthenticateRequest(), acting
            )
            return CertificateIdentity(
                name=reply.username, super_user=reply.super_user, forward=acting
            )
        if not credentials:
            raise Unauthenticated("Must login")
        reply = await self._node.call(
            self._node.storage.Authenticate,
            spb.AuthenticateRequest(),
            forwarded_with_source(metadata, self._node.secret),
        )
        return Identity(name=reply.username, super_user=reply.super_user, internal=reply.internal)


def current_caller(metadata: Sequence[tuple[str, str | bytes]], secret: str) -> Caller:
    """The caller of the RPC being served (authenticated by the interceptor)."""
    who = identity()
    if isinstance(who, CertificateIdentity):
        return Caller(who, who.forward)
    return Caller(who, forwarded_with_source(metadata, secret))
