"""The signer of the certificate exchange issues exactly what a joining node may have: its
own name, no CA flag, bounded validity; anything else in a request is refused with a
sentence. Also the temporary credentials' forms (authorization_header)."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.admin import signer
from services.admin.exchange import authorization_header
from services.common import certs
from services.common.errors import InvalidArgument

AUTHORITY = certs.create_authority("Shoal-Node-CA-test")


def _request(
    common_name: str | None,
    sans: list[x509.GeneralName] | None = None,
    ca: bool = False,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_issued_certificate_has_exactly_the_requested_identity() -> None:
    made = certs.create_signing_request("127.0.0.9")
    pem = signer.sign(AUTHORITY, made.certificate_pem, "127.0.0.9", signer.MAX_VALID_DAYS)
    certificate = x509.load_pem_x509_certificate(pem)
    certificate.verify_directly_issued_by(certs.read_pem_certificate(AUTHORITY.certificate_pem))
    cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["127.0.0.9"]
    assert len(certificate.subject) == 1
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.IPAddress(ipaddress.ip_address("127.0.0.9"))]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign and not usage.crl_sign
    eku = set(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365)
    # The certificate carries the requester's key, which stayed with the requester.
    assert certs.key_matches(certs.load_private_key(made.key_pem), certificate)


def test_a_dns_name_and_a_shorter_validity() -> None:
    made = certs.create_signing_request("server-two")
    pem = signer.sign(AUTHORITY, made.certificate_pem, "server-two", 30)
    certificate = x509.load_pem_x509_certificate(pem)
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.DNSName("server-two")]
    lifetime = certificate.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert lifetime <= dt.timedelta(days=30)
    # A request with the common name alone is fine too: the SAN is added.
    pem = signer.sign(AUTHORITY, _request("server-two"), "server-two", 30)
    assert certs.read_details(pem).subject_alternative_names == ("DNS:server-two",)


@pytest.mark.parametrize("days", [0, 366, 3650])
def test_validity_is_bounded(days: int) -> None:
    made = certs.create_signing_request("server-two")
    with pytest.raises(InvalidArgument, match="valid_days"):
        signer.sign(AUTHORITY, made.certificate_pem, "server-two", days)


@pytest.mark.parametrize(
    ("request_pem", "reason"),
    [
        (_request("server-three"), "common name .*'server-three'.* must be exactly"),
        (_request(None, [x509.DNSName("server-two")]), "common name \\(none\\)"),
        (
            _request("server-two", [x509.DNSName("server-two"), x509.DNSName("server-one")]),
            "names DNS:server-one, DNS:server-two",
        ),
        (
            _request("server-two", [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
            "names IP:10.0.0.1",
        ),
        (_request("server-two", ca=True), "asks for a CA"),
        (_request("server-two", key=rsa.generate_private_key(65537, 1024)), "at least 2048"),
        (b"", "required"),
        (b"hello", "not PEM"),
        (
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "cannot be read",
        ),
    ],
)
def test_refused_requests(request_pem: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        signer.sign(AUTHORITY, request_pem, "server-two", 30)


def test_a_request_whose_signature_does_not_verify_is_refused() -> None:
    good = x509.load_pem_x509_csr(certs.create_signing_request("server-two").certificate_pem)
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidArgument, match="signature does not verify"):
        signer.sign(AUTHORITY, tampered, "server-two", 30)


def test_authorization_forms() -> None:
    token = base64.b64encode(b"ann:s3cret").decode()
    assert authorization_header({"username": "ann", "password": "s3cret"}, "add_node") == (
        f"Basic {token}"
    )
    assert authorization_header(f"Basic {token}", "add_node") == f"Basic {token}"
    assert authorization_header("Bearer abc.def", "add_node") == "Bearer abc.def"
    for bad in ("s3cret", "Basic !!!", "Digest s3cret", {"username": "ann"}, 7, ["s3cret"]):
        with pytest.raises(InvalidArgument) as refused:
            authorization_header(bad, "add_node")
        assert "s3cret" not in refused.value.message
