"""X.509 certificates of a node: a certificate authority, node certificates it signs, the
files they live in, and the details read back from a certificate.

* A CA is an EC P-256 key and a self-signed certificate (CA flag, may sign certificates
  and CRLs) valid for ``CA_VALID_DAYS``.
* A node certificate names the node: its common name is the node name and its subject
  alternative names are the node's DNS names and IP addresses; it is usable as TLS server
  and client (serverAuth, clientAuth), is not a CA, has a random serial and is valid for
  ``NODE_VALID_DAYS``.
* Private keys are written atomically to files only their owner can read (0600), in
  folders only their owner can enter (0700); certificates are public (0644).

``ensure_node_files`` lays out what ``shoal certs init`` and ``shoal local up`` make:
``<ca_dir>/ca.key``, ``<ca_dir>/ca.crt`` and ``<keys>/node.key``, ``<keys>/node.crt``,
``<keys>/ca.crt`` (a copy, so a node's folder is complete on its own).

``ensure_generated_files`` is what a node with no ``tls.*`` makes on its first start: its
own CA and node certificate, all in ``<rootPath>/keys/`` (``ca.key`` stays there, to sign
the certificates of nodes that join later), made once under a file lock because the
node's processes start together.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALID_DAYS = 3650
NODE_VALID_DAYS = 398
CLOCK_SLACK = dt.timedelta(minutes=5)  # not_before is this far back, for skewed clocks
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
NODE_KEY_FILE = "node.key"
NODE_CERT_FILE = "node.crt"
LOCK_FILE = ".certificates.lock"
GENERATED_CA_PREFIX = "Shoal-Node-CA-"

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


class CertificateError(ValueError):
    """A certificate or key that cannot be used; the message says why."""


@dataclass(frozen=True)
class KeyPair:
    """A private key and its certificate, both PEM."""

    key_pem: bytes
    certificate_pem: bytes


@dataclass(frozen=True)
class CertificateDetails:
    """What a certificate says, as shown in ``system.hdb_certificate``."""

    issuer: str
    subject: str
    common_name: str | None
    subject_alternative_names: tuple[str, ...]  # "DNS:name" or "IP:address"
    serial_number: str  # upper-case hexadecimal
    not_before: dt.datetime  # UTC
    not_after: dt.datetime  # UTC
    uses: tuple[str, ...]  # extended key usages, then keyCertSign / cRLSign
    is_authority: bool
    is_self_signed: bool


@dataclass(frozen=True)
class NodeFiles:
    """Where a node's TLS files are (absolute paths)."""

    certificate: Path
    private_key: Path
    certificate_authority: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def general_name(name: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertificateError(f"a certificate must be valid for at least a day, not {days}")
    now = dt.datetime.now(dt.UTC)
    return now - CLOCK_SLACK, now + dt.timedelta(days=days)


def create_authority(common_name: str, valid_days: int = CA_VALID_DAYS) -> KeyPair:
    """A new CA: key and self-signed certificate that may sign certificates and CRLs."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(valid_days)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_key_pem(key), certificate.public_bytes(serialization.Encoding.PEM))


def _issuer_key(authority: KeyPair) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    key = load_private_key(authority.key_pem)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError("the CA key must be an EC or RSA key")
    return key


def issue_node_certificate(
    authority: KeyPair, node_name: str, names: Iterable[str] = (), valid_days: int = NODE_VALID_DAYS
) -> KeyPair:
    """A key and a certificate for a node, signed by ``authority``: CN = ``node_name``,
    SANs = ``node_name`` and ``names`` (IP addresses as IP SANs), TLS server and client,
    not a CA."""
    key = _new_key()
    certificate = sign_node_key(authority, key.public_key(), node_name, names, valid_days)
    return KeyPair(_key_pem(key), certificate)


def sign_node_key(
    authority: KeyPair,
    public_key: CertificatePublicKeyTypes,
    node_name: str,
    names: Iterable[str] = (),
    valid_days: int = NODE_VALID_DAYS,
) -> bytes:
    """A node certificate (PEM) for ``public_key``, signed by ``authority``: CN =
    ``node_name``, SANs = ``node_name`` and ``names``, TLS server and client, not a CA,
    never valid past the CA."""
    if not node_name:
        raise CertificateError("a node certificate needs the node's name")
    ca_certificate = read_pem_certificate(authority.certificate_pem)
    ca_key = _issuer_key(authority)
    if not key_matches(ca_key, ca_certificate):
        raise CertificateError("the CA key does not belong to the CA certificate")
    if not details(ca_certificate).is_authority:
        raise CertificateError("the CA certificate is not a certificate authority")
    not_before, not_after = _validity(valid_days)
    not_after = min(not_after, ca_certificate.not_valid_after_utc)
    sans = [general_name(n) for n in dict.fromkeys([node_name, *names])]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def create_signing_request(node_name: str) -> KeyPair:
    """A new key and a certificate signing request (PEM, in ``certificate_pem``) naming
    ``node_name``: subject CN and one SAN, nothing else asked for."""
    key = _new_key()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .add_extension(x509.SubjectAlternativeName([general_name(node_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_key_pem(key), request.public_bytes(serialization.Encoding.PEM))


# -- reading ------------------------------------------------------------------------------


def read_pem_certificate(pem: bytes) -> x509.Certificate:
    """Exactly one PEM certificate; CertificateError otherwise."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CertificateError("not a PEM certificate (no '-----BEGIN CERTIFICATE-----' block)")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(f"not a valid PEM certificate: {exc}") from exc
    if len(certificates) != 1:
        raise CertificateError(f"expected one certificate, found {len(certificates)}")
    return certificates[0]


def load_private_key(pem: bytes) -> PrivateKeyTypes:
    """An unencrypted PEM private key; CertificateError otherwise."""
    if b"-----BEGIN" not in pem or b"PRIVATE KEY-----" not in pem:
        raise CertificateError("not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' block)")
    if b"ENCRYPTED" in pem:
        raise CertificateError("encrypted private keys are not supported; give the key unencrypted")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"not a valid PEM private key: {exc}") from exc


