"""Client certificates on a client port (``storage.mtls``, ``operationsApi.mtls``).

With mtls on, the port's TLS layer requires a client certificate that chains to the
node's trusted CAs (``tls.certificateAuthority``, plus the system bundle with
``replication.enableRootCAs``: the replication port's trust); a connection without one
fails the handshake. Then, for every call:

* the certificate must not be revoked by a CRL of ``tls.crl`` (the files the replication
  port checks, with ``tls.crlFailClosed``); a revoked one is UNAUTHENTICATED;
* with ``user: Common Name``, ``certificate_user`` answers the certificate's common name:
  the user a call without an ``authorization`` header is authenticated as (the server's
  authenticator checks that the user exists and is active). With ``user: null`` it
  answers None: the certificate only gates the connection.

An ``authorization`` header always wins over the certificate.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509

from services.common.config import ShoalConfig
from services.common.errors import Unauthenticated
from services.common.revocation import CrlFiles, CrlUnavailable, certificate_serial
from services.common.tls import TlsMaterial
from services.common.tls_source import TlsSource

log = logging.getLogger("shoal.tls")

AuthContext = Mapping[str, Iterable[bytes]]
_PARSED_CERTIFICATES = 256  # certificates kept parsed (one per client, usually)


def mtls_key(service: str) -> str:
    """The configuration key of ``service``'s client certificates."""
    return "storage.mtls" if service == "storage" else "operationsApi.mtls"


class ClientCertificates:
    """What a client port does with the verified client certificate of each call."""

    def __init__(
        self,
        service: str,
        user_from_common_name: bool,
        tls: TlsSource,
        crl_paths: tuple[Path, ...] = (),
        crl_fail_closed: bool = True,
    ) -> None:
        self.service = service
        self.user_from_common_name = user_from_common_name
        self.tls = tls
        self.crl_paths = crl_paths
        self.crl_fail_closed = crl_fail_closed
        self._crls = CrlFiles(crl_paths, ())
        self._crls_trust: TlsMaterial | None = None
        self._parsed: OrderedDict[bytes, x509.Certificate] = OrderedDict()
        self._last_crl_problem = ""

    @classmethod
    def from_config(
        cls, config: ShoalConfig, service: str, tls: TlsSource | None
    ) -> ClientCertificates | None:
        """The policy of ``service``'s port (``storage`` or ``admin``); None when its mtls
        is off or the port is plaintext."""
        port = config.storage if service == "storage" else config.operations_api
        if not port.mtls.enabled or tls is None:
            return None
        crls = tuple(p if p.is_absolute() else config.root_path / p for p in config.tls.crl)
        return cls(service, port.mtls.user_from_common_name, tls, crls, config.tls.crl_fail_closed)

    def certificate_user(self, auth_context: AuthContext) -> str | None:
        """The user the call's client certificate names (None with ``user: null``, or
        when the connection has no certificate); Unauthenticated when the certificate is
        revoked or names no user."""
        pems = list(auth_context.get("x509_pem_cert", ()))
        if not pems:
            return None
        certificate = self._parse(pems[0])
        self._check_revocation(certificate)
        if not self.user_from_common_name:
            return None
        names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = names[0].value if names else ""
        if not isinstance(name, str) or not name:
            raise Unauthenticated(
                f"the client certificate (serial {certificate_serial(certificate)}) has no"
                " common name, so it names no user: send 'authorization: Basic"
                f" <base64 user:password>' ({mtls_key(self.service)}.user is Common Name)"
            )
        return name

    def _parse(self, pem: bytes) -> x509.Certificate:
        certificate = self._parsed.get(pem)
        if certificate is None:
            certificate = x509.load_pem_x509_certificate(pem)
            self._parsed[pem] = certificate
            while len(self._parsed) > _PARSED_CERTIFICATES:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(pem)
        return certificate

    def _crl_files(self) -> CrlFiles:
        material = self.tls.current()
        if material is not self._crls_trust:
            self._crls = CrlFiles.from_pem(self.crl_paths, material.trusted)
            self._crls_trust = material
        return self._crls

    def _check_revocation(self, certificate: x509.Certificate) -> None:
        if not self.crl_paths:
            return
        serial = certificate_serial(certificate)
        try:
            by_issuer = self._crl_files().revoked()
        except CrlUnavailable as exc:
            if self.crl_fail_closed:
                raise Unauthenticated(
                    f"cannot check whether the client certificate (serial {serial}) is"
                    f" revoked: {exc} (tls.crlFailClosed is true)"
                ) from exc
            if str(exc) != self._last_crl_problem:
                log.warning("%s; accepting client certificates anyway", exc)
            self._last_crl_problem = str(exc)
            return
        self._last_crl_problem = ""
        if serial in by_issuer.get(certificate.issuer, frozenset()):
            raise Unauthenticated(
                f"the client certificate (serial {serial}) is revoked by the CRL of"
                f" {certificate.issuer.rfc4514_string()} (tls.crl)"
            )
