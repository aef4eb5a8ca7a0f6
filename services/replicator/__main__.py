"""``python -m services.replicator --config shoal.yaml``: run a node's replicator."""

from __future__ import annotations

import asyncio
import logging
import sys

import grpc
from grpc_health.v1 import health_pb2_grpc
from shoal.lifecycle.v1.lifecycle_pb2_grpc import add_LifecycleServiceServicer_to_server
from shoal.replicator.v1 import replicator_pb2, replicator_pb2_grpc

from services.common.auth import read_node_secret
from services.common.config import ShoalConfig
from services.common.entry import service_main
from services.common.errors import Unavailable
from services.common.grpcserver import (
    NodeSocket,
    RunningServer,
    ServerSpec,
    attach_metrics,
    serve_until_signalled,
    server_options,
    start_health_port,
)
from services.common.hlc import wall_clock_ms
from services.common.interceptor import ShoalInterceptor
from services.common.lifecycle import SERVICE_NAME as LIFECYCLE_SERVICE
from services.common.lifecycle import Lifecycle, LifecycleServicer
from services.common.node_tls import prepare
from services.common.reflection import enable_reflection
from services.common.tls_source import TlsError, TlsSource, reloading_server_credentials
from services.replicator import sampler
from services.replicator.local import LocalStorage
from services.replicator.metrics import replicator_metrics
from services.replicator.replicator import Replicator
from services.replicator.server import ReplicatorNodeServicer, ReplicatorServicer

log = logging.getLogger("shoal.replicator")
SERVICE_NAME = replicator_pb2.DESCRIPTOR.services_by_name["ReplicatorService"].full_name
NODE_SERVICE_NAME = replicator_pb2.DESCRIPTOR.services_by_name["ReplicatorNodeService"].full_name


async def run(config: ShoalConfig) -> bool:
    health_port = await start_health_port(config, "replicator", [SERVICE_NAME])
    try:
        # tls.* names the node's certificates from here on (generated on the first start
        # when it has none).
        node_tls = prepare(config)
        config = node_tls.config
        secret = await read_node_secret(config.keys_path)
        socket = NodeSocket.prepare(config, "replicator")
    except BaseException:
        await health_port.stop()
        raise
    tls = _replication_tls(config)
    storage = LocalStorage(config, secret)
    replicator = Replicator(config, storage, tls)
    ports = [f"{config.host}:{p}" for p in (config.replication.port,) if p is not None]
    spec = ServerSpec(
        name="replicator",
        address=", ".join(ports) or f"{config.host}:{config.replication.secure_port}",
        service_names=[SERVICE_NAME, NODE_SERVICE_NAME],
        register=lambda _: None,
        authenticator=None,
        pre_stop=[replicator.close],
        on_stop=[storage.close],
        grace_s=5.0,
        health=health_port,
        socket=socket.path,
    )
    try:
        attach_metrics(spec, config, loop_sources=[replicator_metrics(replicator)])
    except Unavailable as exc:
        raise SystemExit(f"replicator: {exc.message}") from exc
    interceptors = [ShoalInterceptor(None, spec.rpc_metrics)]
    server = grpc.aio.server(
        interceptors=interceptors, options=server_options(config.storage.max_message_bytes)
    )
    replicator_pb2_grpc.add_ReplicatorServiceServicer_to_server(
        ReplicatorServicer(replicator), server
    )
    health_servicer = health_port.servicer
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([SERVICE_NAME], server)
    _add_ports(server, config, ports, tls)
    spec.lifecycle = Lifecycle("replicator")
    lifecycle = LifecycleServicer(spec.lifecycle, secret)

    def register_socket(node_server: grpc.aio.Server) -> None:
        replicator_pb2_grpc.add_ReplicatorNodeServiceServicer_to_server(
            ReplicatorNodeServicer(replicator, secret), node_server
        )
        add_LifecycleServiceServicer_to_server(lifecycle, node_server)

    try:
        socket_server = await socket.start(
            "replicator",
            register_socket,
            interceptors,
            health_servicer,
            [NODE_SERVICE_NAME, LIFECYCLE_SERVICE],
            config.storage.max_message_bytes,
        )
    except Unavailable as exc:
        raise SystemExit(f"replicator: {exc.message}") from exc
    await server.start()

    running = RunningServer(spec, server, health_servicer, socket_server)
    await running.set_serving(True)
    replicator.start()
    routes = ", ".join(r.hostname for r in config.replication.routes) or "none"
    listening = _listening(config, ports, tls)
    log.info("replicator %s listening on %s (routes: %s)", config.node_name, listening, routes)
    tasks: list[asyncio.Task[None]] = []
    if config.analytics.enabled:
        clock = wall_clock_ms(config.testing.clock_offset_ms)
        tasks.append(asyncio.create_task(sampler.run(replicator, storage, clock), name="analytics"))
    return await serve_until_signalled(running, tasks)


def _replication_tls(config: ShoalConfig) -> TlsSource | None:
    """The replication ports' TLS material (None: the node has none)."""
    try:
        return TlsSource.from_config(
            config,
            label="replication TLS",
            fails="Peers refuse it: no new replication session starts with this node, whoever"
            " dials (its live sessions go on until they end)",
        )
    except TlsError as exc:
        raise SystemExit(f"replicator: {exc}") from exc


def _add_ports(
    server: grpc.aio.Server, config: ShoalConfig, ports: list[str], tls: TlsSource | None
) -> None:
    """The plain replication ports, and the secure one when the node has TLS material."""
    for plain in ports:
        if server.add_insecure_port(plain) == 0:
            raise SystemExit(f"replicator: cannot listen on {plain}")
    if config.replication.secure_port is not None:
        secure = f"{config.host}:{config.replication.secure_port}"
        if tls is None:
            log.warning(
                "no TLS certificate configured (tls.*): the secure port %s stays closed", secure
            )
        elif server.add_secure_port(secure, reloading_server_credentials(tls)) == 0:
            raise SystemExit(f"replicator: cannot listen on {secure}")


def _listening(config: ShoalConfig, ports: list[str], tls: TlsSource | None) -> str:
    """The addresses the replicator listens on, for its start line."""
    return ", ".join(
        [*(f"{p} (plain)" for p in ports)]
        + ([f"{config.host}:{config.replication.secure_port} (mutual TLS)"] if tls else [])
    )


def main(argv: list[str] | None = None) -> int:
    return service_main("replicator", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
