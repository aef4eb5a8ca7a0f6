"""Node-internal RPCs are not on any client or replication port: storage's port serves
StorageService only, the replication port ReplicatorService only, even to a caller that
holds the node secret. They are served on the node-local sockets (0600 in a 0700
folder), to the node identity only."""

from __future__ import annotations

import stat
from functools import partial
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from services.common.auth import basic_metadata, bearer_metadata
from tests.conftest import MakeNode
from tests.harness.client import expect_error
from tests.harness.node import PASSWORD, Node

pytestmark = pytest.mark.cluster

ALL = ("storage", "replicator", "admin")
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
# One request of every node-internal storage RPC (unary and streaming alike).
STORAGE_NODE_CALLS: list[tuple[str, Any]] = [
    ("Subscribe", pb.SubscribeRequest(databases=["data"])),
    ("Apply", pb.ApplyRequest()),
    ("Snapshot", pb.SnapshotRequest(database="data")),
    ("MergeSnapshot", pb.MergeSnapshotRequest(source="x", database="data", part=1)),
    ("ReadResident", pb.ReadResidentRequest(database="data", table="dog", ids=[b"1"])),
    ("GetPositions", pb.GetPositionsRequest()),
    ("RecordAnalytics", pb.RecordAnalyticsRequest()),
    ("Backup", pb.BackupRequest(database="data")),
]
REPLICATOR_NODE_CALLS: list[tuple[str, Any]] = [
    ("Status", rpb.StatusRequest()),
    ("SetRoutes", rpb.SetRoutesRequest()),
    ("ListRecipients", rpb.ListRecipientsRequest(database="data")),
    ("WaitReplicated", rpb.WaitReplicatedRequest(database="data", version=1, count=1)),
    ("FetchRecords", rpb.FetchRecordsRequest(database="data")),
]


def _services(channel: grpc.Channel) -> set[str]:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return {s.name for s in reply.list_services_response.service}


def _call(stub: Any, method: str, request: Any, metadata: Any) -> Any:
    result = getattr(stub, method)(request, metadata=metadata, timeout=5)
    return list(result) if hasattr(result, "__next__") else result


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    node = make_node(services=ALL, config={"replication": {"securePort": 9933, "port": 9932}})
    node.client().create_table("data", "dog")
    return node


def test_the_client_port_serves_no_node_internal_rpc(node: Node) -> None:
    secret = bearer_metadata(node.node_secret())
    with node.channel("storage") as channel:
        assert _services(channel) == {
            "shoal.storage.v1.StorageService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        }
        stub = storage_pb2_grpc.StorageNodeServiceStub(channel)
        for method, request in STORAGE_NODE_CALLS:
            expect_error(UNIMPLEMENTED, partial(_call, stub, method, request, secret))


def test_the_replication_ports_serve_only_the_peer_stream(node: Node) -> None:
    secret = bearer_metadata(node.node_secret())
    with grpc.insecure_channel(f"{node.host}:9932") as channel:
        assert _services(channel) == {
            "shoal.replicator.v1.ReplicatorService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        }
        stub = replicator_pb2_grpc.ReplicatorNodeServiceStub(channel)
        for method, request in REPLICATOR_NODE_CALLS:
            expect_error(UNIMPLEMENTED, partial(_call, stub, method, request, secret))
    with node.channel("admin") as channel:
        assert "shoal.storage.v1.StorageNodeService" not in _services(channel)
        assert "shoal.replicator.v1.ReplicatorNodeService" not in _services(channel)


def test_the_node_sockets_are_private_and_serve_the_node_identity_only(node: Node) -> None:
    folder = node.sockets
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for service in ALL:
        path = folder / f"{service}.sock"
        assert stat.S_ISSOCK(path.stat().st_mode), service
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, service
    # The node identity gets its answers there ...
    assert node.internal_client().call("GetPositions", pb.GetPositionsRequest()).node_name
    assert node.status().node_name == node.name
    # ... and even the super user, over the socket, does not.
    user = basic_metadata("admin", PASSWORD)
    with node.socket_channel("storage") as channel:
        stub = storage_pb2_grpc.StorageNodeServiceStub(channel)
        for method, request in STORAGE_NODE_CALLS:
            expect_error(
                grpc.StatusCode.PERMISSION_DENIED,
                partial(_call, stub, method, request, user),
                "reserved",
            )
    with node.socket_channel("replicator") as channel:
        replicator = replicator_pb2_grpc.ReplicatorNodeServiceStub(channel)
        for method, request in REPLICATOR_NODE_CALLS:
            expect_error(
                grpc.StatusCode.PERMISSION_DENIED,
                partial(_call, replicator, method, request, user),
            )


def test_a_second_process_of_a_service_does_not_take_over_its_socket(
    make_node: MakeNode,
) -> None:
    """Starting a service that already runs for the node fails clearly (before any port,
    with health and metrics ports off) and leaves the running one serving its socket."""
    quiet = {"health": {"enabled": False}, "metrics": {"enabled": False}}
    node = make_node(services=("storage", "replicator"), config=quiet)
    first = node.processes.pop("replicator")
    try:
        node.start_service("replicator", wait=False)
        second = node.processes["replicator"]
        assert second.wait(timeout=30) != 0
    finally:
        node.processes["replicator"] = first
    log = node.log_path("replicator").read_text()
    assert "replicator is already running for this node" in log
    assert "replicator.sock answers" in log
    assert node.status().node_name == node.name
