"""The signer of the certificate exchange: the certificate a member issues to a node that
joins it (SignNodeCertificate), from that node's certificate signing request.

Nothing of the request is copied but its public key: the certificate is built here with
exactly the requested node's name (subject common name and one subject alternative name,
an IP SAN for an address, a DNS SAN otherwise), no CA flag, TLS server and client use, a
random serial and at most ``MAX_VALID_DAYS`` of validity. A request is refused, with a
sentence saying why, when its signature does not verify, when it names anything else than
the node, or when it asks for a CA. The CA is the node's generated one
(``<rootPath>/keys/ca.key``); a node whose certificates come from an operator's files has
no CA key, and signs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from services.common import certs
from services.common.config import ShoalConfig
from services.common.errors import FailedPrecondition, InvalidArgument

MAX_VALID_DAYS = 365
MIN_RSA_BITS = 2048
MAX_REQUEST_BYTES = 16 * 1024
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class Authority:
    """The CA a node signs with, and every CA certificate its replication trusts (PEM)."""

    pair: certs.KeyPair
    trusted: bytes


def _general_names(name: str) -> set[str]:
    wanted = certs.general_name(name)
    prefix = "IP" if isinstance(wanted, x509.IPAddress) else "DNS"
    return {f"{prefix}:{wanted.value}"}


def _requested_names(request: x509.CertificateSigningRequest) -> tuple[list[str], set[str]]:
    common_names = [
        str(a.value) for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    try:
        extension = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return common_names, set()
    names = {f"DNS:{n}" for n in extension.value.get_values_for_type(x509.DNSName)}
    names |= {f"IP:{a}" for a in extension.value.get_values_for_type(x509.IPAddress)}
    others = len(list(extension.value)) - len(names)
    if others:
        names.add(f"{others} other name(s)")
    return common_names, names


def read_request(pem: bytes, node_name: str) -> x509.CertificateSigningRequest:
    """A signing request for ``node_name`` that may be signed; InvalidArgument otherwise."""
    if not pem:
        raise InvalidArgument("'certificate_request' is required: a PEM certificate request")
    if len(pem) > MAX_REQUEST_BYTES:
        raise InvalidArgument(
            f"the certificate request is {len(pem)} bytes; at most {MAX_REQUEST_BYTES} are accepted"
        )
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in pem:
        raise InvalidArgument(
            "the certificate request is not PEM (no '-----BEGIN CERTIFICATE REQUEST-----')"
        )
    try:
        request = x509.load_pem_x509_csr(pem)
        signed = request.is_signature_valid
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"the certificate request cannot be read: {exc}") from exc
    if not signed:
        raise InvalidArgument(
            "the certificate request's signature does not verify: it was not signed by the"
            " key it carries"
        )
    key = request.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(
                f"the requested key is RSA of {key.key_size} bits; at least {MIN_RSA_BITS}"
            )
    elif not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES)):
        raise InvalidArgument("the requested key must be EC (P-256, P-384, P-521) or RSA")
    try:
        constraints = request.extensions.get_extension_for_class(x509.BasicConstraints)
        if constraints.value.ca:
            raise InvalidArgument(
                "the certificate request asks for a CA; a node certificate is never one"
            )
    except x509.ExtensionNotFound:
        pass
    common_names, names = _requested_names(request)
    if common_names != [node_name]:
        shown = ", ".join(repr(n) for n in common_names) or "none"
        raise InvalidArgument(
            f"the certificate request's common name ({shown}) must be exactly the joining"
            f" node's name {node_name!r}"
        )
    if names and names != _general_names(node_name):
        raise InvalidArgument(
            f"the certificate request names {', '.join(sorted(names))}; a node's certificate"
            f" names only the node ({', '.join(sorted(_general_names(node_name)))})"
        )
    return request


def sign(authority: certs.KeyPair, pem: bytes, node_name: str, valid_days: int) -> bytes:
    """The node certificate (PEM) for a signing request; InvalidArgument when refused."""
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise InvalidArgument(
            f"'valid_days' must be between 1 and {MAX_VALID_DAYS}, not {valid_days}"
        )
    request = read_request(pem, node_name)
    try:
        return certs.sign_node_key(authority, request.public_key(), node_name, (), valid_days)
    except certs.CertificateError as exc:
        raise FailedPrecondition(f"this node's CA cannot sign: {exc}") from exc


def load_authority(config: ShoalConfig) -> Authority:
    """The node's generated CA and what its replication trusts; FailedPrecondition when it
    has no CA key, or one its replication does not trust."""
    keys = config.keys_path
    key_path, cert_path = keys / certs.CA_KEY_FILE, keys / certs.CA_CERT_FILE
    if not key_path.exists():
        raise FailedPrecondition(
            f"{config.node_name} has no CA key ({certs.CA_KEY_FILE} in its keys folder): its"
            " certificates come from files configured by tls.*, so it cannot sign a joining"
            " node's certificate; give that node a certificate of the cluster's CA instead"
        )
    try:
        pair = certs.KeyPair(key_path.read_bytes(), cert_path.read_bytes())
        certificate = certs.read_pem_certificate(pair.certificate_pem)
        if not certs.key_matches(certs.load_private_key(pair.key_pem), certificate):
            raise certs.CertificateError(f"{certs.CA_KEY_FILE} does not belong to its certificate")
    except (OSError, certs.CertificateError) as exc:
        raise FailedPrecondition(f"{config.node_name}'s CA cannot be used: {exc}") from exc
    trusted = _trusted(config)
    fingerprints = (
        {c.fingerprint(hashes.SHA256()) for c in x509.load_pem_x509_certificates(trusted)}
        if trusted
        else set()
    )
    if certificate.fingerprint(hashes.SHA256()) not in fingerprints:
        raise FailedPrecondition(
            f"{config.node_name}'s CA ({certs.CA_CERT_FILE} in its keys folder) is not among the"
            " CAs its replication trusts (tls.certificateAuthority): a certificate it signed"
            " would be refused"
        )
    return Authority(pair, trusted)


def _trusted(config: ShoalConfig) -> bytes:
    path = config.tls.certificate_authority
    if path is None:
        return b""
    resolved = path if path.is_absolute() else config.root_path / path
    try:
        data = resolved.read_bytes()
        x509.load_pem_x509_certificates(data)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(
            f"tls.certificateAuthority {resolved} cannot be read: {exc}"
        ) from exc
    return data
