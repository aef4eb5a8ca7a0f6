"""The certificate lifecycle with real processes: a node records its CA and certificate in
``system.hdb_certificate``, certificates are added, listed and removed through Execute and
the typed RPCs, the rows replicate, and private keys stay in owner-only files."""

from __future__ import annotations

import stat
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from shoal.admin.v1 import admin_pb2 as apb

from services.common import certs
from tests.conftest import MakeCluster, MakeNode
from tests.harness.node import Node
from tests.harness.wait import wait_for

INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION = 3, 5, 7, 9
WITH_ADMIN = ("storage", "admin")
ALL = ("storage", "replicator", "admin")


def _tls_node(make_node: MakeNode, services: tuple[str, ...] = WITH_ADMIN) -> Node:
    """A node whose certificate comes from a CA made by services/common/certs.py."""
    node = make_node(start=False, services=services)
    root = Path(node.config["rootPath"])
    authority = certs.ensure_authority(node.root / "ca", "Test-Node-CA")
    certs.ensure_node_files(root / "keys", authority, node.name)
    node.update_config(
        {
            "tls": {
                "certificate": "keys/node.crt",
                "privateKey": "keys/node.key",
                "certificateAuthority": "keys/ca.crt",
            }
        }
    )
    return node.start()


def _key_body(pem: bytes) -> bytes:
    """A line of the key's base64 body: what would show if the key leaked into a file."""
    return pem.splitlines()[1]


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def _expect_code(code: grpc.StatusCode, call: Any, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert text in (info.value.details() or "")


def test_node_records_its_ca_and_certificate(make_node: MakeNode) -> None:
    node = _tls_node(make_node)
    root = Path(node.config["rootPath"])
    node_pem = (root / "keys" / "node.crt").read_bytes()
    ca_pem = (root / "keys" / "ca.crt").read_bytes()
    admin = node.admin()

    listed = _by_name(admin.ok({"operation": "list_certificates"}))
    assert sorted(listed) == sorted([node.name, "Test-Node-CA"])
    mine, ca = listed[node.name], listed["Test-Node-CA"]
    info = certs.read_details(node_pem)
    assert mine["certificate"] == node_pem.decode()
    assert mine["subject"] == f"CN={node.name}" and mine["issuer"] == "CN=Test-Node-CA"
    assert mine["subject_alternative_names"] == [f"IP:{node.name}"]
    assert mine["serial_number"] == info.serial_number
    assert mine["valid_from"] == info.not_before.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert mine["valid_to"] == info.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert mine["uses"] == ["serverAuth", "clientAuth"]
    assert mine["is_authority"] is False and mine["is_self_signed"] is False
    assert mine["private_key_name"] == "keys/node.key" and mine["node_name"] == node.name
    assert mine["details"]["subject_alt_name"] == f"IP:{node.name}"
    assert ca["certificate"] == ca_pem.decode()
    assert ca["is_authority"] is True and ca["is_self_signed"] is True
    assert ca["private_key_name"] is None
    assert ca["serial_number"] == certs.read_details(ca_pem).serial_number

    searched = admin.ok(
        {
            "operation": "search_by_value",
            "database": "system",
            "table": "hdb_certificate",
            "attribute": "name",
            "value": "*",
        }
    )
    assert _by_name(searched).keys() == listed.keys()
    for row in searched:
        assert "PRIVATE KEY" not in str(row)
        assert {k: row[k] for k in listed[row["name"]]} == listed[row["name"]]

    typed = node.admin().call("ListCertificates", apb.ListCertificatesRequest())
    by_name = {c.name: c for c in typed.certificates}
    assert by_name[node.name].serial_number == info.serial_number
    assert by_name[node.name].valid_to.ToDatetime().replace(tzinfo=info.not_after.tzinfo) == (
        info.not_after
    )
    assert by_name["Test-Node-CA"].is_authority

    # The private key is in exactly one file, owner-only; never in the database.
    key_pem = (root / "keys" / "node.key").read_bytes()
    node.stop("storage")  # flush RocksDB before scanning its files
    assert _files_holding(root, _key_body(key_pem)) == [root / "keys" / "node.key"]
    assert _mode(root / "keys" / "node.key") == 0o600
    assert _mode(root / "keys") == 0o700
    for path in _files_holding(root, b"PRIVATE KEY"):
        assert _mode(path) == 0o600, path

    node.start_service("storage")  # same files: the rows are kept as they are
    again = _by_name(admin.ok({"operation": "list_certificates"}))
    assert again == listed


def test_add_list_remove_round_trip_and_refusals(make_node: MakeNode) -> None:
    node = _tls_node(make_node)
    root = Path(node.config["rootPath"])
    admin = node.admin()
    before = admin.ok({"operation": "list_certificates"})
    other_ca = certs.create_authority("Partner-CA")
    partner = certs.issue_node_certificate(other_ca, "partner.example", ["10.9.9.9"])
    stranger = certs.issue_node_certificate(other_ca, "stranger")

    def refused(operation: dict[str, Any], code: int, text: str) -> None:
        result, got = admin.execute({"operation": "add_certificate", **operation})
        assert got == code and text in result["error"], result

    good = {"name": "partner", "certificate": partner.certificate_pem.decode()}
    refused({**good, "certificate": "hello"}, INVALID_ARGUMENT, "not a PEM certificate")
    refused(
        {**good, "private_key": stranger.key_pem.decode()},
        INVALID_ARGUMENT,
        "does not belong to the certificate",
    )
    refused({**good, "private_key": "junk"}, INVALID_ARGUMENT, "not a PEM private key")
    refused({**good, "name": "../etc/passwd"}, INVALID_ARGUMENT, "invalid certificate name")
    refused({**good, "is_authority": True}, INVALID_ARGUMENT, "not a certificate authority")
    refused({"name": "partner"}, INVALID_ARGUMENT, "'certificate' is required")
    refused({**good, "name": node.name}, FAILED_PRECONDITION, "tls.* configuration uses")
    assert admin.ok({"operation": "list_certificates"}) == before  # nothing written
    assert not (root / "keys" / "certificates").exists()

    added = admin.ok(
        {**good, "operation": "add_certificate", "private_key": partner.key_pem.decode()}
    )
    assert added["message"] == "Successfully added certificate: partner"
    assert added["certificate"]["subject_alternative_names"] == [
        "DNS:partner.example",
        "IP:10.9.9.9",
    ]
    key_file = root / "keys" / "certificates" / "partner.key"
    assert key_file.read_bytes() == partner.key_pem and _mode(key_file) == 0o600
    listed = _by_name(admin.ok({"operation": "list_certificates"}))
    assert listed["partner"]["private_key_name"] == "keys/certificates/partner.key"
    assert listed["partner"]["node_name"] == node.name
    assert "PRIVATE KEY" not in str(listed)

    # Typed: add a CA, list, refuse, remove.
    typed = node.admin()
    reply = typed.call(
        "AddCertificate",
        apb.AddCertificateRequest(
            name="Partner CA", certificate=other_ca.certificate_pem.decode(), is_authority=True
        ),
    )
    assert reply.certificate.is_authority and reply.certificate.subject == "CN=Partner-CA"
    assert reply.certificate.private_key_name == ""
    names = [
        c.name for c in typed.call("ListCertificates", apb.ListCertificatesRequest()).certificates
    ]
    assert names == sorted([*(r["name"] for r in before), "partner", "Partner CA"])
    _expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: typed.call(
            "AddCertificate",
            apb.AddCertificateRequest(
                name="x", certificate=partner.certificate_pem.decode(), is_authority=True
            ),
        ),
        "not a certificate authority",
    )
    _expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: typed.call(
            "AddCertificate",
            apb.AddCertificateRequest(
                name="y",
                certificate=partner.certificate_pem.decode(),
                private_key=stranger.key_pem.decode(),
            ),
        ),
        "does not belong",
    )
    _expect_code(
        grpc.StatusCode.NOT_FOUND,
        lambda: typed.call("RemoveCertificate", apb.RemoveCertificateRequest(name="nobody")),
        "no certificate named 'nobody'",
    )
    _expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: typed.call("RemoveCertificate", apb.RemoveCertificateRequest(name="a/b")),
        "invalid certificate name",
    )
    _expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: typed.call("RemoveCertificate", apb.RemoveCertificateRequest(name=node.name)),
        "restart",
    )
    removed = typed.call("RemoveCertificate", apb.RemoveCertificateRequest(name="Partner CA"))
    assert removed.certificate.name == "Partner CA"

    # A non-super user may do none of it.
    permission = {"super_user": False, "dev": {"tables": {}}}
    admin.ok({"operation": "add_role", "role": "reader", "permission": permission})
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw-ann", "role": "reader"})
    ann = node.admin("ann", "pw-ann")
    for operation in ("list_certificates", "remove_certificate", "add_certificate"):
        result, code = ann.execute({"operation": operation, "name": "partner"})
        assert code == PERMISSION_DENIED and "super user" in result["reason"]
    _expect_code(
        grpc.StatusCode.PERMISSION_DENIED,
        lambda: ann.call("ListCertificates", apb.ListCertificatesRequest()),
        "super user",
    )

    # Execute remove: the row and the key file go.
    result, code = admin.execute({"operation": "remove_certificate", "name": "nobody"})
    assert code == NOT_FOUND and "no certificate named" in result["error"]
    assert admin.ok({"operation": "remove_certificate", "name": "partner"}) == {
        "message": "Successfully removed partner"
    }
    assert admin.ok({"operation": "list_certificates"}) == before
    assert not key_file.exists()


