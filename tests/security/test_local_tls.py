"""`shoal local up` (make run) and `shoal certs init` make working TLS material."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from services.cli import app
from services.common import certs
from services.common.config import load_config
from services.local import local_cluster_configs, local_username, write_cli_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_local_cluster_configs_use_tls_with_certificates_of_one_ca(tmp_path: Path) -> None:
    paths = local_cluster_configs(tmp_path, 3)
    ca_pem = (tmp_path / "ca" / certs.CA_CERT_FILE).read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert _mode(tmp_path / "ca" / certs.CA_KEY_FILE) == 0o600
    for i, path in enumerate(paths, start=1):
        config = load_config(path)
        assert config.node_name == f"127.0.0.{i}"
        tls = config.tls
        assert tls.certificate is not None and tls.private_key is not None
        assert tls.certificate_authority is not None
        root = path.parent
        cert = x509.load_pem_x509_certificate((root / tls.certificate).read_bytes())
        cert.verify_directly_issued_by(ca)  # signed by the cluster's CA
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(f"127.0.0.{i}")]
        assert certs.read_details((root / tls.certificate).read_bytes()).common_name == (
            f"127.0.0.{i}"
        )
        assert (root / tls.certificate_authority).read_bytes() == ca_pem
        key = certs.load_private_key((root / tls.private_key).read_bytes())
        assert certs.key_matches(key, cert)
        assert _mode(root / tls.private_key) == 0o600
        assert not tls.certificate.is_absolute()  # the data folder can move

    before = [p.read_text() for p in paths]
    node1_cert = (tmp_path / "node1" / "keys" / "node.crt").read_bytes()
    again = local_cluster_configs(tmp_path, 4)  # existing nodes keep theirs; a new one joins
    assert [p.read_text() for p in again[:3]] == before
    assert (tmp_path / "node1" / "keys" / "node.crt").read_bytes() == node1_cert
    node4 = x509.load_pem_x509_certificate((tmp_path / "node4" / "keys" / "node.crt").read_bytes())
    node4.verify_directly_issued_by(ca)


def test_the_cli_config_names_the_super_user_the_nodes_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`shoal local up` writes cli.yaml with the user storage creates: the configured
    admin.username, or $SHOAL_ADMIN_USERNAME when set (which storage's bootstrap uses)."""
    [path] = local_cluster_configs(tmp_path, 1, tls=False)
    config = load_config(path)
    monkeypatch.delenv("SHOAL_ADMIN_USERNAME", raising=False)
    assert local_username(config) == "admin"
    monkeypatch.setenv("SHOAL_ADMIN_USERNAME", "ops")
    assert local_username(config) == "ops"
    written = write_cli_config(tmp_path, "pw", tls=False, username=local_username(config))
    assert yaml.safe_load(written.read_text())["username"] == "ops"


def test_insecure_local_cluster_has_no_tls(tmp_path: Path) -> None:
    [path] = local_cluster_configs(tmp_path, 1, tls=False)
    written = yaml.safe_load(path.read_text())
    assert "tls" not in written
    assert written["replication"]["securePort"] is None  # insecure mode: nothing generated
    config = load_config(path)
    assert config.tls.certificate is None and config.replication.secure_port is None
    assert not (tmp_path / "ca").exists()


def test_certs_init_makes_a_ca_once_and_node_certificates(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir = tmp_path / "ca"
    first = runner.invoke(
        app,
        ["certs", "init", "--data", str(tmp_path / "a"), "--name", "server-a",
         "--ca-dir", str(ca_dir), "--san", "10.0.0.1"],
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    section = yaml.safe_load(first.stdout)
    assert section == {
        "tls": {
            "certificate": "keys/node.crt",
            "privateKey": "keys/node.key",
            "certificateAuthority": "keys/ca.crt",
        }
    }
    ca_pem = (ca_dir / certs.CA_CERT_FILE).read_bytes()
    second = runner.invoke(
        app,
        ["certs", "init", "--data", str(tmp_path / "b"), "--name", "server-b",
         "--ca-dir", str(ca_dir)],
    )  # fmt: skip
    assert second.exit_code == 0, second.output
    assert (ca_dir / certs.CA_CERT_FILE).read_bytes() == ca_pem  # reused
    ca = x509.load_pem_x509_certificate(ca_pem)
    a = certs.read_details((tmp_path / "a" / "keys" / "node.crt").read_bytes())
    assert a.subject_alternative_names == ("DNS:server-a", "IP:10.0.0.1")
    for node in ("a", "b"):
        cert = x509.load_pem_x509_certificate((tmp_path / node / "keys" / "node.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert _mode(tmp_path / node / "keys" / "node.key") == 0o600

    again = runner.invoke(
        app, ["certs", "init", "--data", str(tmp_path / "a"), "--name", "server-a"]
    )
    assert again.exit_code == 2 and "--force" in again.output
