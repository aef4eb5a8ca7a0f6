"""TLS material that follows its files (services/common/tls_source.py), and what
``replication.enableRootCAs`` trusts."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from services.common.tls_source import (
    TlsError,
    TlsPaths,
    TlsSource,
    read_material,
    reloading_server_credentials,
    system_root_certificates,
)
from tests.harness.certs import CertificateAuthority, serial_of


def _subjects(pem: bytes) -> list[str]:
    return [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(pem)]


def _files(tmp_path: Path, ca: CertificateAuthority, name: str = "node") -> TlsPaths:
    files = ca.write_node_files(tmp_path, name, [name])
    return TlsPaths(
        certificate=Path(files["certificate"]),
        private_key=Path(files["privateKey"]),
        certificate_authority=Path(files["certificateAuthority"]),
    )


def _rotate(paths: TlsPaths, key: bytes, certificate: bytes) -> None:
    paths.certificate.write_bytes(certificate)
    paths.private_key.write_bytes(key)


def test_unchanged_files_give_the_same_material(tmp_path: Path) -> None:
    paths = _files(tmp_path, CertificateAuthority.create())
    source = TlsSource(paths)
    first = source.current()
    assert source.current() is first and source.generation == 1
    assert first.trusted == paths.certificate_authority.read_bytes()  # type: ignore[union-attr]


def test_new_files_are_used_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = CertificateAuthority.create()
    paths = _files(tmp_path, ca)
    source = TlsSource(paths)
    old = serial_of(source.current().certificate)
    key, certificate = ca.issue("node", ["node"])
    _rotate(paths, key, certificate)
    with caplog.at_level(logging.INFO, "shoal.tls"):
        material = source.current()
    assert serial_of(material.certificate) == serial_of(certificate) != old
    assert source.generation == 2 and source.current() is material
    assert f"now using the certificate with serial {serial_of(certificate)} (was {old})" in (
        caplog.text
    )


def test_a_half_done_rotation_keeps_the_last_good_material(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = CertificateAuthority.create()
    paths = _files(tmp_path, ca)
    source = TlsSource(paths)
    good = source.current()
    key, certificate = ca.issue("node", ["node"])
    paths.certificate.write_bytes(certificate)  # the key is not replaced yet
    with caplog.at_level(logging.WARNING, "shoal.tls"):
        assert source.current() is good
        assert source.current() is good
    assert caplog.text.count("does not belong to the certificate") == 1  # once per change
    assert f"still using the certificate with serial {serial_of(good.certificate)}" in (caplog.text)
    paths.private_key.write_bytes(key)
    assert serial_of(source.current().certificate) == serial_of(certificate)

    caplog.clear()
    paths.certificate_authority.unlink()  # type: ignore[union-attr]
    with caplog.at_level(logging.WARNING, "shoal.tls"):
        kept = source.current()
    assert serial_of(kept.certificate) == serial_of(certificate)
    assert "tls.certificateAuthority" in caplog.text and "cannot be read" in caplog.text
    paths.certificate_authority.write_bytes(b"junk")  # type: ignore[union-attr]
    assert source.current() is kept


def test_unusable_files_fail_at_start(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    paths = _files(tmp_path, ca)
    paths.private_key.write_bytes(ca.issue("other", ["other"])[0])
    with pytest.raises(TlsError, match=r"tls.privateKey .* does not belong to the certificate"):
        TlsSource(paths)
    paths.certificate.write_bytes(b"not a certificate")
    with pytest.raises(TlsError, match=r"tls.certificate .* is not a PEM certificate"):
        read_material(paths)
    paths.certificate.unlink()
    with pytest.raises(TlsError, match=r"tls.certificate .* cannot be read"):
        read_material(paths)


def test_root_cas_add_the_system_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.create("Cluster CA")
    public = [CertificateAuthority.create(f"Public Root {i}") for i in range(3)]
    bundle = tmp_path / "bundle.pem"
    # A system bundle as distributions ship it: comments, and a block that does not parse.
    bundle.write_bytes(
        b"# Public Root 0\n"
        + public[0].pem
        + b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n"
        + b"\n".join(p.pem for p in public[1:])
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    paths = _files(tmp_path / "node", ca)
    without = read_material(paths)
    assert _subjects(without.trusted) == ["CN=Cluster CA"]
    with_roots = TlsSource(TlsPaths(**{**paths.__dict__, "root_cas": True})).current()
    assert _subjects(with_roots.trusted) == [
        "CN=Cluster CA",
        "CN=Public Root 0",
        "CN=Public Root 1",
        "CN=Public Root 2",
    ]
    # Without tls.certificateAuthority, the roots alone (not the node's certificate).
    alone = read_material(TlsPaths(paths.certificate, paths.private_key, None, root_cas=True))
    assert _subjects(alone.trusted) == [f"CN=Public Root {i}" for i in range(3)]
    bundle.write_bytes(b"# nothing here\n")
    with pytest.raises(TlsError, match="holds no certificate"):
        system_root_certificates()


def test_the_real_system_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every certificate the system's OpenSSL trusts by default is in the bundle."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    cafile = ssl.get_default_verify_paths().cafile
    if not cafile or not os.path.isfile(cafile):
        pytest.skip("this system has no CA bundle file")
    end = "-----END CERTIFICATE-----"
    blocks = system_root_certificates().decode().split(end)[:-1]
    roots = {ssl.PEM_cert_to_DER_cert(block.strip() + "\n" + end + "\n") for block in blocks}
    defaults = set(ssl.create_default_context().get_ca_certs(binary_form=True))
    assert defaults and defaults <= roots


async def test_a_server_serves_new_files_to_new_connections(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    paths = _files(tmp_path / "server", ca, "127.0.0.1")
    client = ca.write_node_files(tmp_path / "client", "client", ["client"])
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", reloading_server_credentials(TlsSource(paths)))
    await server.start()

    def served_serial() -> str:
        context = ssl.create_default_context(cadata=ca.pem.decode())
        context.set_alpn_protocols(["h2"])
        context.load_cert_chain(client["certificate"], client["privateKey"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return format(x509.load_der_x509_certificate(der).serial_number, "X")

    try:
        assert await asyncio.to_thread(served_serial) == serial_of(paths.certificate.read_bytes())
        key, certificate = ca.issue("127.0.0.1", ["127.0.0.1"])
        _rotate(paths, key, certificate)
        assert await asyncio.to_thread(served_serial) == serial_of(certificate)
    finally:
        await server.stop(0)
