"""TLS on the client ports (storage 9926, admin 9925) of a node with TLS material: the
node's certificate, verified by clients that trust its CA, users still signing in with
passwords; the node's own processes and the `shoal` CLI follow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import yaml
from cryptography import x509
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from services.common import certs
from services.common.auth import basic_metadata
from services.local import write_cli_config
from tests.conftest import MakeCluster, MakeNode
from tests.harness.addresses import next_address
from tests.harness.client import StorageClient, expect_error
from tests.harness.node import PASSWORD, Node
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")
GENERATED = {"replication": {"securePort": 9933}}
UNAVAILABLE, UNAUTHENTICATED = 14, 16


def _describe(channel: grpc.Channel, password: str = PASSWORD) -> Any:
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    return stub.DescribeAll(
        pb.DescribeAllRequest(), metadata=basic_metadata("admin", password), timeout=10
    )


def _execute(channel: grpc.Channel, operation: dict[str, Any]) -> Any:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    reply = stub.Execute(
        apb.ExecuteRequest(operation=orjson.dumps(operation)),
        metadata=basic_metadata("admin", PASSWORD),
        timeout=30,
    )
    assert reply.code == 0, reply.result
    return orjson.loads(reply.result)


def _trusting(node: Node, service: str, ca_pem: bytes) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    return grpc.secure_channel(node.address_of(service), credentials)


@pytest.fixture
def tls_node(make_node: MakeNode) -> Node:
    """A node with every service, serving TLS with the certificate it generated."""
    return make_node(services=ALL, config=GENERATED)


@pytest.mark.parametrize("service", ["storage", "admin"])
def test_a_plaintext_client_is_refused(tls_node: Node, service: str) -> None:
    with grpc.insecure_channel(tls_node.address_of(service)) as channel:
        if service == "storage":
            error = expect_error(grpc.StatusCode.UNAVAILABLE, lambda: _describe(channel))
        else:
            error = expect_error(
                grpc.StatusCode.UNAVAILABLE,
                lambda: _execute(channel, {"operation": "describe_all"}),
            )
    assert "Socket closed" in (error.details() or "")  # the server hung up in the handshake


@pytest.mark.parametrize("service", ["storage", "admin"])
def test_a_client_trusting_another_ca_refuses_the_node(tls_node: Node, service: str) -> None:
    other = certs.create_authority("Someone-Else-CA")
    with _trusting(tls_node, service, other.certificate_pem) as channel:
        call = (
            (lambda: _describe(channel))
            if service == "storage"
            else (lambda: _execute(channel, {"operation": "describe_all"}))
        )
        expect_error(grpc.StatusCode.UNAVAILABLE, call, "CERTIFICATE_VERIFY_FAILED")


def test_a_client_with_the_ca_signs_in_with_a_password(tls_node: Node) -> None:
    ca_pem = (tls_node.keys_path / "ca.crt").read_bytes()
    with _trusting(tls_node, "storage", ca_pem) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        metadata = basic_metadata("admin", PASSWORD)
        stub.CreateTable(
            pb.CreateTableRequest(database="dev", table="dog"), metadata=metadata, timeout=10
        )
        stub.Insert(
            pb.InsertRequest(database="dev", table="dog", records=[b'{"id": 1, "name": "Penny"}']),
            metadata=metadata,
            timeout=10,
        )
        expect_error(grpc.StatusCode.UNAUTHENTICATED, lambda: _describe(channel, "wrong-password"))
    with _trusting(tls_node, "admin", ca_pem) as channel:
        # The admin service reads through its own TLS channel to storage.
        found = _execute(
            channel, {"operation": "search_by_id", "table": "dog", "database": "dev", "ids": [1]}
        )
        assert found == [{"id": 1, "name": "Penny"}]
    # The harness clients (TLS, trusting the node's CA) see the same.
    assert tls_node.client().get("dev", "dog", [1]) == [{"id": 1, "name": "Penny"}]


def test_ports_opted_out_stay_plaintext(make_node: MakeNode) -> None:
    node = make_node(services=ALL, config={**GENERATED, "storage": {"tls": False}})
    assert not node.serves_tls("storage") and node.serves_tls("admin")
    with grpc.insecure_channel(node.storage_address) as channel:
        assert _describe(channel) is not None
    with grpc.insecure_channel(node.address_of("admin")) as channel:
        expect_error(
            grpc.StatusCode.UNAVAILABLE, lambda: _execute(channel, {"operation": "describe_all"})
        )
    # The admin's channel to its storage follows (plaintext here).
    node.admin().ok({"operation": "create_table", "table": "dog"})
    assert node.client().describe("data", "dog").name == "dog"


def test_internal_channels_check_the_node_name_when_dialing_an_address(
    make_node: MakeNode,
) -> None:
    """The node is named `shoal-node.test` (its certificate has that DNS name only); its
    processes dial its address, and still verify its certificate."""
    node = make_node(services=ALL, name="shoal-node.test", config=GENERATED)
    node.client().create_table("dev", "cat")
    node.admin().ok({"operation": "insert", "database": "dev", "table": "cat", "records": [
        {"id": "tom"}
    ]})  # fmt: skip
    assert node.client().get("dev", "cat", ["tom"]) == [{"id": "tom"}]
    status = node.admin().ok({"operation": "cluster_status"})  # the replicator reads storage
    assert status["node_name"] == "shoal-node.test"


def test_a_tls_cluster_replicates_and_serves_clients_over_tls(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    first, second = cluster.nodes
    assert first.serves_tls("storage") and second.serves_tls("admin")
    first.client().create_table("dev", "dog")
    first.client().insert("dev", "dog", [{"id": 7}])
    wait_for(lambda: second.client().get("dev", "dog", [7]), 30, "the write on the second node")


# -- the command line ----------------------------------------------------------------------


def _shoal(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update({"SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": PASSWORD, **extra})
    return env


def test_the_cli_verifies_a_tls_node_with_its_ca(tls_node: Node, tmp_path: Path) -> None:
    host, ca = tls_node.host, str(tls_node.keys_path / "ca.crt")

    plain = _shoal("cluster", "status", "--node", host, env=_env())
    assert plain.returncode == UNAVAILABLE
    assert "--ca FILE or SHOAL_CA" in plain.stderr

    flagged = _shoal("--ca", ca, "cluster", "status", "--node", host, "-o", "json", env=_env())
    assert flagged.returncode == 0, flagged.stderr
    assert orjson.loads(flagged.stdout)["node_name"] == tls_node.name

    created = _shoal("data", "create-table", "--node", host, "dev", "dog", env=_env(SHOAL_CA=ca))
    assert created.returncode == 0, created.stderr
    inserted = _shoal(
        "data", "insert", "--node", host, "dev", "dog", '{"id": 1, "name": "Penny"}',
        env=_env(SHOAL_CA=ca),
    )  # fmt: skip
    assert inserted.returncode == 0, inserted.stderr
    denied = _shoal("--ca", ca, "data", "get", "--node", host, "dev", "dog", "1",
                    env={**_env(), "SHOAL_PASSWORD": "wrong"})  # fmt: skip
    assert denied.returncode == UNAUTHENTICATED
    got = _shoal("data", "get", "--node", host, "dev", "dog", "1", env=_env(SHOAL_CA=ca))
    assert got.returncode == 0 and orjson.loads(got.stdout)["name"] == "Penny", got.stderr
    absent = _shoal("data", "get", "--node", host, "dev", "dog", "1", "2", env=_env(SHOAL_CA=ca))
    assert absent.returncode == 5, absent.stderr  # NOT_FOUND
    assert orjson.loads(absent.stdout)["name"] == "Penny"
    assert "1 of 2 ids not found" in absent.stderr

    other = tmp_path / "other-ca.crt"
    other.write_bytes(certs.create_authority("Someone-Else-CA").certificate_pem)
    refused = _shoal("--ca", str(other), "cluster", "status", "--node", host, env=_env())
    assert refused.returncode == UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    missing = _shoal("--ca", str(tmp_path / "none.crt"), "cluster", "status", env=_env())
    assert missing.returncode == 2 and "cannot read the CA certificate" in missing.stderr

    # `node status` asks the plaintext health ports: no CA needed.
    status = _shoal("node", "status", "--node", host, "-o", "json", env=_env())
    assert status.returncode == 0, status.stderr
    assert all(row["serving"] for row in orjson.loads(status.stdout))


def test_the_cli_config_written_by_local_up_is_all_the_cli_needs(
    tls_node: Node, tmp_path: Path
) -> None:
    """`shoal local up` writes data/cli.yaml; with it (and nothing else) the CLI reaches a
    TLS node: node, user, password and the CA (relative to the file)."""
    data = tmp_path / "data"
    (data / "ca").mkdir(parents=True)
    (data / "ca" / "ca.crt").write_bytes((tls_node.keys_path / "ca.crt").read_bytes())
    path = write_cli_config(data, PASSWORD, tls=True, host=tls_node.host)
    assert yaml.safe_load(path.read_text()) == {
        "node": tls_node.host,
        "username": "admin",
        "password": PASSWORD,
        "ca": "ca/ca.crt",
    }
    assert path.stat().st_mode & 0o777 == 0o600
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CLI_CONFIG"] = str(path)
    status = _shoal("cluster", "status", "-o", "json", env=env)
    assert status.returncode == 0, status.stderr
    assert orjson.loads(status.stdout)["node_name"] == tls_node.name
    insecure = write_cli_config(tmp_path / "plain", PASSWORD, tls=False)
    assert "ca" not in yaml.safe_load(insecure.read_text())


@pytest.fixture
def clone_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`shoal node clone` processes (each runs the new node): always stopped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def test_a_clone_gets_a_certificate_of_the_clusters_ca(
    make_node: MakeNode, tmp_path: Path, clone_processes: list[subprocess.Popen[bytes]]
) -> None:
    """`shoal node clone --ca-dir` (what the README does with `make run`): the CLI reaches
    the source over TLS, the new node's certificate comes from the cluster's CA, and the
    two replicate over mutual TLS."""
    ca_dir = tmp_path / "cluster-ca"
    authority = certs.ensure_authority(ca_dir, "Cluster-CA")
    source = make_node(start=False, services=ALL, config={"replication": {"gossip": True}})
    files = certs.ensure_node_files(source.keys_path, authority, source.name)
    source.update_config(
        {
            "tls": {
                "certificate": str(files.certificate),
                "privateKey": str(files.private_key),
                "certificateAuthority": str(files.certificate_authority),
            }
        }
    )
    source.start()
    source.client().create_table("dev", "dog")
    source.client().insert("dev", "dog", [{"id": i} for i in range(100)])

    target, folder = next_address(), tmp_path / "clone"
    output = tmp_path / "clone.log"
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.cli", "--ca", str(ca_dir / "ca.crt")),
                *("node", "clone", "--from", source.host, "--hostname", target),
                *("--data", str(folder), "--ca-dir", str(ca_dir), "--timeout", "90"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
    clone_processes.append(process)
    wait_for(
        lambda: "caught up" in output.read_text() or process.poll() is not None,
        120,
        "the clone to catch up",
    )
    assert process.poll() is None, output.read_text()
    config = yaml.safe_load((folder / "shoal.yaml").read_text())
    assert config["tls"]["certificate"] == "keys/node.crt"
    issued = x509.load_pem_x509_certificate((folder / "keys" / "node.crt").read_bytes())
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(authority.certificate_pem))

    credentials = grpc.ssl_channel_credentials(root_certificates=authority.certificate_pem)
    with grpc.secure_channel(f"{target}:9926", credentials) as channel:
        client = StorageClient.basic(f"{target}:9926", "admin", PASSWORD, channel)
        assert client.describe("dev", "dog").record_count == 100
        source.client().insert("dev", "dog", [{"id": "late"}])
        wait_for(lambda: client.get("dev", "dog", ["late"]), 30, "a later write on the clone")
    connection = source.connection(target)
    assert connection is not None and connection.connected
