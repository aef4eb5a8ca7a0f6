"""A node's TLS as its processes see it at start: the files in use (``tls.*``, or the CA and
certificate the node generated on its first start), which of its client ports serve TLS,
and the channels between its own processes.

A client port (storage, admin) serves TLS with the node's certificate when the node has
TLS material, unless ``storage.tls`` / ``operationsApi.tls`` is false, and requires client
certificates with ``storage.mtls`` / ``operationsApi.mtls``. A node's processes reach
each other on their node-local sockets (``node_channel``), not on these ports.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import grpc
from cryptography import x509

from services.common import certs
from services.common.config import ShoalConfig
from services.common.errors import FailedPrecondition
from services.common.grpcserver import channel_options
from services.common.tls import TlsMaterial, load_tls, verifying_channel_credentials, with_tls_files
from services.common.tls_source import TlsError, TlsSource

CLIENT_PORTS = ("storage", "admin")


def node_channel(config: ShoalConfig, service: str, max_message_bytes: int) -> grpc.aio.Channel:
    """An asyncio channel to the node-local socket of one of this node's services
    (``storage``, ``replicator`` or ``admin``): its node-internal RPCs and its client
    RPCs, whatever its ports' TLS (the socket is 0600 in a 0700 folder; calls still
    carry the node secret or a caller's credentials)."""
    return grpc.aio.insecure_channel(
        config.socket_address(service), options=channel_options(max_message_bytes)
    )


def names_host(certificate_pem: bytes, host: str) -> bool:
    """True when the certificate (the first of a chain) has ``host`` among its subject
    alternative names as gRPC checks it: an IP SAN for an address, a DNS SAN for a name."""
    first = x509.load_pem_x509_certificates(certificate_pem)[0]
    sans = certs.details(first).subject_alternative_names
    try:
        return f"IP:{ipaddress.ip_address(host)}" in sans
    except ValueError:
        return f"dns:{host.lower()}" in {name.lower() for name in sans}


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


@dataclass(frozen=True)
class NodeTls:
    """The node's configuration with ``tls.*`` naming the files in use, and their
    contents (None in insecure mode: ``replication.securePort: null`` and no ``tls.*``)."""

    config: ShoalConfig
    material: TlsMaterial | None  # as read at start
    # The same files, re-read when they change (a join's new certificate and CA, a
    # rotation): what every channel this node dials uses, as its servers do.
    source: TlsSource | None = None

    def current(self) -> TlsMaterial | None:
        """The material to dial with now (None in insecure mode)."""
        if self.material is None:
            return None
        return self.source.current() if self.source is not None else self.material

    def serves_tls(self, service: str) -> bool:
        """Whether the port of ``service`` (``storage`` or ``admin``) serves TLS."""
        if service not in CLIENT_PORTS:
            raise ValueError(f"{service!r} is not a client port ({', '.join(CLIENT_PORTS)})")
        if self.material is None:
            return False
        if service == "storage":
            return self.config.storage.tls
        return self.config.operations_api.tls

    def requires_client_certificates(self, service: str) -> bool:
        """Whether the port of ``service`` requires client certificates (mtls)."""
        if not self.serves_tls(service):
            return False
        port = self.config.storage if service == "storage" else self.config.operations_api
        return port.mtls.enabled

    def client_port_credentials(self, service: str) -> grpc.ChannelCredentials:
        """Credentials to dial the TLS port of ``service`` (on this node or a member,
        configured alike): verify the node's CA, and present the node's certificate when
        the port requires client certificates (its common name names no user, so its
        calls still carry the node secret or a caller's credentials)."""
        material = self.current()
        if material is None:
            raise ValueError("this node has no TLS material")
        if self.requires_client_certificates(service):
            return grpc.ssl_channel_credentials(
                root_certificates=material.certificate_authority,
                private_key=material.private_key,
                certificate_chain=material.certificate,
            )
        return verifying_channel_credentials(material.certificate_authority)

    def server_source(self, service: str) -> TlsSource | None:
        """What the port of ``service`` serves TLS with, re-read when the files change
        (as on the replication port); None when it is plaintext."""
        if not self.serves_tls(service):
            return None
        try:
            return TlsSource.from_config(
                self.config,
                label=f"{service} TLS",
                fails=f"Clients that verify it (the CLI, drivers, this node's peers) refuse"
                f" every new connection to the {service} port",
            )
        except TlsError as exc:
            raise FailedPrecondition(f"cannot use this node's TLS files (tls.*): {exc}") from exc

    def target_name_override(self, address: str) -> str | None:
        """The name to check the node's certificate against when dialing ``address``, or
        None to check the dialed host itself.

        A node's processes dial each other on ``host`` (``127.0.0.1`` when the node listens
        on every address), while its certificate names the node as peers know it
        (``replication.hostname``). When the dialed host is not in the certificate, the
        check is made against the node's name instead: the server must still present a
        certificate signed by the node's CA that names this node.
        """
        if self.material is None or names_host(self.material.certificate, _host_of(address)):
            return None
        return self.config.node_name


def prepare(config: ShoalConfig) -> NodeTls:
    """The node's TLS, generating its CA and certificate on its first start when it has no
    ``tls.*`` (every process of a node calls this at start; it is safe at once). Files
    that cannot be read or used raise FailedPrecondition saying which and why."""
    try:
        effective = with_tls_files(config)
        material = load_tls(effective)
        if material is not None:
            x509.load_pem_x509_certificates(material.certificate)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot use this node's TLS files (tls.*): {exc}") from exc
    source = None
    if material is not None:
        try:
            # The port each service serves warns of an expired certificate (fails=None).
            source = TlsSource.from_config(effective, label="node TLS (dialing)", fails=None)
        except TlsError as exc:
            raise FailedPrecondition(f"cannot use this node's TLS files (tls.*): {exc}") from exc
    return NodeTls(effective, material, source)
