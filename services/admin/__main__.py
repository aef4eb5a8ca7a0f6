"""``python -m services.admin --config shoal.yaml``: run a node's admin service."""

from __future__ import annotations

import sys

from shoal.admin.v1 import admin_pb2, admin_pb2_grpc

from services.admin.http import OperationsHttp
from services.admin.node import AdminNode, StorageAuthenticator
from services.admin.server import AdminServicer
from services.common.auth import read_node_secret
from services.common.client_certificates import ClientCertificates
from services.common.config import ShoalConfig
from services.common.entry import service_main
from services.common.grpcserver import (
    NodeSocket,
    ServerSpec,
    attach_metrics,
    serve_until_signalled,
    start_health_port,
    start_server,
)
from services.common.node_tls import prepare

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


async def run(config: ShoalConfig) -> bool:
    health = await start_health_port(config, "admin", [SERVICE_NAME])
    try:
        node_tls = prepare(config)
        secret = await read_node_secret(config.keys_path)
        socket = NodeSocket.prepare(config, "admin")
    except BaseException:
        await health.stop()
        raise
    node = AdminNode(node_tls, secret)
    servicer = AdminServicer(node)
    tls_source = node_tls.server_source("admin")
    authenticator = StorageAuthenticator(node)
    client_certificates = ClientCertificates.from_config(config, "admin", tls_source)
    spec = ServerSpec(
        name="admin",
        address=f"{config.host}:{config.operations_api.port}",
        service_names=[SERVICE_NAME],
        register=lambda server: admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server),
        authenticator=authenticator,
        max_message_bytes=config.storage.max_message_bytes,
        max_concurrent_rpcs=config.operations_api.max_concurrent_rpcs,
        on_stop=[node.close],
        grace_s=5.0,
        tls=tls_source,
        client_certificates=client_certificates,
        health=health,
        lifecycle=node.lifecycle,
        # Super users restart members through their admin ports (rolling restarts).
        lifecycle_on_port=True,
        socket=socket.path,
    )
    attach_metrics(spec, config)
    if config.operations_api.http_port is not None:
        http = OperationsHttp(
            node, servicer.execute, authenticator, tls_source, client_certificates
        )
        await http.start()
        spec.pre_stop.insert(0, http.stop)
    running = await start_server(spec)
    return await serve_until_signalled(running)


def main(argv: list[str] | None = None) -> int:
    return service_main("admin", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
