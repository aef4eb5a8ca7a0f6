"""``replication.enableRootCAs: true``: the replicator trusts the system CA bundle as
well as ``tls.certificateAuthority``, when dialing and when accepting. The "system
bundle" is a file made here, named by ``SSL_CERT_FILE`` in the node's environment (how
OpenSSL, and ``ssl.get_default_verify_paths``, find it)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc

from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

REPLICATING = ("storage", "replicator")


def _node(
    make_node: MakeNode,
    tmp_path: Path,
    ca: CertificateAuthority,
    replication: dict[str, Any],
    env: dict[str, str],
    trust: bytes | None = None,
) -> Node:
    host = next_address()
    files = ca.write_node_files(tmp_path / host / "tls", host, [host])
    if trust is not None:
        Path(files["certificateAuthority"]).write_bytes(trust)
    node = make_node(
        start=False,
        name=host,
        host=host,
        services=REPLICATING,
        config={"replication": {**FAST_REPLICATION, "gossip": False, **replication}, "tls": files},
    )
    for service in REPLICATING:
        node.start_service(service, env=env)
    return node


def _hello(node: Node, name: str, key: bytes, cert: bytes, trust: bytes) -> str:
    """What ``node``'s secure port answers a joining Hello from ``name``: the body of its
    first message, or the gRPC status when TLS refused the connection."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trust, private_key=key, certificate_chain=cert
    )
    hello = rpb.Hello(
        protocol_min=1,
        protocol_max=1,
        node_name=name,
        expected_name=node.name,
        all_databases=True,
        sends=True,
        receives=True,
        join=rpb.Join(),
    )
    with grpc.secure_channel(f"{node.host}:9933", credentials) as channel:
        stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
        try:
            replies = stub.Replicate(
                iter([rpb.ReplicateRequest(message=rpb.PeerMessage(hello=hello))]), timeout=20
            )
            body = next(replies).message.WhichOneof("body")
            replies.cancel()
            return str(body)
        except grpc.RpcError as exc:
            return str(exc.code().name)


def test_root_cas_are_trusted_both_ways(make_node: MakeNode, tmp_path: Path) -> None:
    cluster_ca = CertificateAuthority.create("Cluster CA")
    public = CertificateAuthority.create("Public Root CA")
    bundle = tmp_path / "system-ca-bundle.pem"
    bundle.write_bytes(b"# the system's trusted roots\n" + public.pem)
    env = {"SSL_CERT_FILE": str(bundle)}

    # d has a certificate from the public CA (and trusts both CAs itself).
    d = _node(make_node, tmp_path, public, {}, env, trust=cluster_ca.pem + public.pem)
    # n trusts the cluster CA and, with enableRootCAs, the system bundle; m does not.
    n = _node(make_node, tmp_path, cluster_ca, {"routes": [d.name], "enableRootCAs": True}, env)
    m = _node(make_node, tmp_path, cluster_ca, {"routes": [d.name]}, env)

    # Dialing: n accepts d's certificate (through the system bundle), m does not.
    wait_for(partial(n.connected, d.name), 30, "n to connect to d")
    wait_for(
        lambda: "presents a certificate this node does not accept" in m.last_error(d.name),
        30,
        "m to refuse d's certificate",
    )
    d.client().create_table("data", "dog")
    d.client().insert("data", "dog", [{"id": 1}])
    wait_for(lambda: n.client().all_records("data", "dog"), 30, "d's write on n")

    # Accepting: a peer with a certificate from the public CA gets in on n only.
    name = next_address()
    key, cert = public.issue(name, [name])
    assert _hello(n, name, key, cert, cluster_ca.pem) == "hello"
    assert _hello(m, name, key, cert, cluster_ca.pem) == "UNAVAILABLE"
