"""TLS material that follows its files: certificates changed on disk are used without a
restart.

``TlsSource.current()`` returns the node's ``TlsMaterial``. Each call compares the files'
modification time, size and inode with what was last read (a few ``stat`` calls, nothing
more, when nothing changed) and, when one changed, reads and checks them all again:

* every file parses, and the private key belongs to the certificate (so a rotation that
  has replaced the certificate but not yet the key is not used half-done);
* when they do not (unreadable, not PEM, a key of another certificate), the last good
  material stays in use and a warning says why, once per change of the files;
* when they do, the new material is used from then on and an info line gives the new
  serial; ``generation`` counts the changes, so users can rebuild what they derive;
* a certificate that is expired or not yet valid is still used (the files are what the
  operator gave), but a warning names the file, its validity window and what fails with
  it, at start and again whenever the files change to such a certificate.

The source is safe to call from any thread (gRPC calls the server's certificate fetcher
on its own threads). ``reloading_server_credentials`` serves the current material to
every new TLS connection; channels made from ``current()`` dial with it. Connections
already established keep the certificates they were established with.

What is trusted: ``tls.certificateAuthority`` (when unset, the node's own certificate)
and, with ``replication.enableRootCAs``, the system CA bundle (``SSL_CERT_FILE``, else
OpenSSL's default file, else the certificates of its default folder), which is watched
like the other files.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import ssl
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from services.common.config import ShoalConfig
from services.common.tls import TlsMaterial

log = logging.getLogger("shoal.tls")

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"

Stamp = tuple[tuple[str, int, int, int, int] | tuple[str], ...]


class TlsError(Exception):
    """TLS files that cannot be used; the message names the setting and the file."""


@dataclass(frozen=True)
class TlsPaths:
    """Where a node's TLS material lives (absolute paths) and what else it trusts."""

    certificate: Path
    private_key: Path
    certificate_authority: Path | None  # None: trust the certificate itself (or the roots)
    root_cas: bool = False  # also trust the system CA bundle

    @classmethod
    def from_config(cls, config: ShoalConfig) -> TlsPaths | None:
        """The configured paths (``tls.*``, ``replication.enableRootCAs``), or None."""
        tls = config.tls
        if tls.certificate is None or tls.private_key is None:
            return None

        def resolve(path: Path) -> Path:
            return path if path.is_absolute() else config.root_path / path

        ca = tls.certificate_authority
        return cls(
            certificate=resolve(tls.certificate),
            private_key=resolve(tls.private_key),
            certificate_authority=resolve(ca) if ca is not None else None,
            root_cas=config.replication.enable_root_cas,
        )

    def watched(self) -> tuple[Path, ...]:
        """The files the material is read from, the system bundle's included."""
        files = [self.certificate, self.private_key]
        if self.certificate_authority is not None:
            files.append(self.certificate_authority)
        if self.root_cas:
            files.append(system_bundle_path())
        return tuple(files)


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{setting} {path} cannot be read: {exc.strerror or exc}") from exc


