"""The Node.js example client (examples/clients/node) against a real node: it loads
protos/ as they are, signs in, creates a table, inserts, searches and reads the cluster
status over TLS, and maps a refused sign-in to the gRPC status code."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import orjson
import pytest

from tests.conftest import MakeNode
from tests.harness.node import PASSWORD, REPO, Node

CLIENT = REPO / "examples" / "clients" / "node"
NODE = shutil.which("node")
UNAUTHENTICATED = 16


def run_client(node: Node, password: str) -> subprocess.CompletedProcess[str]:
    # `make setup` installs the client's packages with npm: Node.js is part of the
    # project's toolchain, so a machine without it fails here rather than skipping.
    if NODE is None:
        pytest.fail("node (Node.js) is not on PATH; `make setup` needs it too")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"{CLIENT}/node_modules is missing: run `make setup`")
    files = node.certificate_files()
    assert files is not None
    env = {**os.environ, "SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": password}
    argv = [NODE, str(CLIENT / "shoal-client.js")]
    argv += ["--storage", node.address_of("storage"), "--admin", node.address_of("admin")]
    argv += ["--ca", str(files[1])]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    # A node with TLS on its client ports (certificates it generates on first start).
    return make_node(
        services=("storage", "replicator", "admin"), config={"replication": {"securePort": 9933}}
    )


def test_node_client_runs_every_step(node: Node) -> None:
    done = run_client(node, PASSWORD)
    assert done.returncode == 0, done.stderr
    steps: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        item = orjson.loads(line)
        steps[item.pop("step")] = item
    assert steps["authenticate"] == {"username": "admin", "role": "super_user", "super_user": True}
    assert steps["create_table"] == {"database": "dev", "table": "dog"}
    assert steps["insert"]["inserted"] == [1, 2, 3]
    found = steps["search"]["records"]
    assert sorted(r["name"] for r in found) == ["Otto", "Penny"]
    assert steps["cluster_status"]["node_name"] == node.name

    # What the client wrote is in the node, read back through Python.
    records = node.client().get("dev", "dog", [1, 2, 3])
    assert [r["breed"] for r in records] == ["pug", "husky", "pug"]


def test_node_client_exits_with_the_status_code(node: Node) -> None:
    done = run_client(node, "wrong-password")
    assert done.returncode == UNAUTHENTICATED, done.stdout + done.stderr
    assert done.stderr.startswith("shoal-client: UNAUTHENTICATED:"), done.stderr
    assert done.stdout == ""
