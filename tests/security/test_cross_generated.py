"""Cross-generated certificates: two nodes, each with the CA it generated on its first
start (so neither trusts the other), join by ``add_node`` with temporary credentials. The
new node's certificate is signed by the target's CA with exactly the new node's identity,
both record each other, and data then replicates both ways over mutual TLS (9933). Wrong
credentials and requests for another name change nothing, and the credentials are found
nowhere on disk afterwards."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common import certs
from services.local import Probe, healthy
from tests.conftest import MakeNode
from tests.harness.client import expect_error
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.node import PASSWORD, Node
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")
GENERATED = {"replication": {"securePort": 9933, **FAST_REPLICATION}}
PERMISSION_DENIED, FAILED_PRECONDITION = 7, 9
TEMP_USER = "joiner"
STORAGE_PORT, ADMIN_PORT = 9926, 9925


def _members(node: Node) -> set[str]:
    rows = node.internal_client().all_records("system", "hdb_nodes", "name")
    return {r["name"] for r in rows}


def _keys(node: Node) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(node.keys_path.iterdir()) if p.is_file()}


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _fingerprints(pem: bytes) -> set[bytes]:
    return {c.fingerprint(hashes.SHA256()) for c in x509.load_pem_x509_certificates(pem)}


def _temporary_super_user(target: Node) -> str:
    """A super user of ``target`` made for the exchange; its password, unique to the test."""
    password = "xgen-" + secrets.token_hex(12)
    admin = target.admin()
    admin.ok({"operation": "add_role", "role": "su", "permission": {"super_user": True}})
    admin.ok({"operation": "add_user", "username": TEMP_USER, "password": password, "role": "su"})
    return password


def _pair(make_node: MakeNode) -> tuple[Node, Node]:
    target = make_node(services=ALL, config=GENERATED)
    joiner = make_node(services=ALL, config=GENERATED)
    return target, joiner


def _replicates_both_ways(target: Node, joiner: Node) -> None:
    wait_for(
        lambda: joiner.connected(target.name) and target.connected(joiner.name),
        30,
        "the two nodes to connect over mutual TLS",
    )
    # The records below cross whatever session is up by then: a join's own record of its
    # target may change the route once more, and the session is dialed again.
    target.client().create_table("dev", "dog")
    target.client().insert("dev", "dog", [{"id": 1, "name": "Penny"}])

    def joiner_has(key: int) -> bool:
        try:
            return bool(joiner.client().get("dev", "dog", [key]))
        except grpc.RpcError:
            return False

    wait_for(lambda: joiner_has(1), 30, "the target's record on the joiner")
    joiner.client().insert("dev", "dog", [{"id": 2, "name": "Rex"}])
    wait_for(
        lambda: [r["name"] for r in target.client().get("dev", "dog", [2])] == ["Rex"],
        30,
        "the joiner's record on the target",
    )


def _cli(node: Node, *args: str, join_password: str) -> subprocess.CompletedProcess[str]:
    """The `shoal` command line against ``node``'s admin port, as its super user."""
    env = {
        **os.environ,
        "SHOAL_USERNAME": "admin",
        "SHOAL_PASSWORD": PASSWORD,
        "SHOAL_JOIN_PASSWORD": join_password,
        "SHOAL_CA": str(node.keys_path / "ca.crt"),
    }
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args, "--node", node.host],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_add_node_with_temporary_credentials(make_node: MakeNode, tmp_path: Path) -> None:
    target, joiner = _pair(make_node)
    password = _temporary_super_user(target)
    target_ca = _load(target.keys_path / "ca.crt")
    joiner_ca = _load(joiner.keys_path / "ca.crt")
    assert target_ca.subject != joiner_ca.subject  # two CAs: neither trusts the other
    with pytest.raises(ValueError):
        _load(joiner.keys_path / "node.crt").verify_directly_issued_by(target_ca)
    admin = joiner.admin()

    # Wrong password (with the command line): refused by the target, nothing changed on
    # either side.
    keys_before = _keys(joiner)
    refused = _cli(
        joiner,
        "cluster", "add-node", target.name, "--join-user", TEMP_USER, "--no-verify-tls",
        join_password=password + "-wrong",
    )  # fmt: skip
    assert refused.returncode == PERMISSION_DENIED, refused.stderr
    assert "refused the temporary credentials" in refused.stderr
    wrong = {
        "operation": "add_node",
        "hostname": target.name,
        "verify_tls": False,
        "authorization": {"username": TEMP_USER, "password": password + "-wrong"},
    }
    result, code = admin.execute(wrong)
    assert code == PERMISSION_DENIED, result
    assert "refused the temporary credentials" in result["error"]
    assert _keys(joiner) == keys_before
    assert _members(joiner) == {joiner.name} and _members(target) == {target.name}

    # The target's own checks, called directly: another node's name, its own name.
    pinned = grpc.ssl_channel_credentials(root_certificates=target.ca_pem())
    with grpc.secure_channel(target.address_of("admin"), pinned) as channel:
        from shoal.admin.v1 import admin_pb2_grpc

        stub = admin_pb2_grpc.AdminServiceStub(channel)
        metadata = (
            (
                "authorization",
                "Basic " + base64.b64encode(f"{TEMP_USER}:{password}".encode()).decode(),
            ),
        )

        def sign(name: str, csr_name: str) -> Any:
            request = apb.SignNodeCertificateRequest(
                certificate_request=certs.create_signing_request(csr_name).certificate_pem,
                name=name,
                signer=target.name,
            )
            return lambda: stub.SignNodeCertificate(request, metadata=metadata, timeout=30)

        expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, sign(joiner.name, "127.0.0.250"), "common name"
        )
        expect_error(grpc.StatusCode.PERMISSION_DENIED, sign(target.name, target.name), "own name")
        expect_error(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.SignNodeCertificate(
                apb.SignNodeCertificateRequest(name=joiner.name),
                metadata=(("authorization", "Basic " + base64.b64encode(b"joiner:no").decode()),),
                timeout=30,
            ),
        )
    assert _members(target) == {target.name}

    # The real thing, with Harper's JSON.
    right = {**wrong, "authorization": {"username": TEMP_USER, "password": password}}
    added = admin.ok(right)
    assert added["message"] == f"Successfully added '{target.name}' to cluster"
    assert added["node"]["name"] == target.name
    assert _members(joiner) == {joiner.name, target.name}
    assert joiner.name in _members(target)

    # The issued certificate has exactly the requested identity.
    issued = _load(joiner.keys_path / "node.crt")
    issued.verify_directly_issued_by(target_ca)
    assert [a.value for a in issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [
        joiner.name
    ]
    sans = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.IPAddress(ipaddress.ip_address(joiner.name))]
    assert issued.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = issued.not_valid_after_utc - issued.not_valid_before_utc
    assert lifetime <= dt.timedelta(days=365, minutes=10)
    key = joiner.keys_path / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert certs.key_matches(certs.load_private_key(key.read_bytes()), issued)
    assert keys_before["node.key"] != key.read_bytes()  # a new key, made on the joiner
    trusted = _fingerprints((joiner.keys_path / "ca.crt").read_bytes())
    assert trusted == {
        target_ca.fingerprint(hashes.SHA256()),
        joiner_ca.fingerprint(hashes.SHA256()),
    }
    recorded = {
        r["name"]: r
        for r in joiner.internal_client().all_records("system", "hdb_certificate", "name")
    }
    assert recorded[f"{certs.GENERATED_CA_PREFIX}{target.name}"]["is_authority"] is True
    assert recorded[joiner.name]["issuer"] == target_ca.subject.rfc4514_string()

    # Without a restart, replication connects both ways over mutual TLS.
    _replicates_both_ways(target, joiner)

    # Asked again: already a member, nothing sent.
    result, code = admin.execute(right)
    assert code == 6, result

    # The credentials are nowhere on disk: data, keys, configs, logs of both nodes.
    target.stop()
    joiner.stop()
    token = base64.b64encode(f"{TEMP_USER}:{password}".encode())
    needles = [password.encode(), token, password.encode("utf-16-le")]
    files = [p for node in (target, joiner) for p in node.root.rglob("*") if p.is_file()]
    assert len(files) > 20
    assert any(b"signed a certificate for joining node" in p.read_bytes() for p in files)
    leaks = [str(p) for p in files for n in needles if n in p.read_bytes()]
    assert leaks == []


