"""Who may read a metrics endpoint: the web configuration file of Prometheus exporters.

``metrics.webConfigFile`` names a YAML file in the format of the Prometheus
exporter-toolkit (``--web.config.file``), so one file can serve Shoal and the exporters
beside it::

    tls_server_config:
      cert_file: metrics.crt          # relative to this file's folder
      key_file: metrics.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                         # needed for the line above
      min_version: TLS12                             # TLS12 (default) or TLS13
    basic_auth_users:
      prometheus: $2y$10$...          # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')

Both parts are optional. The file is read once, at start-up (a change needs a restart);
every problem names its key. ``MetricsGuard`` wraps the endpoint's WSGI application: with
users configured every request needs one of them first (401 with ``WWW-Authenticate``
otherwise, whatever the path), then only ``/metrics`` answers (404 elsewhere, 405 for
methods other than GET and HEAD). A checked password is remembered for a minute under a
keyed digest, so a scrape every few seconds costs one bcrypt check a minute; a wrong one
costs a bcrypt check each time, and the endpoint's concurrency limit bounds how many run
at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

METRICS_PATH = "/metrics"
AUTH_CACHE_TTL_S = 60.0
AUTH_CACHE_SIZE = 64
CLIENT_AUTH_TYPES = ("NoClientCert", "RequireAndVerifyClientCert", "VerifyClientCertIfGiven")
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version")

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class MetricsTls:
    """``tls_server_config`` of the web configuration (paths already resolved)."""

    cert_file: Path
    key_file: Path
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: str = "TLS12"

    def context(self) -> ssl.SSLContext:
        """A server context from the files (raises OSError or ssl.SSLError)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = TLS_VERSIONS[self.min_version]
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=str(self.client_ca_file))
        context.verify_mode = {
            "NoClientCert": ssl.CERT_NONE,
            "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
            "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
        }[self.client_auth_type]
        return context


@dataclass(frozen=True)
class MetricsWebConfig:
    """The parsed web configuration: TLS (None: plain HTTP) and basic-auth users (user name
    to bcrypt hash; empty: no authentication)."""

    tls: MetricsTls | None = None
    basic_auth_users: tuple[tuple[str, bytes], ...] = field(default=())


def _resolve(base: Path, value: object) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _tls(raw: object, base: Path, problem: Callable[[str, object, str], None]) -> MetricsTls | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problem("tls_server_config", raw, "expected a mapping")
        return None
    for key in sorted(set(raw) - set(_TLS_KEYS)):
        problem(
            f"tls_server_config.{key}", raw[key], f"unknown key (known: {', '.join(_TLS_KEYS)})"
        )
    cert = _resolve(base, raw.get("cert_file"))
    key = _resolve(base, raw.get("key_file"))
    ok = True
    for name, path in (("cert_file", cert), ("key_file", key)):
        if path is None:
            problem(f"tls_server_config.{name}", raw.get(name), "a file is required")
            ok = False
        elif not path.is_file():
            problem(f"tls_server_config.{name}", raw.get(name), f"no file at {path}")
            ok = False
    auth_type = raw.get("client_auth_type", "NoClientCert")
    if auth_type not in CLIENT_AUTH_TYPES:
        problem(
            "tls_server_config.client_auth_type",
            auth_type,
            f"must be one of {', '.join(CLIENT_AUTH_TYPES)}",
        )
        ok = False
    ca = _resolve(base, raw.get("client_ca_file"))
    if raw.get("client_ca_file") is not None and (ca is None or not ca.is_file()):
        problem("tls_server_config.client_ca_file", raw.get("client_ca_file"), "no such file")
        ok = False
    if auth_type != "NoClientCert" and ca is None:
        problem(
            "tls_server_config.client_ca_file",
            None,
            f"client_auth_type {auth_type} needs the CA that signs client certificates",
        )
        ok = False
    version = raw.get("min_version", "TLS12")
    if version not in TLS_VERSIONS:
        problem("tls_server_config.min_version", version, "must be TLS12 or TLS13")
        ok = False
    if not ok or cert is None or key is None:
        return None
    return MetricsTls(cert, key, str(auth_type), ca, str(version))


