"""Authentication and authorization at the storage service's edge."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.client import StorageClient, error_info, expect_error
from tests.harness.node import PASSWORD, Node

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def raw_client(node: Node, metadata: tuple[tuple[str, str], ...]) -> StorageClient:
    client = StorageClient(node.storage_address, metadata)
    node._clients.append(client)
    return client


def test_calls_without_valid_credentials_are_unauthenticated(make_node: MakeNode) -> None:
    # Six wrong passwords for admin below: raise the lockout above that (the lockout
    # itself is tested in test_users_roles.py).
    node = make_node(config={"authentication": {"lockoutAttempts": 10}})
    node.client().create_table("dev", "dog")
    anonymous = raw_client(node, ())
    error = anonymous.expect(UNAUTHENTICATED, "DescribeAll", pb.DescribeAllRequest(), "Must login")
    info = error_info(error)
    assert (info.domain, info.reason) == ("shoal", "UNAUTHENTICATED")
    anonymous.expect(
        UNAUTHENTICATED,
        "SearchById",
        pb.SearchByIdRequest(database="dev", table="dog", ids=[b"1"]),
        "Must login",
    )
    expect_error(
        UNAUTHENTICATED,
        lambda: anonymous.call(
            "LoadCsv",
            iter([pb.LoadCsvRequest(header=pb.LoadCsvHeader(database="dev", table="dog"))]),
        ),
        "Must login",
    )

    wrong_password = node.client("admin", PASSWORD + "x")
    unknown_user = node.client("mallory", PASSWORD)
    empty_password = node.client("admin", "")
    messages: set[str | None] = set()
    for client in (wrong_password, unknown_user, empty_password):
        for method, request in [
            ("DescribeAll", pb.DescribeAllRequest()),
            ("Insert", pb.InsertRequest(database="dev", table="dog", records=[b'{"id": 1}'])),
            ("SearchById", pb.SearchByIdRequest(database="dev", table="dog", ids=[b"1"])),
        ]:
            error = client.expect(UNAUTHENTICATED, method, request, "Login failed")
            messages.add(error.details())
            assert error_info(error).reason == "UNAUTHENTICATED"
    # The same answer whether or not the user exists.
    assert len(messages) == 1
    assert "mallory" not in (messages.pop() or "")

    for header in ["Basic !!!", "Basic " + "YWRtaW4=", "Digest abc", "Bearer"]:
        raw_client(node, (("authorization", header),)).expect(
            UNAUTHENTICATED, "DescribeAll", pb.DescribeAllRequest(), "basic"
        )
    bad_token = raw_client(node, (("authorization", "Bearer not-the-secret"),))
    error = bad_token.expect(
        UNAUTHENTICATED, "DescribeAll", pb.DescribeAllRequest(), "Login failed"
    )
    # Nothing was written by any of the refused calls.
    assert node.client().all_records("dev", "dog") == []
    # The right password still works after the failures.
    assert [
        d.name for d in node.client().call("DescribeAll", pb.DescribeAllRequest()).databases
    ] == ["dev"]


def test_node_secret_bearer_is_the_internal_identity(node: Node) -> None:
    internal = node.internal_client()
    internal.create_table("dev", "dog")
    reply = internal.insert("dev", "dog", [{"id": 1}])
    assert list(reply.inserted_ids) == [b"1"]
    assert node.client().get("dev", "dog", [1]) == [{"id": 1}]
    txn = internal.transactions("dev")[-1]
    assert txn.user == "node:" + node.name
    positions = internal.call("GetPositions", pb.GetPositionsRequest(database="dev"))
    assert positions.node_name == node.name
    assert [(p.database, p.origin, p.version) for p in positions.positions] == [
        ("dev", node.name, reply.version)
    ]


def test_internal_rpcs_are_denied_to_users(node: Node, client: StorageClient) -> None:
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": 1}])
    fake = types_pb2.Transaction(
        origin="elsewhere",
        version=1 << 40,
        database="dev",
        writes=[
            types_pb2.Write(table="dog", kind=types_pb2.WRITE_KIND_PUT, id=b"2", value=b'{"id": 2}')
        ],
    )
    calls = [
        ("Subscribe", pb.SubscribeRequest(databases=["dev"], heartbeat_interval_ms=100)),
        ("Apply", pb.ApplyRequest(transactions=[fake])),
        ("Snapshot", pb.SnapshotRequest(database="dev")),
        (
            "MergeSnapshot",
            pb.MergeSnapshotRequest(
                source="elsewhere",
                database="dev",
                rows=[
                    types_pb2.SnapshotRow(table="dog", id=b"3", state=b'[1,"x",false,{"id":3},{}]')
                ],
                complete=True,
                part=1,
                begins_part=True,
            ),
        ),
        ("GetPositions", pb.GetPositionsRequest()),
    ]
    # The super user on the node's own socket: refused, the node identity only.
    on_socket = StorageClient.basic(
        node.socket_address("storage"), "admin", PASSWORD, node.socket_channel("storage")
    )
    node._clients.append(on_socket)
    for method, request in calls:
        error = on_socket.expect(DENIED, method, request, "reserved", "node")
        info = error_info(error)
        assert (info.domain, info.reason) == ("shoal", "PERMISSION_DENIED")
        # On the client port they do not exist.
        client.expect(grpc.StatusCode.UNIMPLEMENTED, method, request)
    # Nothing was applied or merged.
    assert client.all_records("dev", "dog") == [{"id": 1}]
    positions = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database="dev"))
    assert [p.origin for p in positions.positions] == [node.name]
    assert list(positions.copies) == []


def test_health_and_reflection_need_no_credentials(node: Node) -> None:
    with node.channel("storage") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        for service in ["", "shoal.storage.v1.StorageService"]:
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = [s.name for r in responses for s in r.list_services_response.service]
        assert "shoal.storage.v1.StorageService" in names
        assert "grpc.health.v1.Health" in names
        described = list(
            reflection.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="shoal.storage.v1.StorageService"
                        )
                    ]
                ),
                timeout=5,
            )
        )
        assert described[0].file_descriptor_response.file_descriptor_proto


def test_generated_initial_password(make_node: MakeNode) -> None:
    node = make_node(start=False)
    del node.config["admin"]["password"]
    node.write_config()
    node.start()
    path = Path(node.config["rootPath"]) / "keys" / "initial-admin-password"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = path.read_text().strip()
    assert len(password) >= 16
    assert password != PASSWORD
    client = node.client("admin", password)
    client.create_table("dev", "dog")
    assert client.describe("dev", "dog").name == "dog"
    node.client("admin", PASSWORD).expect(
        UNAUTHENTICATED, "DescribeAll", pb.DescribeAllRequest(), "Login failed"
    )
    # A restart keeps the user; the file is not rewritten.
    node.restart("storage")
    assert path.read_text().strip() == password
    assert [
        d.name
        for d in node.client("admin", password)
        .call("DescribeAll", pb.DescribeAllRequest())
        .databases
    ] == ["dev"]
    secret = Path(node.config["rootPath"]) / "keys" / "node.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
