"""TLS material of a node (``tls.*`` in shoal.yaml) and gRPC credentials built from it.

Paths in the config are relative to ``rootPath``. The replication secure port requires
client certificates signed by a trusted certificate authority (mutual TLS); a peer's
identity is the common name and subject alternative names of its certificate. Trusted
are ``tls.certificateAuthority`` and, with ``replication.enableRootCAs``, the system CA
bundle (``TlsMaterial.trusted``). ``tls_source.py`` reads and checks the files, and
re-reads them when they change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common import certs
from services.common.config import ShoalConfig


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of a node's key, certificate chain and trusted CA certificates."""

    private_key: bytes
    certificate: bytes
    certificate_authority: bytes  # tls.certificateAuthority (or the certificate itself)
    root_certificates: bytes = b""  # the system CA bundle, with replication.enableRootCAs

    @property
    def trusted(self) -> bytes:
        """Every CA certificate a peer's certificate may chain to (PEM)."""
        if not self.root_certificates:
            return self.certificate_authority
        if not self.certificate_authority:
            return self.root_certificates
        return self.certificate_authority.rstrip(b"\n") + b"\n" + self.root_certificates


def _resolve(config: ShoalConfig, path: Path) -> Path:
    return path if path.is_absolute() else config.root_path / path


def load_tls(config: ShoalConfig) -> TlsMaterial | None:
    """The node's TLS material: the ``tls.*`` files, or the ones the node generated (see
    ``with_tls_files``); None in insecure mode."""
    config = with_tls_files(config)
    tls = config.tls
    if tls.certificate is None or tls.private_key is None:
        return None
    ca_path = tls.certificate_authority or tls.certificate
    return TlsMaterial(
        private_key=_resolve(config, tls.private_key).read_bytes(),
        certificate=_resolve(config, tls.certificate).read_bytes(),
        certificate_authority=_resolve(config, ca_path).read_bytes(),
    )


def mutual_channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    """Channel credentials presenting this node's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=material.trusted,
        private_key=material.private_key,
        certificate_chain=material.certificate,
    )


def peer_names(auth_context: Mapping[str, Iterable[bytes]]) -> set[str]:
    """Names a TLS peer's certificate vouches for (common name and SANs)."""
    names: set[str] = set()
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, []):
            names.add(value.decode(errors="replace"))
    return names


def with_tls_files(config: ShoalConfig) -> ShoalConfig:
    """``config`` with ``tls.*`` naming the node's TLS files.

    With ``tls.certificate`` or ``tls.privateKey`` set, or in insecure mode
    (``replication.securePort: null``), ``config`` is returned as it is. Otherwise the node
    uses its own CA and certificate under ``<rootPath>/keys/``, generated on its first start
    (``certs.ensure_generated_files``: every process of the node may call this at once)
    and named here relative to ``rootPath``, so everything that reads ``tls.*`` (the
    certificate table, the admin's certificate operations) sees them.
    """
    tls = config.tls
    if tls.certificate is not None or tls.private_key is not None:
        return config
    if config.replication.secure_port is None:
        return config
    files = certs.ensure_generated_files(config.keys_path, config.node_name)
    generated = dataclasses.replace(
        tls,
        certificate=files.certificate.relative_to(config.root_path),
        private_key=files.private_key.relative_to(config.root_path),
        certificate_authority=files.certificate_authority.relative_to(config.root_path),
    )
    return dataclasses.replace(config, tls=generated)


def verifying_channel_credentials(certificate_authority: bytes) -> grpc.ChannelCredentials:
    """Channel credentials that accept only a server whose certificate chains to
    ``certificate_authority`` (PEM) and names the host dialed; no client certificate."""
    return grpc.ssl_channel_credentials(root_certificates=certificate_authority)
