"""Certificate files changed on disk are used by the replicator without a restart: the
secure port serves the new certificate to new connections, and new dials present it.
A node rotated to a certificate its peers do not trust keeps its live sessions (they were
established with the old one) but cannot make new ones, until it gets a good one again."""

from __future__ import annotations

import socket
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority, serial_of
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

SECURE_PORT = 9933
CLIENT_PORTS = (9926, 9925)  # storage, admin


def _node(
    make_node: MakeNode,
    tmp_path: Path,
    ca: CertificateAuthority,
    routes: list[str],
    services: tuple[str, ...] = ("storage", "replicator"),
) -> Node:
    host = next_address()
    return make_node(
        name=host,
        host=host,
        services=services,
        config={
            "replication": {**FAST_REPLICATION, "routes": routes, "gossip": False},
            "tls": ca.write_node_files(tmp_path / host / "tls", host, [host]),
        },
    )


def _files(node: Node) -> tuple[Path, Path]:
    tls = node.config["tls"]
    return Path(tls["certificate"]), Path(tls["privateKey"])


def _rotate(node: Node, ca: CertificateAuthority) -> str:
    """Give ``node`` a new certificate from ``ca`` (key first, as an operator might);
    returns its serial."""
    key, certificate = ca.issue(node.name, [node.name])
    cert_path, key_path = _files(node)
    key_path.write_bytes(key)
    cert_path.write_bytes(certificate)
    return serial_of(certificate)


def _served_serial(
    node: Node, ca: CertificateAuthority, tmp_path: Path, port: int = SECURE_PORT
) -> str:
    """The serial of the certificate ``node``'s ``port`` presents to a new connection
    (read with Python's ssl module, trusting ``ca``, with a client certificate from it)."""
    key, cert = ca.issue("probe", ["probe"])
    (tmp_path / "probe.key").write_bytes(key)
    (tmp_path / "probe.crt").write_bytes(cert)
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(tmp_path / "probe.crt", tmp_path / "probe.key")
    raw = socket.create_connection((node.host, port), timeout=5)
    with context.wrap_socket(raw, server_hostname=node.host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "X")


def _pids(*nodes: Node) -> dict[str, int]:
    return {f"{n.name} {s}": p.pid for n in nodes for s, p in n.processes.items()}


def _ids(node: Node) -> set[Any]:
    return {r["id"] for r in node.client().all_records("data", "dog")}


def test_rotated_certificates_are_used_without_a_restart(
    make_node: MakeNode, tmp_path: Path
) -> None:
    ca = CertificateAuthority.create()
    b = _node(make_node, tmp_path, ca, routes=[], services=("storage", "replicator", "admin"))
    a = _node(make_node, tmp_path, ca, routes=[b.name])  # only a dials
    wait_for(partial(b.connected, a.name), 30, "a to connect to b")
    pids = _pids(a, b)
    a_old = serial_of(_files(a)[0].read_bytes())
    b_old = serial_of(_files(b)[0].read_bytes())
    assert _served_serial(b, ca, tmp_path) == b_old
    assert [_served_serial(b, ca, tmp_path, port) for port in CLIENT_PORTS] == [b_old, b_old]

    # The server side: new connections to b get b's new certificate, on the client ports
    # (storage, admin) too.
    b_new = _rotate(b, ca)
    for port in (SECURE_PORT, *CLIENT_PORTS):
        wait_for(
            partial(lambda p: _served_serial(b, ca, tmp_path, p) == b_new, port),
            10,
            f"b's port {port} to serve its new certificate",
        )

    # The dialer side: a's new certificate is what a presents on its next dial. b revokes
    # a's old serial, which cuts the live session (established with the old certificate);
    # a dials again and is admitted, which only the new certificate can be.
    a_new = _rotate(a, ca)
    assert _served_serial(a, ca, tmp_path) == a_new
    b.admin().ok({"operation": "update_node", "hostname": a.name, "revoked_certificates": [a_old]})
    wait_for(
        lambda: f"(serial {a_old}) is revoked" in b.last_error(a.name),
        20,
        "b to cut the session made with a's old certificate",
    )
    a.client().create_table("data", "dog")
    a.client().insert("data", "dog", [{"id": 1}])
    wait_for(lambda: _ids(b) == {1}, 30, "a's write to reach b over a new session")
    assert b.connected(a.name) and a.connected(b.name)
    assert _pids(a, b) == pids, "a process was restarted"
    for node, old, new in ((a, a_old, a_new), (b, b_old, b_new)):
        log = node.log_path("replicator").read_text()
        assert f"now using the certificate with serial {new} (was {old})" in log


def test_a_certificate_from_an_untrusted_ca_cuts_new_connections_only(
    make_node: MakeNode, tmp_path: Path
) -> None:
    ca = CertificateAuthority.create()
    rogue = CertificateAuthority.create("Rogue CA")
    b = _node(make_node, tmp_path, ca, routes=[])
    a = _node(make_node, tmp_path, ca, routes=[b.name])
    wait_for(partial(b.connected, a.name), 30, "a to connect to b")
    a.client().create_table("data", "dog")
    a.client().insert("data", "dog", [{"id": 1}])
    wait_for(lambda: _ids(b) == {1}, 30, "the first write on b")
    # Opened now, while a's storage port still serves a certificate of the cluster's CA.
    writer = a.client()
    writer.get("data", "dog", [1])

    rogue_serial = _rotate(a, rogue)
    # New connections to a get the rogue certificate: a client trusting the cluster's CA
    # refuses it.
    with pytest.raises(ssl.SSLCertVerificationError):
        _served_serial(a, ca, tmp_path)
    assert _served_serial(a, rogue, tmp_path) == rogue_serial
    # So do new connections to its client ports.
    assert _served_serial(a, rogue, tmp_path, CLIENT_PORTS[0]) == rogue_serial
    # The live session was established with the old certificate and keeps running.
    writer.insert("data", "dog", [{"id": 2}])
    wait_for(lambda: _ids(b) == {1, 2}, 30, "a write over the live session")
    assert a.connected(b.name)

    # Once that session ends, a cannot make a new one: b's TLS refuses a's certificate.
    b.restart("replicator")

    def refused() -> bool:
        error = a.last_error(b.name)
        return not a.connected(b.name) and "does not accept this node's certificate" in error

    wait_for(refused, 30, "a's new dials to fail")
    assert f"(serial {rogue_serial}, issued by CN=Rogue CA)" in a.last_error(b.name)
    writer.insert("data", "dog", [{"id": 3}])
    log = a.log_path("replicator").read_text()
    assert f"now using the certificate with serial {rogue_serial}" in log
    assert 3 not in _ids(b)

    # A good certificate again: a reconnects, no restart.
    _rotate(a, ca)
    wait_for(lambda: _ids(b) == {1, 2, 3}, 30, "a to reconnect with a good certificate")
