"""Certificate revocation: serial numbers as Shoal compares them, and CRL files.

A serial is compared as upper-case hexadecimal without separators or leading zeros, so
``0a:1b:2c``, ``A1B2C`` and ``0A1B2C`` are the same serial (how ``openssl x509 -serial``,
Harper's ``revoked_certificates`` and browsers print it all normalize to one form).

``tls.crl`` names certificate revocation lists (PEM or DER, a path or a list, relative to
``rootPath``). ``CrlFiles.revoked`` re-reads a file only when its modification time or
size changed, and accepts a list only when a trusted CA signed it; a file that cannot be
read, parsed or verified makes ``CrlFiles.revoked`` raise ``CrlUnavailable``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

_SEPARATORS = str.maketrans("", "", ": -")


def normalize_serial(serial: str | int) -> str:
    """A serial number as upper-case hex without separators or leading zeros."""
    if isinstance(serial, int):
        return format(serial, "X")
    text = serial.strip().translate(_SEPARATORS).upper()
    if text.startswith("0X"):
        text = text[2:]
    return text.lstrip("0") or "0"


def certificate_serial(certificate: x509.Certificate) -> str:
    return normalize_serial(certificate.serial_number)


class CrlUnavailable(Exception):
    """A configured CRL cannot be read, parsed or verified."""


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int]  # (mtime_ns, size) of the file when it was read
    issuer: x509.Name
    serials: frozenset[str]


@dataclass
class CrlFiles:
    """The revoked serials of a node's CRL files, per issuer, re-read when a file changes."""

    paths: tuple[Path, ...]
    trusted: tuple[x509.Certificate, ...]
    _cache: dict[Path, _Loaded] = field(default_factory=dict)

    @classmethod
    def from_pem(cls, paths: Iterable[Path], ca_pem: bytes | None) -> CrlFiles:
        trusted = tuple(x509.load_pem_x509_certificates(ca_pem)) if ca_pem else ()
        return cls(tuple(paths), trusted)

    def revoked(self) -> dict[x509.Name, frozenset[str]]:
        """Revoked serials by CRL issuer; CrlUnavailable names the first unusable file."""
        by_issuer: dict[x509.Name, frozenset[str]] = {}
        for path in self.paths:
            loaded = self._load(path)
            by_issuer[loaded.issuer] = by_issuer.get(loaded.issuer, frozenset()) | loaded.serials
        return by_issuer

    def _load(self, path: Path) -> _Loaded:
        try:
            info = path.stat()
        except OSError as exc:
            self._cache.pop(path, None)
            raise CrlUnavailable(f"CRL {path} cannot be read: {exc.strerror or exc}") from exc
        stamp = (info.st_mtime_ns, info.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached
        self._cache.pop(path, None)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CrlUnavailable(f"CRL {path} cannot be read: {exc.strerror or exc}") from exc
        try:
            if b"-----BEGIN" in data:
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise CrlUnavailable(f"CRL {path} is not a PEM or DER revocation list") from exc
        if not self._signed_by_trusted(crl):
            raise CrlUnavailable(
                f"CRL {path} is not signed by a trusted certificate authority"
                f" (issuer {crl.issuer.rfc4514_string()})"
            )
        loaded = _Loaded(
            stamp, crl.issuer, frozenset(normalize_serial(r.serial_number) for r in crl)
        )
        self._cache[path] = loaded
        return loaded

    def _signed_by_trusted(self, crl: x509.CertificateRevocationList) -> bool:
        for ca in self.trusted:
            if ca.subject != crl.issuer:
                continue
            key = cast(CertificateIssuerPublicKeyTypes, ca.public_key())
            try:
                if crl.is_signature_valid(key):
                    return True
            except (TypeError, ValueError):  # a CA key type that cannot sign CRLs
                continue
        return False
