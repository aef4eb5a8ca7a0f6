"""Who may stay on the other end of a TLS connection: revocation checks of a peer's
certificate, on both sides of the replication port.

The TLS layer (gRPC) has already refused a peer with no certificate, one not signed by a
trusted CA, and an expired or not-yet-valid one; the handshake checks that the name in the
Hello is one of the certificate's names. What is left is revocation, done here:

* a serial listed in ``replication.routes[].revokedCertificates`` or in the
  ``revoked_certificates`` column of any row of ``system.hdb_nodes`` is refused, whichever
  peer presents it (a serial names one certificate of the CA, not a node);
* a certificate listed in one of the ``tls.crl`` files (of its issuer) is refused; when a
  CRL cannot be used, every peer is refused (``tls.crlFailClosed``, the default) or a
  warning is logged.

The listener checks the certificate of the call (``x509_pem_cert`` of the auth context).
The dialer cannot see the certificate of its gRPC connection, so it opens one TLS
connection of its own to the same address first, with the same trust and client
certificate, and checks the certificate presented there; a failure there also gives a
precise reason (a certificate without the dialed name, an unknown CA) where gRPC only
reports that it cannot connect.

The TLS material comes from the node's ``TlsSource``: when the certificate files change,
the next pre-check presents the new certificate and trusts the new authorities, and CRLs
are verified against the new authorities.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.config import Route, ShoalConfig
from services.common.revocation import (
    CrlFiles,
    CrlUnavailable,
    certificate_serial,
    normalize_serial,
)
from services.common.tls import TlsMaterial
from services.common.tls_source import TlsSource
from services.replicator.handshake import Refused
from services.replicator.peer import ConnectionLost

log = logging.getLogger("shoal.replicator")

ACCEPT_CHECK_S = 5.0  # how long the pre-check waits for the server's first answer
# An HTTP/2 client's first bytes: the connection preface, then an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


class CertificateRefused(Refused):
    """This node refuses the peer's certificate (revoked, or a CRL is unusable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(rpb.GOODBYE_CODE_UNAUTHORIZED, reason)