def test_certificate_rows_replicate(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, services=ALL, start=False)
    authority = certs.create_authority("Cluster-CA")
    for node in cluster:
        files = certs.ensure_node_files(node.root / "own-tls", authority, node.name)
        node.update_config(
            {
                "tls": {
                    "certificate": str(files.certificate),
                    "privateKey": str(files.private_key),
                    "certificateAuthority": str(files.certificate_authority),
                }
            }
        )
    cluster.start()
    a, b = cluster[0], cluster[1]
    everyone = sorted([a.name, b.name, "Cluster-CA"])

    admins = {node.name: node.admin() for node in cluster}

    def names(node: Node) -> list[str]:
        listed = admins[node.name].ok({"operation": "list_certificates"})
        return sorted(r["name"] for r in listed)

    def has_everyone(node: Node) -> bool:
        return names(node) == everyone

    for node in cluster:
        wait_for(partial(has_everyone, node), 60, f"every certificate on {node.name}")
    rows_a = _by_name(admins[a.name].ok({"operation": "list_certificates"}))
    rows_b = _by_name(admins[b.name].ok({"operation": "list_certificates"}))
    assert rows_a == rows_b
    assert rows_a[b.name]["certificate"] == (b.root / "own-tls" / "node.crt").read_text()

    extra = certs.issue_node_certificate(authority, "edge-7")
    admins[a.name].ok(
        {
            "operation": "add_certificate",
            "name": "edge-7",
            "certificate": extra.certificate_pem.decode(),
            "private_key": extra.key_pem.decode(),
        }
    )
    wait_for(lambda: "edge-7" in names(b), 30, "the added certificate on the other node")
    row = _by_name(admins[b.name].ok({"operation": "list_certificates"}))["edge-7"]
    assert row["node_name"] == a.name  # the key stays on the node it was given to
    assert not (Path(b.config["rootPath"]) / "keys" / "certificates").exists()
    admins[b.name].ok({"operation": "remove_certificate", "name": "edge-7"})
    wait_for(lambda: "edge-7" not in names(a), 30, "the removal on the other node")
