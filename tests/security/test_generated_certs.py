"""Certificates a node generates on its first start when it has no ``tls.*``: made once by
whichever of its processes gets there first, reused later, recorded in
``system.hdb_certificate``, and never found in the data, a backup or a log. Insecure mode
(``replication.securePort: null``) generates nothing."""

from __future__ import annotations

import base64
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from services.common import certs
from tests.conftest import MakeNode
from tests.harness.client import expect_error
from tests.harness.node import REPO, Node

ALL = ("storage", "replicator", "admin")
GENERATED = {"replication": {"securePort": 9933}}  # no tls.*: the node makes its own
FILES = ("ca.key", "ca.crt", "node.key", "node.crt")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _start_together(node: Node) -> None:
    """Start the node's three processes at the same moment (as `shoal node start` or an
    orchestrator may), then wait until each serves."""
    for service in ALL:
        node.start_service(service, wait=False)
    for service in ALL:
        node.wait_ready(service)


def _key_needles(pem: bytes) -> list[bytes]:
    """Byte strings that show only if a private key leaked: its PEM, its DER, its secret
    scalar raw and in base64 at each alignment (a PEM line of an EC key may also hold part
    of the public key, which the certificate carries, so lines are not used)."""
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secret = key.private_numbers().private_value.to_bytes(32, "big")
    encoded = [base64.b64encode(bytes(pad) + secret)[4:-4] for pad in range(3)]
    return [pem.strip(), der, secret, *encoded]


def _read(files: list[Path]) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in files if path.is_file()}


def _holding(contents: dict[str, bytes], needles: list[bytes]) -> list[str]:
    return [
        f"{name} holds {needle[:16]!r}..."
        for name, data in contents.items()
        for needle in needles
        if needle in data
    ]


def test_processes_starting_together_make_one_ca_and_certificate(make_node: MakeNode) -> None:
    node = make_node(start=False, services=ALL, config=GENERATED)
    _start_together(node)
    keys = node.keys_path
    assert _mode(keys) == 0o700
    for name in FILES:
        assert (keys / name).exists(), f"{name} was not generated"
    assert _mode(keys / "ca.key") == _mode(keys / "node.key") == 0o600
    assert list(keys.glob("*.tmp")) == []  # written atomically

    ca, cert = _load(keys / "ca.crt"), _load(keys / "node.crt")
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == node.name
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(node.name)]
    assert sans.get_values_for_type(x509.DNSName) == []
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    key = certs.load_private_key((keys / "node.key").read_bytes())
    assert certs.key_matches(key, cert)

    # Storage recorded them like configured ones; the CA key stays a file.
    recorded = node.internal_client().all_records("system", "hdb_certificate", "name")
    rows = {row["name"]: row for row in recorded}
    mine = rows[node.name]
    assert mine["certificate"] == (keys / "node.crt").read_text()
    assert mine["private_key_name"] == "keys/node.key" and mine["node_name"] == node.name
    authority = rows[f"{certs.GENERATED_CA_PREFIX}{node.name}"]
    assert authority["certificate"] == (keys / "ca.crt").read_text()
    assert authority["is_authority"] is True

    # Every later start reuses the files.
    before = {name: (keys / name).read_bytes() for name in FILES}
    node.stop()
    _start_together(node)
    assert {name: (keys / name).read_bytes() for name in FILES} == before
    assert node.client().call("DescribeAll", pb.DescribeAllRequest()) is not None


def test_concurrent_calls_generate_once(tmp_path: Path) -> None:
    """Six processes racing on one empty folder all end up with the same files."""
    keys = tmp_path / "keys"
    script = (
        "import sys; from pathlib import Path; from services.common import certs; "
        "files = certs.ensure_generated_files(Path(sys.argv[1]), 'server-one'); "
        "print(certs.read_details(files.certificate.read_bytes()).serial_number)"
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(keys)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(6)
    ]
    outputs = [racer.communicate(timeout=60) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in outputs]
    serials = {out.strip() for out, _ in outputs}
    assert serials == {certs.read_details((keys / "node.crt").read_bytes()).serial_number.encode()}
    cert = _load(keys / "node.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["server-one"]  # a name: a DNS SAN

    # A new node name: the node's CA issues a certificate naming it; the CA is kept.
    ca_before = (keys / "ca.crt").read_bytes()
    files = certs.ensure_generated_files(keys, "10.0.0.7")
    renamed = _load(files.certificate)
    sans = renamed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert (keys / "ca.crt").read_bytes() == ca_before
    renamed.verify_directly_issued_by(_load(keys / "ca.crt"))


def test_private_keys_never_reach_the_data_a_backup_or_a_log(make_node: MakeNode) -> None:
    node = make_node(services=ALL, config=GENERATED)
    client = node.client()
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": i, "name": f"dog{i}"} for i in range(50)])
    saved = node.admin().ok({"operation": "get_backup", "database": "dev", "name": "dev"})
    root = Path(node.config["rootPath"])
    backups = sorted((root / "backups").glob("*.tar.gz"))
    assert saved["file"] == "backups/dev.tar.gz" and len(backups) == 1
    root_db = root / "database"
    public = (node.keys_path / "node.crt").read_bytes().splitlines()[1]
    live = _read(list(root_db.rglob("*")))  # the write-ahead log is there while it runs
    # The scan sees what the files hold: the certificate (public) is in the write-ahead log.
    assert _holding(live, [public]), "the scan does not see the recorded certificate"
    node.stop()  # flush and close RocksDB; scan what is left too

    needles = [
        needle
        for name in ("ca.key", "node.key")
        for needle in _key_needles((node.keys_path / name).read_bytes())
    ]
    database = _read(list(root_db.rglob("*")))
    assert database, "no RocksDB files to scan"
    unpacked: dict[str, bytes] = {}
    for archive in backups:
        target = archive.parent / (archive.name + ".unpacked")
        target.mkdir()
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(target)], check=True)
        unpacked |= _read(list(target.rglob("*")))
    assert unpacked, "the backups hold no files"
    logs = _read([node.log_path(service) for service in ALL])
    every = live | database | _read(backups) | unpacked | logs
    assert _holding(every, needles) == []


def test_insecure_mode_generates_nothing_and_stays_plaintext(make_node: MakeNode) -> None:
    node = make_node(services=ALL, config={"replication": {"securePort": None}})
    assert not any((node.keys_path / name).exists() for name in FILES)
    assert not node.serves_tls("storage")
    with grpc.insecure_channel(node.storage_address) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        expect_error(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.DescribeAll(pb.DescribeAllRequest(), timeout=10),
        )
    assert node.admin().ok({"operation": "list_certificates"}) == []


@pytest.mark.parametrize("given", ["certificate", "privateKey"])
def test_half_a_key_pair_is_a_config_error(make_node: MakeNode, given: str) -> None:
    node = make_node(start=False, config={"tls": {given: "keys/node.pem"}})
    node.start_service("storage", wait=False)
    process = node.processes["storage"]
    assert process.wait(timeout=30) == 2
    missing = "privateKey" if given == "certificate" else "certificate"
    assert f"tls.{missing}: missing" in node.log_path("storage").read_text()