def test_typed_add_node_verifies_the_target_unless_told_not_to(make_node: MakeNode) -> None:
    target, joiner = _pair(make_node)
    password = _temporary_super_user(target)
    token = base64.b64encode(f"{TEMP_USER}:{password}".encode()).decode()
    route = rpb.Route(hostname=target.name)
    admin = joiner.admin()

    # verify_tls defaults to true: the target's certificate is of a CA the joiner does not
    # trust, so nothing is sent and nothing changes.
    keys_before = _keys(joiner)
    expect_error(
        grpc.StatusCode.UNAVAILABLE,
        lambda: admin.call(
            "AddNode", apb.AddNodeRequest(route=route, authorization=f"Basic {token}")
        ),
        "verify_tls",
    )
    assert _keys(joiner) == keys_before
    assert _members(joiner) == {joiner.name} and _members(target) == {target.name}

    # A user who is not a super user of the target is refused by it.
    target.admin().ok({"operation": "add_role", "role": "ro", "permission": {"super_user": False}})
    target.admin().ok(
        {"operation": "add_user", "username": "reader", "password": "pw-123456", "role": "ro"}
    )
    reader = base64.b64encode(b"reader:pw-123456").decode()
    expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        lambda: admin.call(
            "AddNode",
            apb.AddNodeRequest(route=route, authorization=f"Basic {reader}", verify_tls=False),
        ),
        "needs a super user",
    )
    assert _members(target) == {target.name} and _keys(joiner) == keys_before

    reply = admin.call(
        "AddNode", apb.AddNodeRequest(route=route, authorization=f"Basic {token}", verify_tls=False)
    )
    assert reply.node.name == target.name
    _replicates_both_ways(target, joiner)


