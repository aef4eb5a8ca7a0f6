"""IP-based authentication on the plain replication port (9932), with nodes that have
source addresses of their own: a node in this namespace on 127.200.S.1, a legitimate
peer and an intruder in network namespaces of their own (see tests/harness/netns.py).
On plain loopback every dial would leave from 127.0.0.1 and the test would prove
nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeNode
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.netns import IP, NamespacedNode, Subnet, unavailable
from tests.harness.node import REPO, Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

REPLICATING = ("storage", "replicator")
# Insecure mode: no certificates, replication on the plain port only.
PLAIN = {**FAST_REPLICATION, "securePort": None}


class Lab:
    """A subnet and the namespaced nodes started in it; everything goes at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.subnet = Subnet()
        self.nodes: list[NamespacedNode] = []

    def node(self, routes: list[str], **config: Any) -> NamespacedNode:
        namespace, address = self.subnet.add()
        node = NamespacedNode(
            self.workdir,
            namespace,
            name=address,
            host=address,
            services=REPLICATING,
            config={"replication": {**PLAIN, "routes": routes}, **config},
        )
        self.nodes.append(node)
        return node

    def close(self) -> None:
        try:
            for node in self.nodes:
                node.close()
        finally:
            self.subnet.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = unavailable()
    if reason is not None:
        # Not skipped: without these nodes the plain port's address check is unproven.
        pytest.fail(f"IP-based authentication needs nodes with their own addresses: {reason}")
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()
        assert made.subnet.leftovers() == [], "namespaces or links were left behind"


def _databases(node: Node) -> set[str]:
    reply = node.internal_client().call("DescribeAll", pb.DescribeAllRequest())
    return {d.name for d in reply.databases}


def _records(node: Node, database: str, table: str) -> list[dict[str, Any]]:
    if database not in _databases(node):
        return []
    return node.client().all_records(database, table)


def _members(node: Node) -> set[str]:
    rows = node.internal_client().all_records("system", "hdb_nodes", "name")
    return {r["name"] for r in rows}


def _raw_peer(namespace: str, *args: str) -> dict[str, Any]:
    """Run tests/harness/peer_client.py inside ``namespace``; its JSON answer."""
    done = subprocess.run(
        [IP, "netns", "exec", namespace, sys.executable, "-m", "tests.harness.peer_client", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.strip(), done.stderr
    answer: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_plain_port_admits_only_known_addresses(lab: Lab, make_node: MakeNode) -> None:
    root = lab.subnet.root_address
    legit = lab.node(routes=[root])
    intruder = lab.node(routes=[root])
    listener = make_node(
        name=root,
        host=root,
        services=REPLICATING,
        config={"replication": {**PLAIN, "routes": [legit.name]}},
    )
    legit.start()
    intruder.start()
    # The intruder has data of its own to push.
    intruder.client().create_table("loot", "secrets")
    intruder.client().insert("loot", "secrets", [{"id": 1, "pin": 1234}])

    wait_for(partial(listener.connected, legit.name), 30, "the legitimate peer to connect")
    refusal = f"refusing the plain-port connection from {intruder.host}"
    wait_for(
        lambda: refusal in listener.last_error(intruder.name),
        30,
        "the listener to refuse the intruder",
    )
    # The intruder sees why, and the listener logged it.
    wait_for(
        lambda: refusal in intruder.last_error(listener.name),
        30,
        "the intruder to be told why",
    )
    assert f"{intruder.name} is not a route or member" in intruder.last_error(listener.name)
    assert refusal in listener.log_path("replicator").read_text()
    assert not listener.connected(intruder.name)

    # The legitimate peer replicates both ways.
    legit.client().create_table("data", "dog")
    legit.client().insert("data", "dog", [{"id": 1, "name": "Penny"}])
    wait_for(lambda: _records(listener, "data", "dog"), 30, "legit's write on the listener")
    listener.client().insert("data", "dog", [{"id": 2, "name": "Rex"}])
    wait_for(lambda: len(_records(legit, "data", "dog")) == 2, 30, "the listener's write on legit")

    # A hand-made peer in the intruder's namespace claims to be the legitimate node (a
    # known name) and sends a write right after its Hello: refused on its address, and
    # nothing it sent is applied.
    spoofed = _raw_peer(
        intruder.namespace,
        *("--target", f"{root}:9932", "--name", legit.name, "--expected", root),
        *("--join", f"ws://{legit.name}:9932", "--write", "data/dog/spoofed"),
    )
    assert spoofed["body"] == "goodbye", spoofed
    assert spoofed["code"] == rpb.GOODBYE_CODE_UNAUTHORIZED
    assert f"from {intruder.host} saying it is {legit.name}" in spoofed["reason"]
    assert f"{intruder.host} is not an address of {legit.name}" in spoofed["reason"]

    # The intruder keeps being refused after all of this; a later write of the legitimate
    # peer arrives, and none of the intruder's data ever did.
    log = listener.log_path("replicator")
    seen = log.read_text().count(refusal)
    wait_for(lambda: log.read_text().count(refusal) > seen, 30, "another refusal")
    legit.client().insert("data", "dog", [{"id": 3, "name": "Tiny"}])
    wait_for(lambda: len(_records(listener, "data", "dog")) == 3, 30, "legit's last write")
    assert {r["id"] for r in _records(listener, "data", "dog")} == {1, 2, 3}
    assert "loot" not in _databases(listener)
    assert intruder.name not in _members(listener)
    assert listener.connected(legit.name)


def test_a_known_name_from_an_unknown_address_cannot_join(lab: Lab, make_node: MakeNode) -> None:
    """A join on the plain port needs a known address too: the listener knows no one."""
    root = lab.subnet.root_address
    stranger = lab.node(routes=[root])
    listener = make_node(name=root, host=root, services=REPLICATING, config={"replication": PLAIN})
    stranger.start("storage")
    joined = _raw_peer(
        stranger.namespace,
        *("--target", f"{root}:9932", "--name", stranger.name, "--expected", root),
        *("--join", f"ws://{stranger.name}:9932"),
    )
    assert joined["body"] == "goodbye" and joined["code"] == rpb.GOODBYE_CODE_UNAUTHORIZED
    assert f"connection from {stranger.host} " in joined["reason"]
    assert "saying it is" in listener.last_error(stranger.name)
    assert stranger.name not in _members(listener)
