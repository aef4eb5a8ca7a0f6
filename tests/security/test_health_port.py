"""The plaintext health port of each process (``health.*``): grpc.health.v1 and nothing
else, reachable without the node's CA, reporting what the main port reports, including
NOT_SERVING while the process starts and while it drains."""

from __future__ import annotations

import signal
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from tests.conftest import MakeNode
from tests.harness.client import expect_error
from tests.harness.node import Node
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")
GENERATED = {"replication": {"securePort": 9933}}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAMES = {
    "storage": "shoal.storage.v1.StorageService",
    "replicator": "shoal.replicator.v1.ReplicatorService",
    "admin": "shoal.admin.v1.AdminService",
}


def _check(address: str, service: str = "") -> Any:
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def tls_node(make_node: MakeNode) -> Node:
    return make_node(services=ALL, config=GENERATED)


def test_each_process_answers_plaintext_probes_on_its_health_port(tls_node: Node) -> None:
    assert tls_node.serves_tls("storage") and tls_node.serves_tls("admin")
    for service in ALL:
        address = tls_node.health_address(service)
        assert _check(address) == SERVING, service
        assert _check(address, SERVICE_NAMES[service]) == SERVING, service
        # The main port still serves health too (over TLS for storage and admin; the
        # replicator's plain port is closed with TLS, so its node-local socket).
        main = tls_node.socket_channel if service == "replicator" else tls_node.channel
        with main(service) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == SERVING
    assert tls_node.health_address("storage").endswith(":9936")
    assert tls_node.health_address("replicator").endswith(":9937")
    assert tls_node.health_address("admin").endswith(":9935")


def test_the_health_port_serves_nothing_else(tls_node: Node) -> None:
    unimplemented = grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(tls_node.health_address("storage")) as channel:
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        expect_error(unimplemented, lambda: storage.DescribeAll(pb.DescribeAllRequest(), timeout=5))
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        expect_error(
            unimplemented, lambda: list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        )
        stub: Any = health_pb2_grpc.HealthStub(channel)
        expect_error(
            grpc.StatusCode.NOT_FOUND,
            lambda: stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5),
        )
    with grpc.insecure_channel(tls_node.health_address("replicator")) as channel:
        replicator = replicator_pb2_grpc.ReplicatorNodeServiceStub(channel)
        expect_error(unimplemented, lambda: replicator.Status(rpb.StatusRequest(), timeout=5))
    with grpc.insecure_channel(tls_node.health_address("admin")) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        expect_error(
            unimplemented,
            lambda: admin.Execute(apb.ExecuteRequest(operation=b"{}"), timeout=5),
        )


def test_not_serving_while_starting(make_node: MakeNode) -> None:
    """A new node's admin waits for its storage (which makes the node secret): until then
    its health port answers NOT_SERVING; then SERVING."""
    node = make_node(start=False, services=ALL, config=GENERATED)
    node.start_service("admin", wait=False)
    address = node.health_address("admin")
    assert wait_for(lambda: _check(address) == NOT_SERVING, 20, "the admin's health port")
    assert _check(address, SERVICE_NAMES["admin"]) == NOT_SERVING
    assert node.running("admin")
    node.start_service("storage")
    wait_for(lambda: _check(address) == SERVING, 30, "the admin to serve")


def test_not_serving_while_draining(tls_node: Node) -> None:
    """A Watch on the health port sees NOT_SERVING once the process is told to stop."""
    with grpc.insecure_channel(tls_node.health_address("storage")) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == SERVING
        tls_node.processes["storage"].send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()
    tls_node.processes["storage"].wait(timeout=30)


def test_health_ports_can_be_turned_off(make_node: MakeNode) -> None:
    node = make_node(services=("storage",), config={**GENERATED, "health": {"enabled": False}})
    expect_error(grpc.StatusCode.UNAVAILABLE, lambda: _check(node.health_address("storage")))
    assert node.health("storage")  # the main port (TLS) still answers
    assert node.client().call("DescribeAll", pb.DescribeAllRequest()) is not None