def key_matches(key: PrivateKeyTypes, certificate: x509.Certificate) -> bool:
    """True when ``certificate`` carries the public half of ``key``."""
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        key.public_key().public_bytes(der, public)
        == certificate.public_key().public_bytes(der, public)
    )


def _sans(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names = [f"DNS:{n}" for n in extension.value.get_values_for_type(x509.DNSName)]
    names += [f"IP:{a}" for a in extension.value.get_values_for_type(x509.IPAddress)]
    names += [
        f"URI:{u}" for u in extension.value.get_values_for_type(x509.UniformResourceIdentifier)
    ]
    names += [f"email:{e}" for e in extension.value.get_values_for_type(x509.RFC822Name)]
    return tuple(names)


def _uses(certificate: x509.Certificate) -> tuple[str, ...]:
    uses: list[str] = []
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        uses += [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku]
    except x509.ExtensionNotFound:
        pass
    try:
        ku = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if ku.key_cert_sign:
            uses.append("keyCertSign")
        if ku.crl_sign:
            uses.append("cRLSign")
    except x509.ExtensionNotFound:
        pass
    return tuple(uses)


def _is_authority(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def details(certificate: x509.Certificate) -> CertificateDetails:
    """The details of a parsed certificate."""
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = common_names[0].value if common_names else None
    return CertificateDetails(
        issuer=certificate.issuer.rfc4514_string(),
        subject=certificate.subject.rfc4514_string(),
        common_name=common_name if isinstance(common_name, str) else None,
        subject_alternative_names=_sans(certificate),
        serial_number=format(certificate.serial_number, "X"),
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        uses=_uses(certificate),
        is_authority=_is_authority(certificate),
        is_self_signed=certificate.issuer == certificate.subject,
    )


def read_details(pem: bytes) -> CertificateDetails:
    """The details of one PEM certificate; CertificateError when it is not one."""
    return details(read_pem_certificate(pem))


# -- files --------------------------------------------------------------------------------


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (created
    with ``mode`` from the start), fsynced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_private_key(path: Path, pem: bytes) -> None:
    """Write a private key: owner-only (0600), atomically, in an owner-only folder."""
    _write_atomically(path, pem, 0o600)


def write_certificate(path: Path, pem: bytes) -> None:
    """Write a certificate (public: 0644), atomically."""
    _write_atomically(path, pem, 0o644)


def ensure_authority(ca_dir: Path, common_name: str) -> KeyPair:
    """The CA in ``ca_dir`` (``ca.key``, ``ca.crt``), created when there is none."""
    key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / CA_CERT_FILE
    if key_path.exists() or cert_path.exists():
        if not (key_path.exists() and cert_path.exists()):
            raise CertificateError(f"{ca_dir} has only one of {CA_KEY_FILE} and {CA_CERT_FILE}")
        authority = KeyPair(key_path.read_bytes(), cert_path.read_bytes())
        if not key_matches(
            load_private_key(authority.key_pem), read_pem_certificate(authority.certificate_pem)
        ):
            raise CertificateError(f"{key_path} does not belong to {cert_path}")
        return authority
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ca_dir, 0o700)
    authority = create_authority(common_name)
    write_private_key(key_path, authority.key_pem)
    write_certificate(cert_path, authority.certificate_pem)
    return authority


def ensure_node_files(
    keys_dir: Path,
    authority: KeyPair,
    node_name: str,
    names: Iterable[str] = (),
    replace: bool = False,
) -> NodeFiles:
    """A node's key, certificate and CA copy in ``keys_dir``; existing files are kept
    unless ``replace``."""
    files = NodeFiles(
        certificate=keys_dir / NODE_CERT_FILE,
        private_key=keys_dir / NODE_KEY_FILE,
        certificate_authority=keys_dir / CA_CERT_FILE,
    )
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    if replace or not (files.certificate.exists() and files.private_key.exists()):
        pair = issue_node_certificate(authority, node_name, names)
        write_private_key(files.private_key, pair.key_pem)
        write_certificate(files.certificate, pair.certificate_pem)
    write_certificate(files.certificate_authority, authority.certificate_pem)
    return files


def _names(certificate_pem: bytes, node_name: str) -> bool:
    """True when the certificate's subject alternative names include ``node_name``."""
    wanted = general_name(node_name)
    prefix = "IP" if isinstance(wanted, x509.IPAddress) else "DNS"
    value = str(wanted.value)
    return f"{prefix}:{value}" in read_details(certificate_pem).subject_alternative_names


def ensure_generated_files(keys_dir: Path, node_name: str) -> NodeFiles:
    """A node's own CA and certificate in ``keys_dir``, made on the first call and reused
    after: ``ca.key``, ``ca.crt``, ``node.key``, ``node.crt`` (CN and SAN = ``node_name``).

    Every process of a node calls this at start, at the same time: a lock on
    ``keys_dir/.certificates.lock`` (``fcntl.flock``) makes one of them generate while the
    others wait, then find the files. A node certificate that no longer names the node
    (``replication.hostname`` changed) is issued again by the node's CA when its key is
    there; otherwise existing files are kept as they are.
    """
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(keys_dir, 0o700)
    fd = os.open(keys_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        files = NodeFiles(
            certificate=keys_dir / NODE_CERT_FILE,
            private_key=keys_dir / NODE_KEY_FILE,
            certificate_authority=keys_dir / CA_CERT_FILE,
        )
        complete = all(
            p.exists() for p in (files.certificate, files.private_key, files.certificate_authority)
        )
        if complete and _names(files.certificate.read_bytes(), node_name):
            return files
        if complete and not (keys_dir / CA_KEY_FILE).exists():
            return files  # someone else's CA issued these: never replace them here
        authority = ensure_authority(keys_dir, GENERATED_CA_PREFIX + node_name)
        return ensure_node_files(keys_dir, authority, node_name, replace=True)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