def _users(
    raw: object, problem: Callable[[str, object, str], None]
) -> tuple[tuple[str, bytes], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        problem("basic_auth_users", raw, "expected a mapping of user names to bcrypt hashes")
        return ()
    users: list[tuple[str, bytes]] = []
    for name, hashed in raw.items():
        if not isinstance(name, str) or not name or ":" in name:
            problem("basic_auth_users", name, "a user name must be a non-empty string without ':'")
            continue
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            problem(f"basic_auth_users.{name}", "(hidden)", "expected a bcrypt hash ($2y$...)")
            continue
        users.append((name, hashed.encode()))
    return tuple(users)


def parse_web_config(path: Path) -> tuple[MetricsWebConfig, list[str]]:
    """The web configuration in ``path`` and the problems found (each naming its key)."""
    problems: list[str] = []

    def problem(key: str, value: object, why: str) -> None:
        problems.append(f"{path}: {key}: {why} (got {value!r})")

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        return MetricsWebConfig(), [f"cannot read {path}: {exc.strerror}"]
    except yaml.YAMLError as exc:
        return MetricsWebConfig(), [f"{path}: not valid YAML: {exc}"]
    if not isinstance(data, Mapping):
        return MetricsWebConfig(), [f"{path}: expected a mapping"]
    known = ("tls_server_config", "basic_auth_users", "http_server_config")
    for key in sorted(set(data) - set(known)):
        problem(str(key), data[key], f"unknown key (known: {', '.join(known)})")
    if data.get("http_server_config") not in (None, {}):
        problem("http_server_config", data["http_server_config"], "not supported by Shoal")
    tls = _tls(data.get("tls_server_config"), path.parent, problem)
    users = _users(data.get("basic_auth_users"), problem)
    return MetricsWebConfig(tls=tls, basic_auth_users=users), problems


class _Credentials:
    """Basic-auth checks against bcrypt hashes, with a small cache of successes."""

    def __init__(self, users: tuple[tuple[str, bytes], ...]) -> None:
        self._users = dict(users)
        self._key = os.urandom(32)
        self._cache: dict[bytes, float] = {}
        self._lock = threading.Lock()
        # A hash to check unknown names against, so they cost the same as known ones.
        self._dummy = bcrypt.hashpw(os.urandom(8), bcrypt.gensalt(rounds=10))

    def check(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        name, sep, password = decoded.partition(":")
        if not sep:
            return False
        digest = hmac.new(self._key, decoded.encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            if self._cache.get(digest, 0.0) > now:
                return True
        hashed = self._users.get(name)
        ok = bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None
        if ok:
            with self._lock:
                if len(self._cache) >= AUTH_CACHE_SIZE:
                    self._cache.clear()
                self._cache[digest] = now + AUTH_CACHE_TTL_S
        return ok


def _answer(
    start_response: Callable[..., Any], status: str, text: str, *headers: Any
) -> list[bytes]:
    body = text.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return [body]


class MetricsGuard:
    """The metrics WSGI application behind the path, method and basic-auth checks."""

    def __init__(self, app: WsgiApp, web: MetricsWebConfig) -> None:
        self._app = app
        self._credentials = _Credentials(web.basic_auth_users) if web.basic_auth_users else None

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if self._credentials is not None and not self._credentials.check(
            environ.get("HTTP_AUTHORIZATION")
        ):
            return _answer(
                start_response,
                "401 Unauthorized",
                "authentication required (basic_auth_users of metrics.webConfigFile)\n",
                ("WWW-Authenticate", 'Basic realm="shoal metrics"'),
            )
        if environ.get("PATH_INFO") != METRICS_PATH:
            return _answer(
                start_response, "404 Not Found", f"not found: metrics are at {METRICS_PATH}\n"
            )
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(
                start_response, "405 Method Not Allowed", "use GET\n", ("Allow", "GET, HEAD")
            )
        return self._app(environ, start_response)