def test_a_node_with_configured_certificates_signs_nothing(make_node: MakeNode) -> None:
    """The target must hold its generated CA key; an operator-configured node answers
    FAILED_PRECONDITION, and the joiner changes nothing."""
    from tests.harness.certs import CertificateAuthority

    ca = CertificateAuthority.create()
    configured = make_node(services=ALL, start=False, config={"replication": FAST_REPLICATION})
    configured.update_config(
        {"tls": ca.write_node_files(configured.root / "tls", configured.name, [configured.name])}
    )
    configured.start()
    password = _temporary_super_user(configured)
    joiner = make_node(services=ALL, config=GENERATED)
    keys_before = _keys(joiner)
    result, code = joiner.admin().execute(
        {
            "operation": "add_node",
            "hostname": configured.name,
            "verify_tls": False,
            "authorization": {"username": TEMP_USER, "password": password},
        }
    )
    assert code == FAILED_PRECONDITION, result
    assert "no CA key" in result["error"]
    assert _keys(joiner) == keys_before
    assert _members(joiner) == {joiner.name}


def test_a_joined_node_operates_without_restart(make_node: MakeNode) -> None:
    """After a cross-generated join, the joined node's storage and admin ports serve its
    new certificate at once, and its cluster operations work: its status and routes (node
    sockets), its calls to the target's admin port (the certificate source it now trusts),
    and a route change its replicator refuses leaves shoal.yaml as it was."""
    target, joiner = _pair(make_node)
    cluster_ca = (target.keys_path / "ca.crt").read_bytes()

    def reachable(port: int) -> bool:
        """Whether a client trusting only the cluster's (the target's) CA reaches
        ``port`` of the joined node over TLS."""
        credentials = grpc.ssl_channel_credentials(root_certificates=cluster_ca)
        return healthy(Probe(f"{joiner.host}:{port}", credentials))

    assert not reachable(STORAGE_PORT) and not reachable(ADMIN_PORT)  # its own CA
    password = _temporary_super_user(target)
    admin = joiner.admin()
    admin.ok(
        {
            "operation": "add_node",
            "hostname": target.name,
            "verify_tls": False,
            "authorization": {"username": TEMP_USER, "password": password},
        }
    )
    wait_for(
        lambda: joiner.connected(target.name) and target.connected(joiner.name),
        30,
        "the two nodes to connect over mutual TLS",
    )
    # The storage and admin ports serve the certificate of the cluster's CA at once.
    wait_for(lambda: reachable(STORAGE_PORT), 15, "the joined node's storage port to switch")
    wait_for(lambda: reachable(ADMIN_PORT), 15, "the joined node's admin port to switch")
    status = admin.ok({"operation": "cluster_status"})
    assert [c["name"] for c in status["connections"] if c["connected"]] == [target.name]

    # A cluster-wide operation reaches the target's admin port over TLS from the CA the
    # join installed, not the one the joined node started with.
    result = admin.ok(
        {"operation": "set_configuration", "logging_level": "info", "replicated": True}
    )
    assert result["replicated"] == [{"node": target.name, "ok": True}]

    routed = admin.ok(
        {
            "operation": "cluster_set_routes",
            "routes": [{"host": target.name, "revokedCertificates": ["0badc0de"]}],
        }
    )
    assert routed["set"] == [{"host": target.name, "revokedCertificates": ["0badc0de"]}]
    written = joiner.config_path.read_text()
    assert "0BADC0DE" in written
    assert admin.ok({"operation": "cluster_get_routes"}) == [
        {"host": target.name, "revokedCertificates": ["0BADC0DE"]}
    ]

    # A field the route form does not have is refused, not dropped.
    _, code = admin.execute(
        {"operation": "cluster_set_routes", "routes": [{"host": "127.9.9.9", "colour": "red"}]}
    )
    assert code == 3  # INVALID_ARGUMENT

    # The replicator down: the change fails and the file is untouched.
    joiner.stop("replicator")
    failed, code = admin.execute(
        {"operation": "cluster_set_routes", "routes": [{"host": "127.9.9.9"}]}
    )
    assert code == 14, failed  # UNAVAILABLE
    assert joiner.config_path.read_text() == written
    joiner.start_service("replicator")
    wait_for(lambda: joiner.connected(target.name), 30, "the joiner to reconnect")


def test_a_join_succeeds_when_its_target_is_recorded_meanwhile(make_node: MakeNode) -> None:
    """Harper's body between two nodes with default settings and their own CAs. The join
    waits (testing.joinRecordDelayMs) before recording the target, so the replication
    the join started records it first: the join still answers Harper's success."""
    target = make_node(services=ALL, config=GENERATED)
    joiner = make_node(services=ALL, config={**GENERATED, "testing": {"joinRecordDelayMs": 8000}})
    password = _temporary_super_user(target)
    admin = joiner.admin()
    added = admin.ok(
        {
            "operation": "add_node",
            "hostname": target.name,
            "verify_tls": False,
            "authorization": {"username": TEMP_USER, "password": password},
        }
    )
    assert added["message"] == f"Successfully added '{target.name}' to cluster"
    assert _members(joiner) == {joiner.name, target.name}
    _replicates_both_ways(target, joiner)
    # Adding it again, once it is a member, is refused.
    again, code = admin.execute(
        {
            "operation": "add_node",
            "hostname": target.name,
            "verify_tls": False,
            "authorization": {"username": TEMP_USER, "password": password},
        }
    )
    assert code == 6, again  # ALREADY_EXISTS