def _certificates(setting: str, path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsError(f"{setting} {path} is not a PEM certificate ({exc})") from exc


def _spki(key: object) -> bytes:
    public = getattr(key, "public_bytes", None)
    if public is None:
        return b""
    der: bytes = public(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def read_material(paths: TlsPaths) -> TlsMaterial:
    """Read and check a node's TLS files; TlsError says what is wrong with which file."""
    certificate = _read("tls.certificate", paths.certificate)
    key = _read("tls.privateKey", paths.private_key)
    chain = _certificates("tls.certificate", paths.certificate, certificate)
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(
            f"tls.privateKey {paths.private_key} is not an unencrypted PEM private key"
        ) from exc
    if _spki(private_key.public_key()) != _spki(chain[0].public_key()):
        raise TlsError(
            f"tls.privateKey {paths.private_key} does not belong to the certificate"
            f" {paths.certificate} (serial {format(chain[0].serial_number, 'X')})"
        )
    roots = system_root_certificates() if paths.root_cas else b""
    if paths.certificate_authority is not None:
        authority = _read("tls.certificateAuthority", paths.certificate_authority)
        _certificates("tls.certificateAuthority", paths.certificate_authority, authority)
    elif roots:
        authority = b""
    else:
        authority = certificate
    return TlsMaterial(key, certificate, authority, roots)


def system_bundle_path() -> Path:
    """The system CA bundle (a file, else a folder) that ``enableRootCAs`` trusts."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, paths.capath, paths.openssl_capath):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    looked = ", ".join(p for p in (paths.openssl_cafile, paths.openssl_capath) if p)
    raise TlsError(
        "replication.enableRootCAs is true but this system has no CA bundle"
        f" (looked for {looked}; set SSL_CERT_FILE to one)"
    )


def system_root_certificates() -> bytes:
    """The certificates of the system CA bundle, as PEM.

    Each one is parsed and written back, so comments and certificates that do not parse
    are left out; TlsError when the bundle holds none."""
    where = system_bundle_path()
    if where.is_dir():
        blobs: list[bytes] = []
        for file in sorted(where.iterdir()):
            try:
                blobs.append(file.read_bytes())
            except OSError:
                continue  # a dangling link or a sub-folder: not a certificate
        data = b"\n".join(blobs)
    else:
        data = _read("replication.enableRootCAs: the system CA bundle", where)
    pem: dict[bytes, None] = {}
    for block in data.split(_END)[:-1]:
        start = block.find(_BEGIN)
        if start < 0:
            continue
        try:
            with warnings.catch_warnings():
                # Some shipped roots have a negative serial: OpenSSL takes them, so do we.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                certificate = x509.load_pem_x509_certificate(block[start:] + _END)
        except ValueError:
            continue
        pem[certificate.public_bytes(serialization.Encoding.PEM)] = None
    if not pem:
        raise TlsError(
            f"replication.enableRootCAs: the system CA bundle {where} holds no certificate"
        )
    return b"".join(pem)


def serial_of(material: TlsMaterial) -> str:
    """The serial number of a material's certificate, as Shoal prints serials."""
    return format(x509.load_pem_x509_certificates(material.certificate)[0].serial_number, "X")


def validity_problem(
    certificate_pem: bytes, now: dt.datetime | None = None
) -> tuple[str, x509.Certificate] | None:
    """("expired" or "not yet valid", the certificate) when the first certificate of a
    chain is not valid now; None when it is."""
    first = x509.load_pem_x509_certificates(certificate_pem)[0]
    now = now or dt.datetime.now(dt.UTC)
    if now > first.not_valid_after_utc:
        return "expired", first
    if now < first.not_valid_before_utc:
        return "not yet valid", first
    return None


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def warn_if_not_valid(label: str, path: Path, certificate_pem: bytes, fails: str) -> bool:
    """Log a warning when the certificate (``tls.certificate`` at ``path``) is expired
    or not yet valid, naming the file, its validity window and what fails; True if so."""
    problem = validity_problem(certificate_pem)
    if problem is None:
        return False
    what, first = problem
    log.warning(
        "%s: the certificate tls.certificate %s (serial %s, subject %s) is %s (valid from"
        " %s until %s; the time here is %s). %s, until the file holds a valid certificate"
        " (it is read again when it changes, no restart needed)",
        label,
        path,
        format(first.serial_number, "X"),
        first.subject.rfc4514_string(),
        what,
        _when(first.not_valid_before_utc),
        _when(first.not_valid_after_utc),
        _when(dt.datetime.now(dt.UTC)),
        fails,
    )
    return True


DEFAULT_FAILS = "Peers and clients that verify it refuse every new TLS connection with this node"


def _stamp(files: tuple[Path, ...]) -> Stamp:
    stamps: list[tuple[str, int, int, int, int] | tuple[str]] = []
    for path in files:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append((str(path),))
            continue
        stamps.append((str(path), info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino))
    return tuple(stamps)


class TlsSource:
    """A node's TLS material, re-read when its files change (see the module comment)."""

    def __init__(
        self, paths: TlsPaths, label: str = "TLS", fails: str | None = DEFAULT_FAILS
    ) -> None:
        """Read the files now; TlsError when they cannot be used (start-up fails).

        ``fails`` says what fails with an expired or not yet valid certificate; the
        warning is logged now and on each change of the files (None: never, for a
        source whose process already warns through another one)."""
        self.paths = paths
        self.label = label
        self.fails = fails
        self._lock = threading.Lock()
        self._files = paths.watched()
        self._seen = _stamp(self._files)
        self._material = read_material(paths)
        self.generation = 1
        self._check_validity(self._material)

    @classmethod
    def from_config(
        cls, config: ShoalConfig, label: str = "TLS", fails: str | None = DEFAULT_FAILS
    ) -> TlsSource | None:
        """The source of the configured ``tls.*`` files, or None when they are not set."""
        paths = TlsPaths.from_config(config)
        return cls(paths, label, fails) if paths is not None else None

    def _check_validity(self, material: TlsMaterial) -> None:
        if self.fails is not None:
            warn_if_not_valid(self.label, self.paths.certificate, material.certificate, self.fails)

    def current(self) -> TlsMaterial:
        """The material to use now: re-read only when a file changed."""
        stamp = _stamp(self._files)
        with self._lock:
            if stamp == self._seen:
                return self._material
            self._seen = stamp
            in_use = self._material
            try:
                material = read_material(self.paths)
            except TlsError as exc:
                log.warning(
                    "%s files changed but cannot be used: %s; still using the certificate"
                    " with serial %s",
                    self.label,
                    exc,
                    serial_of(in_use),
                )
                return in_use
            if material == in_use:
                return in_use
            self._material = material
            self.generation += 1
        log.info(
            "%s files changed: now using the certificate with serial %s (was %s)",
            self.label,
            serial_of(material),
            serial_of(in_use),
        )
        self._check_validity(material)
        return material


class _ServerConfigFetcher:
    """gRPC's per-connection question "a new certificate?": None unless the files changed."""

    def __init__(self, source: TlsSource) -> None:
        self.source = source
        self.served = source.current()

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return _configuration(self.served)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            material = self.source.current()
        except Exception:  # never let a surprise break the TLS handshake thread
            log.exception("%s: cannot check the certificate files", self.source.label)
            return None
        if material is self.served:
            return None
        self.served = material
        return _configuration(material)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.certificate)], root_certificates=material.trusted
    )


def reloading_server_credentials(
    source: TlsSource, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server credentials that serve, to each new connection, the current certificate and
    trust of ``source``: mutual TLS (client certificates required) unless
    ``require_client_auth`` is false (client ports, where users sign in)."""
    fetcher = _ServerConfigFetcher(source)
    # gRPC reads a None answer as "no change"; its type stubs do not say so.
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], fetcher)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial(), fetch, require_client_authentication=require_client_auth
    )
