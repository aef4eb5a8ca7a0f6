"""Peer authorization on the mutual-TLS replication port (9933), with real processes and
certificates made here: the certificate grid, the dialer's checks of the server, CRLs
(fail-closed), live revocation under load, and junk on the port."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import ssl
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc

from tests.conftest import MakeCluster, MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority, self_signed, serial_of
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

SECURE_PORT = 9933
REPLICATING = ("storage", "replicator")


def _tls_node(
    make_node: MakeNode,
    tmp_path: Path,
    ca: CertificateAuthority,
    *,
    names: list[str] | None = None,
    replication: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    services: tuple[str, ...] = REPLICATING,
) -> Node:
    """A started node whose certificate (from ``ca``) names ``names`` (default: itself)."""
    host = next_address()
    files = ca.write_node_files(tmp_path / host / "tls", (names or [host])[0], names or [host])
    return make_node(
        name=host,
        host=host,
        services=services,
        config={
            "replication": {**FAST_REPLICATION, "gossip": False, **(replication or {})},
            "tls": {**files, **(tls or {})},
        },
    )


def _hello(
    node: Node, name: str, trust: bytes, key: bytes | None = None, cert: bytes | None = None
) -> rpb.PeerMessage | grpc.RpcError:
    """Dial ``node``'s secure port presenting ``cert`` and say Hello as ``name``, joining
    as a Shoal dialer does (``node`` does not know ``name``): the first message it
    answers, or the RPC error when TLS refuses the connection."""
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
    with grpc.secure_channel(f"{node.host}:{SECURE_PORT}", credentials) as channel:
        stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
        try:
            replies = stub.Replicate(
                iter([rpb.ReplicateRequest(message=rpb.PeerMessage(hello=hello))]), timeout=20
            )
            reply: rpb.ReplicateResponse = next(replies)
            replies.cancel()
            return reply.message
        except grpc.RpcError as exc:
            return exc


def test_only_the_correct_certificate_connects(make_node: MakeNode, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    other_ca = CertificateAuthority.create("Another CA")
    now = dt.datetime.now(dt.UTC)
    peers = {
        kind: next_address()
        for kind in (
            "no certificate",
            "self-signed",
            "other CA",
            "wrong name",
            "expired",
            "not yet valid",
            "revoked by route",
            "revoked by CRL",
            "correct",
        )
    }
    issued: dict[str, tuple[bytes | None, bytes | None]] = {
        "no certificate": (None, None),
        "self-signed": self_signed(peers["self-signed"], [peers["self-signed"]]),
        "other CA": other_ca.issue(peers["other CA"], [peers["other CA"]]),
        "wrong name": ca.issue("someone-else", ["someone-else", next_address()]),
        "expired": ca.issue(
            peers["expired"],
            [peers["expired"]],
            valid_from=now - dt.timedelta(days=3),
            valid_until=now - dt.timedelta(days=1),
        ),
        "not yet valid": ca.issue(
            peers["not yet valid"],
            [peers["not yet valid"]],
            valid_from=now + dt.timedelta(days=1),
            valid_until=now + dt.timedelta(days=3),
        ),
        "revoked by route": ca.issue(peers["revoked by route"], [peers["revoked by route"]]),
        "revoked by CRL": ca.issue(peers["revoked by CRL"], [peers["revoked by CRL"]]),
        "correct": ca.issue(peers["correct"], [peers["correct"]]),
    }
    route_revoked = issued["revoked by route"][1]
    crl_revoked = issued["revoked by CRL"][1]
    assert route_revoked is not None and crl_revoked is not None
    crl = tmp_path / "revoked.crl"
    crl.write_bytes(ca.crl([crl_revoked]))
    serial = serial_of(route_revoked)
    # Written as people copy serials: lower case with colons.
    spelled = ":".join(serial.lower()[i : i + 2] for i in range(0, len(serial), 2))
    node = _tls_node(
        make_node,
        tmp_path,
        ca,
        replication={
            "routes": [{"hostname": peers["revoked by route"], "revokedCertificates": [spelled]}]
        },
        tls={"crl": str(crl)},
    )

    outcomes = {kind: _hello(node, peers[kind], ca.pem, *issued[kind]) for kind in peers}

    for kind in ("no certificate", "self-signed", "other CA", "expired", "not yet valid"):
        outcome = outcomes[kind]
        assert isinstance(outcome, grpc.RpcError), f"{kind}: {outcome}"
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE, f"{kind}: {outcome}"
        assert node.connection(peers[kind]) is None  # refused before Shoal saw a name
    for kind, words in (
        ("wrong name", "but its certificate names"),
        ("revoked by route", f"serial {serial}) is revoked (replication.routes"),
        ("revoked by CRL", "is revoked by the CRL of CN=Shoal Test CA"),
    ):
        outcome = outcomes[kind]
        assert isinstance(outcome, rpb.PeerMessage), f"{kind}: {outcome}"
        assert outcome.WhichOneof("body") == "goodbye", f"{kind}: {outcome}"
        assert outcome.goodbye.code == rpb.GOODBYE_CODE_UNAUTHORIZED
        assert words in outcome.goodbye.reason, f"{kind}: {outcome.goodbye.reason}"
        # The refusing node logs why, and shows it in its status for that peer (for the
        # routed peer, the status also carries the node's own failed dials to it).
        log = node.log_path("replicator").read_text()
        assert words in log, kind
        # The refusal's log line names the dialer's address, serial and subject.
        certificate = issued[kind][1]
        assert certificate is not None
        subject = "someone-else" if kind == "wrong name" else peers[kind]
        assert re.search(
            rf"refused {re.escape(peers[kind])} from ipv4:[0-9.]+:[0-9]+ \(certificate serial"
            rf" {serial_of(certificate)}, subject CN={re.escape(subject)}\): ",
            log,
        ), kind
        if kind != "revoked by route":
            assert words in node.last_error(peers[kind]), kind
    correct = outcomes["correct"]
    assert isinstance(correct, rpb.PeerMessage), correct
    assert correct.WhichOneof("body") == "hello" and correct.hello.node_name == node.name
    log = node.log_path("replicator").read_text()
    assert f"refused {peers['revoked by CRL']} from" in log


def test_the_dialer_checks_the_server_certificate(make_node: MakeNode, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    # A server whose certificate names another address than the one dialed.
    misnamed = _tls_node(make_node, tmp_path, ca, names=[next_address()])
    # A server whose certificate serial the dialer's route revokes.
    revoked = _tls_node(make_node, tmp_path, ca)
    revoked_serial = serial_of(Path(revoked.config["tls"]["certificate"]).read_bytes())
    good = _tls_node(make_node, tmp_path, ca)
    dialer = _tls_node(
        make_node,
        tmp_path,
        ca,
        replication={
            "routes": [
                {"hostname": misnamed.name},
                {"hostname": revoked.name, "revokedCertificates": [revoked_serial]},
                {"hostname": good.name},
            ]
        },
    )
    wait_for(partial(dialer.connected, good.name), 30, "the dialer to reach the good server")
    wait_for(
        lambda: "certificate is not valid for" in dialer.last_error(misnamed.name),
        30,
        "the dialer to refuse the misnamed server",
    )
    wait_for(
        lambda: f"(serial {revoked_serial}) is revoked" in dialer.last_error(revoked.name),
        30,
        "the dialer to refuse the revoked server",
    )
    # The dialer's log names the server's address, serial and subject.
    assert (
        f"not connecting to {revoked.name} at {revoked.host}:9933 (certificate serial"
        f" {revoked_serial}, subject CN={revoked.name}): "
    ) in dialer.log_path("replicator").read_text()
    # Neither server ever had a session with the dialer: it stopped before its Hello.
    assert not dialer.connected(misnamed.name) and not dialer.connected(revoked.name)
    assert misnamed.connection(dialer.name) is None
    assert revoked.connection(dialer.name) is None


def test_unreadable_crl_fails_closed_then_recovers(make_node: MakeNode, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    crl = tmp_path / "node.crl"
    crl.write_bytes(b"not a revocation list")
    node = _tls_node(make_node, tmp_path, ca, tls={"crl": str(crl)})
    name = next_address()
    key, cert = ca.issue(name, [name])

    refused = _hello(node, name, ca.pem, key, cert)
    assert isinstance(refused, rpb.PeerMessage) and refused.WhichOneof("body") == "goodbye"
    assert refused.goodbye.code == rpb.GOODBYE_CODE_UNAUTHORIZED
    assert "refusing every peer" in refused.goodbye.reason
    assert "is not a PEM or DER revocation list" in refused.goodbye.reason
    assert "tls.crlFailClosed" in node.last_error(name)

    # A CRL another CA signed is not trusted either.
    crl.write_bytes(CertificateAuthority.create("Rogue CA").crl([]))
    refused = _hello(node, name, ca.pem, key, cert)
    assert isinstance(refused, rpb.PeerMessage) and refused.WhichOneof("body") == "goodbye"
    assert "not signed by a trusted certificate authority" in refused.goodbye.reason

    # The file is read again when it changes: a good CRL lets the peer in, no restart.
    crl.write_bytes(ca.crl([]))
    accepted = _hello(node, name, ca.pem, key, cert)
    assert isinstance(accepted, rpb.PeerMessage) and accepted.WhichOneof("body") == "hello"

    # Fail-open: a missing CRL is logged and peers are accepted.
    crl.unlink()
    node.update_config({"tls": {"crlFailClosed": False}})
    node.restart("replicator")
    accepted = _hello(node, name, ca.pem, key, cert)
    assert isinstance(accepted, rpb.PeerMessage) and accepted.WhichOneof("body") == "hello"
    log = node.log_path("replicator").read_text()
    assert "cannot be read" in log and "tls.crlFailClosed is false" in log


class _Writer(threading.Thread):
    """Inserts records on one node as fast as it acknowledges them."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True)
        self.client = node.client()
        self.stop = threading.Event()
        self.acked: list[tuple[int, float]] = []  # (id, monotonic time of the ack)
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                i += 1
                self.client.insert("data", "w", [{"id": i, "payload": "x" * 200}])
                self.acked.append((i, time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def acked_after(self, moment: float) -> list[int]:
        return [i for i, at in list(self.acked) if at > moment]


def _refusals(node: Node, peer: str) -> int:
    """How often ``node`` refused ``peer``: its hellos, or its server certificate."""
    log = node.log_path("replicator").read_text()
    return log.count(f"refused {peer} from") + log.count(f"not connecting to {peer} at ")


def test_live_revocation_under_load(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, services=("storage", "replicator", "admin"))
    a, b, c = cluster
    cluster.wait_members()
    for node, peer in ((a, c), (b, c), (a, b)):
        wait_for(partial(node.connected, peer.name), 30, f"{node.name} to reach {peer.name}")
    c.client().create_table("data", "w")
    cluster.wait_converged(["data"])
    serial = serial_of(Path(c.config["tls"]["certificate"]).read_bytes())

    writer = _Writer(c)
    writer.start()
    try:
        wait_for(lambda: len(writer.acked) >= 50, 30, "the writer to get going")
        started = time.monotonic()
        a.admin().ok(
            {"operation": "update_node", "hostname": c.name, "revoked_certificates": [serial]}
        )

        def cut(node: Node) -> bool:
            connection = node.connection(c.name)
            return (
                connection is not None
                and not connection.connected
                and "is revoked" in connection.last_connection_error
            )

        cut_at: dict[str, float] = {}

        def both_cut() -> bool:
            for node in (a, b):
                if node.name not in cut_at and cut(node):
                    cut_at[node.name] = time.monotonic()
            return len(cut_at) == 2

        wait_for(both_cut, 30, "a and b to cut c off", interval=0.05)
        elapsed = {name: at - started for name, at in cut_at.items()}
        print(f"revocation cut c off after {elapsed} s")
        assert max(elapsed.values()) <= 5.0, elapsed
        cut_done = max(cut_at.values())

        # c keeps writing; a and b keep refusing it (its dials and theirs).
        refusals = {node.name: _refusals(node, c.name) for node in (a, b)}
        wait_for(lambda: len(writer.acked_after(cut_done)) >= 50, 30, "more writes on c")
        for node in (a, b):

            def refused_again(node: Node = node) -> bool:
                return _refusals(node, c.name) >= refusals[node.name] + 2

            wait_for(refused_again, 30, f"{node.name} to refuse c again")
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    assert writer.error is None, writer.error
    late = set(writer.acked_after(cut_done))
    assert late

    # a and b still replicate with each other and agree.
    a.client().insert("data", "w", [{"id": "from-a"}])
    b.client().insert("data", "w", [{"id": "from-b"}])
    cluster.wait_converged(["data"], nodes=[a, b])
    for node in (a, b):
        ids = {r["id"] for r in node.client().all_records("data", "w")}
        assert {"from-a", "from-b"} <= ids
        assert not ids & late, f"{node.name} applied c's writes after the revocation"
        assert not node.connected(c.name)
    # The revocation round-trips through system.hdb_nodes (c, cut off at once, may never
    # receive it).
    for node in (a, b):
        row = node.client().get("system", "hdb_nodes", [c.name])[0]
        assert row["revoked_certificates"] == [serial]


def _junk(address: tuple[str, int], ca: CertificateAuthority, tmp_path: Path) -> list[Any]:
    """Open connections that are not replication peers; returns what must stay open."""
    held: list[Any] = []
    # Plaintext gRPC on the TLS port.
    with grpc.insecure_channel(f"{address[0]}:{address[1]}") as channel:
        stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            next(stub.Replicate(iter([rpb.ReplicateRequest()]), timeout=5))
    # Raw HTTP and random bytes.
    for payload in (b"GET / HTTP/1.1\r\nHost: shoal\r\n\r\n", os.urandom(64 * 1024)):
        with socket.create_connection(address, timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.recv(4096)
            except OSError:
                pass  # the server may reset the connection: that is a refusal
    # A complete TLS handshake (with a valid client certificate), then silence.
    key, cert = ca.issue("silent", ["silent"])
    (tmp_path / "silent.key").write_bytes(key)
    (tmp_path / "silent.crt").write_bytes(cert)
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(tmp_path / "silent.crt", tmp_path / "silent.key")
    tls = context.wrap_socket(socket.create_connection(address, timeout=5))
    assert tls.getpeercert() is not None
    held.append(tls)
    # 200 idle sockets.
    for _ in range(200):
        held.append(socket.create_connection(address, timeout=5))
    return held


def test_junk_on_the_tls_port_leaves_replication_running(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster
    assert cluster.ca is not None
    wait_for(partial(a.connected, b.name), 30, "the two nodes to connect")
    a.client().create_table("data", "dog")
    cluster.wait_converged(["data"])

    held = _junk((b.host, SECURE_PORT), cluster.ca, tmp_path)
    try:
        # With the junk still connected, a legitimate peer replicates both ways, and a
        # fresh peer session can be established too.
        a.client().insert("data", "dog", [{"id": 1, "name": "Penny"}])
        b.client().insert("data", "dog", [{"id": 2, "name": "Rex"}])
        cluster.wait_converged(["data"])
        assert b.running("replicator") and b.health("replicator")
        a.restart("replicator")
        wait_for(partial(b.connected, a.name), 30, "a to reconnect to b")
        a.client().insert("data", "dog", [{"id": 3, "name": "Tiny"}])
        cluster.wait_converged(["data"])
        assert {r["id"] for r in b.client().all_records("data", "dog")} == {1, 2, 3}
    finally:
        for connection in held:
            connection.close()
    assert b.running("replicator") and b.running("storage")
