"""deploy/docker-compose.yml works: its three nodes, each as separate storage, replicator
and admin processes, start from the file's own commands, environment and config, in the
order its depends_on and healthchecks say, replicate over mutual TLS, and stop cleanly
on SIGTERM. No Docker engine: tests/deploy/compose.py runs each container as a local
process, each node's namespace on its own loopback address."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from services.common.config import ShoalConfig
from services.common.grpcserver import channel_options
from tests.deploy.compose import ComposeError, ComposeProject, duration, interpolate
from tests.harness.admin import AdminClient
from tests.harness.client import StorageClient
from tests.harness.node import PASSWORD, REPO
from tests.harness.wait import wait_for

COMPOSE = REPO / "deploy" / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
NODES = ("node1", "node2", "node3")

# Until every service serves grpc.health.v1 on its own health port (health.*Port), the
# healthchecks are pointed at the services' main (plaintext) ports.
HEALTH_PORTS_SERVED = any(f.name == "health" for f in dataclasses.fields(ShoalConfig))
MAIN_PORTS = {} if HEALTH_PORTS_SERVED else {"9935": "9925", "9936": "9926", "9937": "9932"}


@pytest.fixture
def project(tmp_path: Path) -> Iterator[ComposeProject]:
    compose = ComposeProject.load(
        COMPOSE, DOCKERFILE, tmp_path, {"SHOAL_ADMIN_PASSWORD": PASSWORD}, MAIN_PORTS
    )
    try:
        yield compose
    finally:
        compose.down()


def connected(admin: AdminClient) -> list[dict[str, Any]] | None:
    """The node's connections once it is connected to every other node."""
    status = admin.ok({"operation": "cluster_status"})
    connections: list[dict[str, Any]] = status["connections"]
    up = [c for c in connections if c["connected"]]
    return connections if len(up) == len(NODES) - 1 else None


def holds_both(client: StorageClient) -> bool:
    return [r["name"] for r in client.get("dev", "dog", [1, 2])] == ["Penny", "Otto"]


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": PASSWORD}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.cluster
def test_compose_cluster_starts_replicates_and_stops_cleanly(project: ComposeProject) -> None:
    # The layout under test is the file's: per node, a namespace and three services.
    for node in NODES:
        for service in ("storage", "replicator", "admin"):
            assert project.services[f"{node}-{service}"].network == node
    project.up(timeout_s=90)
    addresses = [project.address(node) for node in NODES]

    # The `certs` service made one CA and a certificate per node; the client ports serve
    # TLS with them, so clients trust that CA.
    tls = project.workdir / "volumes" / "tls"
    ca = (tls / "ca" / "ca.crt").read_bytes()
    for address in addresses:
        assert (tls / address / "keys" / "node.crt").is_file()

    def channel(address: str, port: int) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.secure_channel(f"{address}:{port}", credentials, channel_options())

    admins = [AdminClient(a, "admin", PASSWORD, channel(a, 9925)) for a in addresses]
    clients = [
        StorageClient.basic(f"{a}:9926", "admin", PASSWORD, channel(a, 9926)) for a in addresses
    ]
    try:
        # Every node connects to the two others (routes by service name), on the
        # mutual-TLS replication port.
        dialed: list[dict[str, Any]] = []
        for admin, address in zip(admins, addresses, strict=True):
            connections = wait_for(partial(connected, admin), 30, f"{address} connected")
            assert {c["name"] for c in connections} == set(addresses) - {address}
            dialed += [c for c in connections if c["dialed"]]
        assert dialed and all(c["url"].endswith(":9933") for c in dialed), dialed

        # Written on node 1 and on node 3, read on every node.
        clients[0].create_table("dev", "dog", indexed=["breed"])
        clients[0].insert("dev", "dog", [{"id": 1, "name": "Penny", "breed": "pug"}])
        wait_for(partial(clients[2].get, "dev", "dog", [1]), 30, "the table on node 3")
        clients[2].insert("dev", "dog", [{"id": 2, "name": "Otto", "breed": "beagle"}])
        for client in clients:
            wait_for(partial(holds_both, client), 30, f"both dogs on {client.address}")
    finally:
        for client in clients:
            client.close()
        for admin in admins:
            admin.close()

    # What the README says: `shoal --ca CA cluster status` against node 1's admin port.
    ca_file = tls / "ca" / "ca.crt"
    status = shoal("--ca", str(ca_file), "cluster", "status", "--node", addresses[0], "-o", "json")
    assert status.returncode == 0, status.stderr
    peers = {c["name"]: c["connected"] for c in orjson.loads(status.stdout)["connections"]}
    assert peers == dict.fromkeys(addresses[1:], True)

    # SIGTERM stops every service gracefully (exit 0), in reverse start order.
    codes = project.down()
    assert set(codes) >= {f"{n}-{s}" for n in NODES for s in ("storage", "replicator", "admin")}
    assert all(code == 0 for code in codes.values()), codes
    assert project.order.index("node1-storage") < project.order.index("node1-replicator")


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$node ${SET} $SET", env) == "$node x x"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "d  d"
    with pytest.raises(ComposeError, match="UNSET is missing: set it"):
        interpolate("${UNSET:?set it}", env)
    assert duration("1m30s", 0) == 90.0 and duration("500ms", 0) == 0.5
    with pytest.raises(ComposeError):
        duration("5 seconds", 0)


def test_runner_refuses_what_it_does_not_emulate(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yml"
    compose.write_text("services:\n  a:\n    image: x\n    privileged: true\n")
    with pytest.raises(ComposeError, match="unsupported keys"):
        ComposeProject.load(compose, DOCKERFILE, tmp_path, {})
