"""The gRPC server edge shared by every Shoal service.

Every server runs ``ShoalInterceptor`` (``interceptor.py``) around the handlers of
Shoal's own services: authentication, the answer to a request that does not parse, error
mapping to a rich ``google.rpc.Status``, and call metrics (``RpcMetrics``, exported as
gRFC A66 metrics by ``services.common.metrics``). Health (``grpc.health.v1``) and
reflection are added to every server, need no credentials and are not counted.

A client port (storage, admin) serves TLS with the node's certificate when the node has
TLS material (``ServerSpec.tls``); with client certificates on (``storage.mtls``,
``operationsApi.mtls``: ``ServerSpec.client_certificates``) it requires one, and hands the
user it names to the authenticator. Each process also has a plaintext health port
(``HealthPort``, ``health.*`` in shoal.yaml) that serves ``grpc.health.v1`` and nothing
else, for orchestrator probes: it starts first (NOT_SERVING while the process starts),
shares the main port's statuses, and stops last (NOT_SERVING while it drains).

Node-internal RPCs (what only the node's own services call: replication, positions,
restarts, ...) are served on a second server bound to a Unix socket in the node's
``socketsPath`` (folder 0700, socket 0600), never on a TCP port: ``NodeSocket``. The
socket serves the service's client RPCs too, so the node's processes reach each other
there whatever the client ports' TLS settings.

A server with a ``StreamGuard`` (``ServerSpec.streams``, storage's) also limits its
connections and admits its streamed responses to clients (``streams.py``) on its TCP
port; the node socket serves the node's own processes without those limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from shoal.lifecycle.v1.lifecycle_pb2_grpc import add_LifecycleServiceServicer_to_server

from services.common.client_certificates import ClientCertificates
from services.common.config import ShoalConfig
from services.common.errors import Unavailable
from services.common.interceptor import Authenticator, ShoalInterceptor
from services.common.lifecycle import SERVICE_NAME as LIFECYCLE_SERVICE
from services.common.lifecycle import Lifecycle, LifecycleServicer
from services.common.metrics import MetricsServer, RpcMetrics, Source, start_metrics
from services.common.reflection import enable_reflection
from services.common.streams import StreamGuard
from services.common.tls_source import TlsSource, reloading_server_credentials

log = logging.getLogger("shoal.grpc")


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments for every Shoal server."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        # Never share a port with another process: two nodes on one address must fail.
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Channel arguments for every Shoal client channel (long-lived streams included)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


HEALTH_MAX_MESSAGE_BYTES = 64 * 1024
HEALTH_GRACE_S = 1.0


class HealthPort:
    """The health statuses of one process, and the plaintext port that serves only them
    (``server`` is None when ``health.enabled`` is false)."""

    def __init__(self, servicer: Any, server: grpc.aio.Server | None, address: str) -> None:
        self.servicer = servicer
        self.server = server
        self.address = address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(HEALTH_GRACE_S)


async def start_health_port(
    config: ShoalConfig, service: str, service_names: Sequence[str]
) -> HealthPort:
    """Statuses NOT_SERVING for the process (``""``) and each of ``service_names``, served
    on ``health.<service>Port`` (plaintext, ``grpc.health.v1`` only, no authentication).
    Start it before anything slow, and hand it to ``ServerSpec.health``."""
    servicer = health.aio.HealthServicer()
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.health.port(service)}"
    if not config.health.enabled:
        return HealthPort(servicer, None, address)
    server = grpc.aio.server(options=server_options(HEALTH_MAX_MESSAGE_BYTES))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise Unavailable(f"{service} cannot listen on its health port {address}: {exc}") from exc
    if port == 0:
        raise Unavailable(f"{service} cannot listen on its health port {address} (address in use?)")
    await server.start()
    log.info("%s health port listening on %s", service, address)
    return HealthPort(servicer, server, address)


@dataclass
class ServerSpec:
    """What one service process serves."""

    name: str
    address: str
    service_names: list[str]
    register: Callable[[grpc.aio.Server], None]
    authenticator: Authenticator | None
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int | None = None
    # Per-method call counts and durations, filled by the interceptor (see metrics.py).
    rpc_metrics: RpcMetrics = field(default_factory=RpcMetrics)
    # Run before the server stops (end long-lived streams), then after it stopped.
    pre_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    grace_s: float = 10.0
    # Serve TLS from these files, re-read when they change (a client port of a node with
    # TLS); None: plaintext.
    tls: TlsSource | None = None
    # Require client certificates on the TLS port, and authenticate calls by the user they
    # name (ClientCertificates.from_config); None: no client certificate is asked for.
    client_certificates: ClientCertificates | None = None
    # The process's statuses and health port (start_health_port), stopped last; None:
    # statuses of the main port only.
    health: HealthPort | None = None
    # Restart in place (shoal.lifecycle.v1, served on the node socket); None: a new one.
    lifecycle: Lifecycle | None = None
    # The node-local socket (NodeSocket.path) serving the client services plus
    # ``register_internal``'s node-internal ones; None: no socket.
    socket: Path | None = None
    register_internal: Callable[[grpc.aio.Server], None] | None = None
    # Serve shoal.lifecycle.v1 on the TCP port too (admin: for super users' rolling
    # restarts across nodes), not only on the socket.
    lifecycle_on_port: bool = False
    # Connection and stream limits of the TCP port (services/common/streams.py); None:
    # gRPC's defaults.
    streams: StreamGuard | None = None


class RunningServer:
    """A started server (and its node socket's) with its health servicer."""

    def __init__(
        self,
        spec: ServerSpec,
        server: grpc.aio.Server,
        health_servicer: Any,
        socket_server: grpc.aio.Server | None = None,
    ) -> None:
        self.spec = spec
        self.server = server
        self.health = health_servicer
        self.socket_server = socket_server

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.spec.service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.set_serving(False)
        for hook in self.spec.pre_stop:
            await hook()
        stopping = [self.server.stop(self.spec.grace_s)]
        if self.socket_server is not None:
            stopping.append(self.socket_server.stop(self.spec.grace_s))
        await asyncio.gather(*stopping)
        if self.spec.socket is not None:
            with contextlib.suppress(OSError):
                self.spec.socket.unlink()
        for hook in self.spec.on_stop:
            await hook()
        if self.spec.health is not None:
            await self.spec.health.stop()


def attach_metrics(
    spec: ServerSpec,
    config: ShoalConfig,
    loop_sources: Sequence[Source] = (),
    thread_sources: Sequence[Source] = (),
) -> MetricsServer | None:
    """Serve the metrics of the service ``spec`` describes on ``metrics.<name>Port``: its
    per-RPC statistics plus the given sources (see ``metrics.start_metrics``). The
    endpoint closes first when the server stops. Call it on the event loop, before
    ``start_server``; None when ``metrics.enabled`` is false."""
    server = start_metrics(config, spec.name, spec.rpc_metrics, loop_sources, thread_sources)
    if server is not None:
        spec.pre_stop.insert(0, server.aclose)
    return server


class NodeSocket:
    """The node-local socket of one service: ``<socketsPath>/<service>.sock``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def prepare(config: ShoalConfig, service: str) -> NodeSocket:
        """Make the folder (0700) and clear a socket a previous start left behind; a
        socket another process still serves is not taken over (Unavailable)."""
        folder = config.sockets_folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise Unavailable(
                f"{folder} (the node's socketsPath) must be a folder of this process's user,"
                " not a link or another user's folder"
            )
        os.chmod(folder, 0o700)
        path = folder / f"{service}.sock"
        if path.exists() or path.is_symlink():
            if _answers(path):
                raise Unavailable(
                    f"{service} is already running for this node ({path} answers): stop it"
                    " first (one process per service and node)"
                )
            path.unlink()
        return NodeSocket(path)

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def start(
        self,
        name: str,
        register: Callable[[grpc.aio.Server], None],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        health_servicer: Any,
        service_names: Sequence[str],
        max_message_bytes: int,
    ) -> grpc.aio.Server:
        """A server on the socket (mode 0600) with ``register``'s services, health and
        reflection."""
        server = grpc.aio.server(
            interceptors=list(interceptors), options=server_options(max_message_bytes)
        )
        register(server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection(service_names, server)
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise Unavailable(f"{name} cannot listen on {self.path}: {exc}") from exc
        if port == 0:
            raise Unavailable(f"{name} cannot listen on {self.path}")
        await server.start()
        os.chmod(self.path, 0o600)
        log.info("%s node-internal RPCs on %s", name, self.path)
        return server


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def start_server(spec: ServerSpec) -> RunningServer:
    """Build, bind and start a server (and its node socket's); health reports SERVING
    once they listen."""
    if spec.lifecycle is None:
        spec.lifecycle = Lifecycle(spec.name)
    lifecycle = spec.lifecycle

    def register_port(server: grpc.aio.Server) -> None:
        spec.register(server)
        if spec.lifecycle_on_port:
            add_LifecycleServiceServicer_to_server(LifecycleServicer(lifecycle), server)

    def register_socket(server: grpc.aio.Server) -> None:
        spec.register(server)
        if spec.register_internal is not None:
            spec.register_internal(server)
        add_LifecycleServiceServicer_to_server(LifecycleServicer(lifecycle), server)

    options = server_options(spec.max_message_bytes)
    if spec.streams is not None:
        options += spec.streams.limits.server_options()
    server = grpc.aio.server(
        interceptors=[
            ShoalInterceptor(
                spec.authenticator, spec.rpc_metrics, spec.client_certificates, spec.streams
            )
        ],
        options=options,
        maximum_concurrent_rpcs=spec.max_concurrent_rpcs,
    )
    register_port(server)
    health_servicer = (
        spec.health.servicer if spec.health is not None else health.aio.HealthServicer()
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    on_port = [*spec.service_names, *([LIFECYCLE_SERVICE] if spec.lifecycle_on_port else [])]
    enable_reflection(on_port, server)
    try:
        if spec.tls is not None:
            credentials = reloading_server_credentials(
                spec.tls, require_client_auth=spec.client_certificates is not None
            )
            port = server.add_secure_port(spec.address, credentials)
        else:
            port = server.add_insecure_port(spec.address)
    except RuntimeError as exc:
        raise Unavailable(f"{spec.name} cannot listen on {spec.address}: {exc}") from exc
    if port == 0:
        raise Unavailable(f"{spec.name} cannot listen on {spec.address} (address in use?)")
    socket_server = None
    if spec.socket is not None:
        socket_server = await NodeSocket(spec.socket).start(
            spec.name,
            register_socket,
            [ShoalInterceptor(spec.authenticator, spec.rpc_metrics)],
            health_servicer,
            [*spec.service_names, LIFECYCLE_SERVICE],
            spec.max_message_bytes,
        )
    await server.start()
    running = RunningServer(spec, server, health_servicer, socket_server)
    await running.set_serving(True)
    security = "plaintext"
    if spec.tls is not None:
        security = "TLS, client certificates required" if spec.client_certificates else "TLS"
    log.info("%s listening on %s (%s)", spec.name, spec.address, security)
    return running


async def serve_until_signalled(
    running: RunningServer, extra_tasks: Iterable[asyncio.Task[Any]] = ()
) -> bool:
    """Serve until SIGTERM/SIGINT or a restart request (LifecycleService.Restart), then
    stop gracefully (health first, then the server). True when a restart was requested:
    the caller then starts the process anew (``service_main`` does)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lifecycle = running.spec.lifecycle
    restart = lifecycle.restart_requested if lifecycle is not None else asyncio.Event()
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(restart.wait())]
    waiters += extra_tasks
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task not in waiters[:2] and task.exception() is not None:
            log.error("%s: background task failed: %r", running.spec.name, task.exception())
    restarting = restart.is_set() and not stop.is_set()
    log.info("%s %s", running.spec.name, "restarting" if restarting else "shutting down")
    await running.stop()
    for task in waiters:
        task.cancel()
    return restarting
