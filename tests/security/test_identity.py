"""Unknown identities on the mutual-TLS replication port: a dialer that is neither a route
nor a member is refused unless it joins; a join (a certificate from the cluster's CA
naming the dialer) is admitted and recorded in system.hdb_nodes, so every member learns
of the new node."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc

from tests.conftest import MakeCluster, MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

SECURE_PORT = 9933


def _hello(node: Node, name: str, ca: CertificateAuthority, join: str | None) -> rpb.PeerMessage:
    """Say Hello to ``node``'s secure port as ``name`` (certificate from ``ca`` naming it),
    joining with ``join`` as url unless None; the first message ``node`` answers."""
    key, cert = ca.issue(name, [name])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.pem, private_key=key, certificate_chain=cert
    )
    hello = rpb.Hello(
        protocol_min=1,
        protocol_max=1,
        node_name=name,
        expected_name=node.name,
        all_databases=True,
        sends=True,
        receives=True,
        join=rpb.Join(url=join) if join is not None else None,
    )
    with grpc.secure_channel(f"{node.host}:{SECURE_PORT}", credentials) as channel:
        stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
        replies = stub.Replicate(
            iter([rpb.ReplicateRequest(message=rpb.PeerMessage(hello=hello))]), timeout=20
        )
        reply: rpb.ReplicateResponse = next(replies)
        replies.cancel()
        return reply.message


def _members(node: Node) -> dict[str, dict[str, Any]]:
    rows = node.internal_client().all_records("system", "hdb_nodes", "name")
    return {r["name"]: r for r in rows}


def test_an_unknown_dialer_is_refused_unless_it_joins(make_node: MakeNode, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    host = next_address()
    node = make_node(
        name=host,
        host=host,
        services=("storage", "replicator"),
        config={
            "replication": {**FAST_REPLICATION, "gossip": False},
            "tls": ca.write_node_files(tmp_path / host / "tls", host, [host]),
        },
    )
    stranger = next_address()

    refused = _hello(node, stranger, ca, join=None)
    assert refused.WhichOneof("body") == "goodbye", refused
    assert refused.goodbye.code == rpb.GOODBYE_CODE_UNAUTHORIZED
    reason = refused.goodbye.reason
    assert f"{stranger} is not a member of this cluster" in reason
    assert f'"operation": "add_node", "hostname": "{stranger}"' in reason
    assert reason in node.log_path("replicator").read_text()
    assert node.connection(stranger).last_connection_error == reason
    assert stranger not in _members(node)

    # A bad url in the join is refused, and nothing is recorded.
    bad = _hello(node, stranger, ca, join=f"shoals://{next_address()}:9933")
    assert bad.goodbye.code == rpb.GOODBYE_CODE_PROTOCOL_ERROR
    assert "unusable url" in bad.goodbye.reason
    assert stranger not in _members(node)

    # Joining with a certificate from the cluster's CA: admitted and recorded.
    url = f"shoals://{stranger}:9933"
    admitted = _hello(node, stranger, ca, join=url)
    assert admitted.WhichOneof("body") == "hello" and admitted.hello.node_name == node.name
    wait_for(lambda: stranger in _members(node), 20, "the joined node's row")
    assert _members(node)[stranger]["url"] == url
    log = node.log_path("replicator").read_text()
    assert f"admitting {stranger}, which joins with a certificate from a trusted CA" in log
    assert f"recorded {stranger} in system.hdb_nodes" in log

    # Now a member: admitted without a join.
    def admitted_as_member() -> bool:
        return _hello(node, stranger, ca, join=None).WhichOneof("body") == "hello"

    wait_for(admitted_as_member, 20, "the new member to be admitted without a join")


def test_a_node_that_joins_one_member_reaches_every_member(
    make_cluster: MakeCluster, make_node: MakeNode, tmp_path: Path
) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster
    assert cluster.ca is not None
    wait_for(partial(a.connected, b.name), 30, "a and b to connect")
    host = next_address()
    # c knows only a; nobody runs add_node for it.
    c = make_node(
        name=host,
        host=host,
        services=("storage", "replicator"),
        config={
            "replication": {**FAST_REPLICATION, "routes": [a.name], "gossip": True},
            "tls": cluster.ca.write_node_files(tmp_path / host / "tls", host, [host]),
        },
    )
    wait_for(partial(c.connected, a.name), 30, "c to reach a")
    wait_for(partial(b.connected, c.name), 30, "b to learn of c and connect")
    assert c.connected(b.name)
    names = {a.name, b.name, c.name}
    for node in (a, b, c):

        def lists_everyone(node: Node = node) -> bool:
            return set(_members(node)) == names

        wait_for(lists_everyone, 30, f"{node.name} to list every member")
    c.client().create_table("data", "dog")
    c.client().insert("data", "dog", [{"id": 1}])
    cluster.wait_converged(["data"], nodes=[a, b, c])
