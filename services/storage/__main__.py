"""``python -m services.storage --config shoal.yaml``: run a node's storage service."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from shoal.storage.v1 import storage_pb2, storage_pb2_grpc

from services.common.client_certificates import ClientCertificates
from services.common.config import ShoalConfig
from services.common.entry import service_main
from services.common.errors import ShoalError
from services.common.grpcserver import (
    NodeSocket,
    ServerSpec,
    attach_metrics,
    serve_until_signalled,
    start_health_port,
    start_server,
)
from services.common.hlc import version_from_ms
from services.common.node_tls import prepare
from services.common.streams import StreamGuard, StreamLimits
from services.storage import analytics
from services.storage import log as txlog
from services.storage.db import PRIVATE_UMASK
from services.storage.engine import Engine
from services.storage.metrics import disk_metrics, engine_metrics
from services.storage.node_certificates import record_node_certificates
from services.storage.node_server import StorageNodeServicer
from services.storage.sampler import StorageSampler
from services.storage.server import StorageServicer

log = logging.getLogger("shoal.storage")
SERVICE_NAME = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name


async def _purge_loop(engine: Engine, config: ShoalConfig) -> None:
    """Apply the log retention horizon (logging.auditRetention) periodically."""
    while True:
        await asyncio.sleep(config.storage.purge_interval_s)
        cutoff_ms = engine.clock.physical_ms() - int(config.logging.audit_retention_s * 1000)
        entries, tombstones = txlog.purge_before(engine, version_from_ms(cutoff_ms), "")
        if entries or tombstones:
            log.info("retention: removed %d log entries and %d tombstones", entries, tombstones)


def stream_limits(config: ShoalConfig) -> StreamLimits:
    """``storage.maxConnections``, ``maxStreams*`` and ``streamIdleTimeout``."""
    storage = config.storage
    return StreamLimits(
        max_connections=storage.max_connections,
        max_streams_per_connection=storage.max_streams_per_connection,
        max_streams=storage.max_streams,
        max_streams_per_client=storage.max_streams_per_client,
        idle_timeout_s=storage.stream_idle_timeout_s,
    )


def open_engine(config: ShoalConfig) -> Engine:
    """Open the data directory, translating RocksDB's lock error into plain words."""
    try:
        engine = Engine(config)
    except Exception as exc:
        if "lock" in str(exc).lower():
            raise SystemExit(
                f"storage: {config.storage_path} is already open in another process"
                " (only one storage process may own a node's data)"
            ) from exc
        raise
    engine.open()
    return engine


async def run(config: ShoalConfig) -> bool:
    # Everything this process creates is private to its user: RocksDB's files above all
    # (files it writes with an explicit mode, such as certificates, keep theirs).
    os.umask(PRIVATE_UMASK)
    health = await start_health_port(config, "storage", [SERVICE_NAME])
    try:
        # tls.* names the node's certificates from here on: generated on the first start
        # when it has none, so they are recorded in system.hdb_certificate too.
        node_tls = prepare(config)
        config = node_tls.config
        engine = await asyncio.to_thread(open_engine, config)
        socket = NodeSocket.prepare(config, "storage")
    except BaseException:
        await health.stop()
        raise
    record_node_certificates(engine, config)
    servicer = StorageServicer(engine)
    node_servicer = StorageNodeServicer(engine, servicer.analytics)

    async def begin_shutdown() -> None:
        engine.begin_shutdown()

    async def close() -> None:
        await servicer.replicator.close()
        engine.close()

    tls_source = node_tls.server_source("storage")
    streams = StreamGuard(stream_limits(config), "storage")
    spec = ServerSpec(
        name="storage",
        address=f"{config.host}:{config.storage.port}",
        service_names=[SERVICE_NAME],
        register=lambda server: storage_pb2_grpc.add_StorageServiceServicer_to_server(
            servicer, server
        ),
        socket=socket.path,
        register_internal=lambda server: storage_pb2_grpc.add_StorageNodeServiceServicer_to_server(
            node_servicer, server
        ),
        authenticator=engine.users,
        max_message_bytes=config.storage.max_message_bytes,
        max_concurrent_rpcs=config.storage.max_concurrent_rpcs,
        pre_stop=[begin_shutdown],
        on_stop=[close],
        tls=tls_source,
        client_certificates=ClientCertificates.from_config(config, "storage", tls_source),
        health=health,
        streams=streams,
    )
    sampler = StorageSampler(engine, spec.rpc_metrics)  # counts what happens from here on
    metrics = None
    try:
        metrics = attach_metrics(
            spec,
            config,
            loop_sources=[engine_metrics(engine), streams.collect],
            thread_sources=[disk_metrics(config.storage_path)],
        )
        running = await start_server(spec)
    except ShoalError:
        if metrics is not None:
            metrics.stop()
        engine.close()
        await health.stop()
        raise
    purge = asyncio.create_task(_purge_loop(engine, config))
    history = asyncio.create_task(analytics.run(servicer.analytics, sampler.sample))
    rehoming = asyncio.create_task(servicer.residency.run())
    return await serve_until_signalled(running, [purge, history, rehoming])


def main(argv: list[str] | None = None) -> int:
    return service_main("storage", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