@dataclass(frozen=True)
class PeerCertificate:
    """What the checks need of a peer's certificate."""

    serial: str  # normalized: upper-case hex
    issuer: x509.Name
    subject: str

    @classmethod
    def from_x509(cls, certificate: x509.Certificate) -> PeerCertificate:
        return cls(
            certificate_serial(certificate),
            certificate.issuer,
            certificate.subject.rfc4514_string(),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> PeerCertificate:
        return cls.from_x509(x509.load_pem_x509_certificate(pem))

    def describe(self) -> str:
        """The certificate as refusals log it: serial and subject."""
        return f"certificate serial {self.serial}, subject {self.subject}"


def revoked_serials(
    configured: Iterable[Route], rows: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """Every revoked serial, with where it is listed (for the refusal's reason)."""
    revoked: dict[str, str] = {}
    for route in configured:
        for serial in route.revoked_certificates:
            revoked.setdefault(
                normalize_serial(serial),
                f"replication.routes revokedCertificates of {route.hostname}",
            )
    for name, row in sorted(rows.items()):
        listed = row.get("revoked_certificates")
        if not isinstance(listed, list):
            continue
        for serial in listed:
            if isinstance(serial, str | int) and not isinstance(serial, bool):
                revoked.setdefault(
                    normalize_serial(serial),
                    f"revoked_certificates of {name} in system.hdb_nodes",
                )
    return revoked


class PeerCheck:
    """Revocation checks of peer certificates for one node."""

    def __init__(self, crl_paths: Iterable[Path], fail_closed: bool, tls: TlsSource | None) -> None:
        self.crl_paths = tuple(crl_paths)
        self.fail_closed = fail_closed
        self.tls = tls
        self._crls = CrlFiles(self.crl_paths, ())
        self._crls_trust: TlsMaterial | None = None
        self._client_context: ssl.SSLContext | None = None
        self._context_material: TlsMaterial | None = None
        self._last_crl_problem = ""

    @classmethod
    def from_config(cls, config: ShoalConfig, tls: TlsSource | None) -> PeerCheck:
        paths = [p if p.is_absolute() else config.root_path / p for p in config.tls.crl]
        return cls(paths, config.tls.crl_fail_closed, tls)

    @property
    def crls(self) -> CrlFiles:
        """The CRL files, checked against the authorities the node trusts now."""
        material = self.tls.current() if self.tls is not None else None
        if material is not None and material is not self._crls_trust:
            self._crls = CrlFiles.from_pem(self.crl_paths, material.trusted)
            self._crls_trust = material
        return self._crls

    def check(self, peer: str, certificate: PeerCertificate, revoked: Mapping[str, str]) -> None:
        """Refuse a certificate at a handshake (CertificateRefused with the reason)."""
        reason = self._reason(peer, certificate, revoked, at_handshake=True)
        if reason:
            raise CertificateRefused(reason)

    def revoked_reason(
        self, peer: str, certificate: PeerCertificate, revoked: Mapping[str, str]
    ) -> str:
        """Why a live session's certificate is now revoked ("" when it is not). An
        unusable CRL does not cut live sessions; it refuses their next handshake."""
        return self._reason(peer, certificate, revoked, at_handshake=False)

    def _reason(
        self,
        peer: str,
        certificate: PeerCertificate,
        revoked: Mapping[str, str],
        at_handshake: bool,
    ) -> str:
        where = revoked.get(certificate.serial)
        if where is not None:
            return f"the certificate of {peer} (serial {certificate.serial}) is revoked ({where})"
        if not self.crl_paths:
            return ""
        try:
            by_issuer = self.crls.revoked()
        except CrlUnavailable as exc:
            if not at_handshake:
                return ""
            if self.fail_closed:
                return f"refusing every peer: {exc} (tls.crlFailClosed is true)"
            if str(exc) != self._last_crl_problem:
                log.warning("%s; accepting peers anyway (tls.crlFailClosed is false)", exc)
            self._last_crl_problem = str(exc)
            return ""
        self._last_crl_problem = ""
        if certificate.serial in by_issuer.get(certificate.issuer, frozenset()):
            return (
                f"the certificate of {peer} (serial {certificate.serial}) is revoked by the"
                f" CRL of {certificate.issuer.rfc4514_string()} (tls.crl)"
            )
        return ""

    # -- the dialer's view of the server's certificate --------------------------------------

    async def server_certificate(self, address: str, timeout_s: float) -> PeerCertificate:
        """The certificate the TLS server at ``host:port`` presents to this node (verified
        against the trusted CAs and the dialed name); ConnectionLost when it cannot be had,
        CertificateRefused when the TLS layer refuses it."""
        host, port = split_address(address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=self._context(), server_hostname=host),
                timeout=timeout_s,
            )
        except ssl.SSLCertVerificationError as exc:
            raise CertificateRefused(
                f"the server at {address} presents a certificate this node does not accept:"
                f" {exc.verify_message}"
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to {address}: {exc}") from exc
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            mine = x509.load_pem_x509_certificates(self._context_material_pem())[0]
            await _server_accepts_us(reader, writer, address, min(timeout_s, ACCEPT_CHECK_S), mine)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1)
        if not der:
            raise ConnectionLost(f"the server at {address} presented no certificate")
        return PeerCertificate.from_x509(x509.load_der_x509_certificate(der))

    def _context_material_pem(self) -> bytes:
        """The certificate the client context presents (PEM)."""
        assert self._context_material is not None
        return self._context_material.certificate

    def _context(self) -> ssl.SSLContext:
        """A client context with the current material (made again when it changes)."""
        if self.tls is None:
            raise ConnectionLost("this node has no TLS material")
        material = self.tls.current()
        if self._client_context is None or material is not self._context_material:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cadata=material.trusted.decode()
            )
            context.set_alpn_protocols(["h2"])
            with _files(material.certificate, material.private_key) as (cert, key):
                context.load_cert_chain(cert, key)
            self._client_context = context
            self._context_material = material
        return self._client_context


async def _server_accepts_us(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    address: str,
    timeout_s: float,
    mine: x509.Certificate,
) -> None:
    """CertificateRefused when the server refuses this node's client certificate.

    With TLS 1.3 the client's side of the handshake ends before the server has checked
    the client's certificate, and a gRPC server that refuses it just closes the
    connection. So say what a gRPC client says first (the HTTP/2 preface and empty
    settings) and read: a server that accepted us answers with its settings, one that
    refused us closes. Silence or an error tell nothing; the dial goes on."""
    writer.write(_HTTP2_PREFACE)
    try:
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1), timeout=timeout_s)
    except ssl.SSLError as exc:
        answer, detail = b"", f" ({exc.reason or exc})"
    except ConnectionError:
        answer, detail = b"", ""
    except (OSError, TimeoutError):
        return
    else:
        detail = ""
    if not answer:
        raise CertificateRefused(
            f"the server at {address} closed the connection after the TLS handshake{detail}:"
            " it does not accept this node's certificate (serial"
            f" {certificate_serial(mine)}, issued by {mine.issuer.rfc4514_string()})"
        )


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def _files(certificate: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    """The PEM bytes as files for ``load_cert_chain``, which reads only files: anonymous
    memory files where the system has them, else a private temporary directory."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("shoal-tls"), os.memfd_create("shoal-tls")]
        try:
            for fd, data in zip(fds, (certificate, key), strict=True):
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as directory:
        paths = (Path(directory) / "node.crt", Path(directory) / "node.key")
        for path, data in zip(paths, (certificate, key), strict=True):
            path.touch(mode=0o600)
            path.write_bytes(data)
        yield str(paths[0]), str(paths[1])
