"""TLS material of a node (``tls.*`` in shoal.yaml) and gRPC credentials built from it.

Paths in the config are relative to ``rootPath``. The replication secure port requires
client certificates signed by the node's certificate authority (mutual TLS); a peer's
identity is the common name and subject alternative names of its certificate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import ShoalConfig


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of a node's key, certificate chain and trusted CA certificates."""

    private_key: bytes
    certificate: bytes
    certificate_authority: bytes


def _resolve(config: ShoalConfig, path: Path) -> Path:
    return path if path.is_absolute() else config.root_path / path


def load_tls(config: ShoalConfig) -> TlsMaterial | None:
    """The configured TLS material, or None when ``tls.*`` is not set."""
    tls = config.tls
    if tls.certificate is None or tls.private_key is None:
        return None
    ca_path = tls.certificate_authority or tls.certificate
    return TlsMaterial(
        private_key=_resolve(config, tls.private_key).read_bytes(),
        certificate=_resolve(config, tls.certificate).read_bytes(),
        certificate_authority=_resolve(config, ca_path).read_bytes(),
    )


def mutual_server_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate from the trusted CA."""
    return grpc.ssl_server_credentials(
        [(material.private_key, material.certificate)],
        root_certificates=material.certificate_authority,
        require_client_auth=True,
    )


def mutual_channel_credentials(material: TlsMaterial) -> grpc.ChannelCredentials:
    """Channel credentials presenting this node's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=material.certificate_authority,
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
