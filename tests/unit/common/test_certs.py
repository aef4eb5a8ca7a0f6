"""Certificates made by services/common/certs.py: what they say, and the files they go to."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common import certificate_table, certs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_authority_is_a_bounded_self_signed_ca() -> None:
    authority = certs.create_authority("Test-CA", valid_days=30)
    cert = x509.load_pem_x509_certificate(authority.certificate_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    cert.verify_directly_issued_by(cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=6)
    info = certs.read_details(authority.certificate_pem)
    assert info.is_authority and info.is_self_signed
    assert info.subject == info.issuer == "CN=Test-CA"
    assert info.uses == ("keyCertSign", "cRLSign")
    assert certs.key_matches(certs.load_private_key(authority.key_pem), cert)


def test_node_certificate_names_the_node_and_is_not_a_ca() -> None:
    authority = certs.create_authority("Test-CA")
    ca = x509.load_pem_x509_certificate(authority.certificate_pem)
    pair = certs.issue_node_certificate(authority, "server-two", ["10.0.0.2", "server-two"])
    cert = x509.load_pem_x509_certificate(pair.certificate_pem)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "server-two"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["server-two"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.2")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(
        days=certs.NODE_VALID_DAYS, minutes=6
    )
    key = certs.load_private_key(pair.key_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert certs.key_matches(key, cert)

    info = certs.read_details(pair.certificate_pem)
    assert info.common_name == "server-two"
    assert info.subject == "CN=server-two" and info.issuer == "CN=Test-CA"
    assert info.subject_alternative_names == ("DNS:server-two", "IP:10.0.0.2")
    assert info.serial_number == format(cert.serial_number, "X")
    assert info.serial_number == info.serial_number.upper()
    assert info.not_before == cert.not_valid_before_utc
    assert info.not_after == cert.not_valid_after_utc
    assert info.uses == ("serverAuth", "clientAuth")
    assert not info.is_authority and not info.is_self_signed


def test_an_ip_named_node_gets_an_ip_san_and_serials_differ() -> None:
    authority = certs.create_authority("Test-CA")
    first = certs.read_details(certs.issue_node_certificate(authority, "127.0.0.7").certificate_pem)
    second = certs.read_details(
        certs.issue_node_certificate(authority, "127.0.0.7").certificate_pem
    )
    assert first.subject_alternative_names == ("IP:127.0.0.7",)
    assert first.serial_number != second.serial_number


def test_node_certificate_never_outlives_its_ca() -> None:
    authority = certs.create_authority("Short-CA", valid_days=2)
    ca = certs.read_details(authority.certificate_pem)
    node = certs.read_details(certs.issue_node_certificate(authority, "n1").certificate_pem)
    assert node.not_after <= ca.not_after


def test_refusals() -> None:
    authority = certs.create_authority("Test-CA")
    other = certs.create_authority("Other-CA")
    node = certs.issue_node_certificate(authority, "n1")
    with pytest.raises(certs.CertificateError, match="not a PEM certificate"):
        certs.read_details(b"hello")
    with pytest.raises(certs.CertificateError, match="not a valid PEM certificate"):
        certs.read_details(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(certs.CertificateError, match="expected one certificate, found 2"):
        certs.read_pem_certificate(node.certificate_pem + authority.certificate_pem)
    with pytest.raises(certs.CertificateError, match="not a PEM private key"):
        certs.load_private_key(node.certificate_pem)
    with pytest.raises(certs.CertificateError, match="does not belong"):
        certs.issue_node_certificate(certs.KeyPair(other.key_pem, authority.certificate_pem), "n")
    with pytest.raises(certs.CertificateError, match="not a certificate authority"):
        certs.issue_node_certificate(node, "n2")
    with pytest.raises(certs.CertificateError, match="at least a day"):
        certs.create_authority("X", valid_days=0)
    assert not certs.key_matches(
        certs.load_private_key(other.key_pem), certs.read_pem_certificate(node.certificate_pem)
    )


def test_files_keys_are_private_and_written_atomically(tmp_path: Path) -> None:
    authority = certs.ensure_authority(tmp_path / "ca", "Test-CA")
    assert _mode(tmp_path / "ca") == 0o700
    assert _mode(tmp_path / "ca" / certs.CA_KEY_FILE) == 0o600
    assert _mode(tmp_path / "ca" / certs.CA_CERT_FILE) == 0o644
    again = certs.ensure_authority(tmp_path / "ca", "ignored")
    assert again == authority  # reused, not replaced

    files = certs.ensure_node_files(tmp_path / "node" / "keys", authority, "n1", ["n1.example"])
    assert _mode(files.private_key) == 0o600 and _mode(files.private_key.parent) == 0o700
    assert _mode(files.certificate) == 0o644
    assert files.certificate_authority.read_bytes() == authority.certificate_pem
    first = files.certificate.read_bytes()
    kept = certs.ensure_node_files(tmp_path / "node" / "keys", authority, "n1")
    assert kept.certificate.read_bytes() == first
    certs.ensure_node_files(tmp_path / "node" / "keys", authority, "n1", replace=True)
    assert files.certificate.read_bytes() != first
    key = certs.load_private_key(files.private_key.read_bytes())
    assert certs.key_matches(key, certs.read_pem_certificate(files.certificate.read_bytes()))
    # no temporary files are left behind
    assert sorted(p.name for p in files.private_key.parent.iterdir()) == [
        "ca.crt",
        "node.crt",
        "node.key",
    ]


def test_a_half_made_ca_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / certs.CA_CERT_FILE).write_bytes(certs.create_authority("X").certificate_pem)
    with pytest.raises(certs.CertificateError, match="only one of"):
        certs.ensure_authority(tmp_path / "ca", "X")


def test_table_row_has_the_details_and_no_key() -> None:
    authority = certs.create_authority("Test-CA")
    pair = certs.issue_node_certificate(authority, "n1", ["10.1.2.3"])
    info = certs.read_details(pair.certificate_pem)
    row = certificate_table.to_row("n1", pair.certificate_pem.decode(), info, "keys/node.key", "n1")
    assert row["name"] == "n1" and row["certificate"] == pair.certificate_pem.decode()
    assert row["subject_alternative_names"] == ["DNS:n1", "IP:10.1.2.3"]
    assert row["serial_number"] == info.serial_number
    assert row["valid_from"] == info.not_before.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert row["details"]["subject_alt_name"] == "DNS:n1, IP:10.1.2.3"
    assert row["is_authority"] is False and row["uses"] == ["serverAuth", "clientAuth"]
    assert b"PRIVATE KEY" not in str(row).encode()


@pytest.mark.parametrize(
    "name,valid",
    [
        ("n1", True),
        ("Shoal Test CA", True),
        ("127.0.0.1", True),
        ("fe80::1", True),
        ("", False),
        ("../etc", False),
        ("a/b", False),
        ("a..b", False),
        (".hidden", False),
        ("trailing ", False),
        ("x" * 201, False),
    ],
)
def test_certificate_names(name: str, valid: bool) -> None:
    assert certificate_table.valid_name(name) is valid
