"""One YAML file per node (``shoal.yaml``), loaded into typed dataclasses.

Key names follow Harper's ``harperdb-config.yaml`` where Harper has one (``rootPath``,
``replication.hostname``, ``replication.routes``, ``operationsApi.network.port``,
``logging.auditRetention``, ``tls.*``). The whole file is validated at once: every problem
is reported together, each naming its dotted key and the bad value, and unknown keys are
errors (a typo must not silently fall back to a default).

Any key can be overridden from the environment: ``SHOAL_`` + the dotted key in upper case
with dots as underscores, e.g. ``SHOAL_REPLICATION_HOSTNAME=server-one`` or
``SHOAL_STORAGE_PORT=9926``. Values are parsed as YAML, so lists work too:
``SHOAL_REPLICATION_ROUTES='[server-two, server-three]'``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from services.common.jsoninput import (
    DEFAULT_NESTING_DEPTH,
    MAX_NESTING_DEPTH,
    MIN_NESTING_DEPTH,
)
from services.common.metrics_web import MetricsWebConfig, parse_web_config

DEFAULT_ADMIN_PORT = 9925
DEFAULT_STORAGE_PORT = 9926
DEFAULT_REPLICATION_PORT = 9932
SOCKET_SUFFIX = ".sock"
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (sun_path, less its final NUL)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_REPLICATION_SECURE_PORT = 9933
DEFAULT_METRICS_STORAGE_PORT = 9941
DEFAULT_METRICS_REPLICATOR_PORT = 9942
DEFAULT_METRICS_ADMIN_PORT = 9943
DEFAULT_HEALTH_ADMIN_PORT = 9935
DEFAULT_HEALTH_STORAGE_PORT = 9936
DEFAULT_HEALTH_REPLICATOR_PORT = 9937

ENV_PREFIX = "SHOAL_"

_NAME_RE = re.compile(r"^[A-Za-z0-9_$][A-Za-z0-9_$-]{0,249}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "notify")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {source}:\n{lines}")


@dataclass(frozen=True)
class Replicates:
    """Controlled flow with one peer (Harper's ``replicates: {sends, receives}``)."""

    sends: bool = True
    receives: bool = True


@dataclass(frozen=True)
class Subscription:
    """An explicit per-table subscription with one peer (Harper's legacy form)."""

    database: str
    table: str
    publish: bool
    subscribe: bool


@dataclass(frozen=True)
class ReplicatedDatabase:
    """One entry of ``replication.databases``: a database this node replicates, and how.

    The name ``*`` stands for every database (with no other settings)."""

    name: str
    sharded: bool = False  # flows only between nodes of the same replication.shard
    replicate_to: int | None = None  # residents per record; None: every node in full


ALL_DATABASES = "*"


@dataclass(frozen=True)
class Route:
    """A peer this node dials."""

    hostname: str
    port: int | None = None
    secure: bool | None = None
    replicates: Replicates = field(default_factory=Replicates)
    start_time: datetime | None = None
    revoked_certificates: tuple[str, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()  # empty: replicate every table


@dataclass(frozen=True)
class LoggingConfig:
    """``logging.*``."""

    level: str = "info"
    format: str = "text"
    audit_retention_s: float = 3 * 86400.0


@dataclass(frozen=True)
class MtlsConfig:
    """``storage.mtls`` / ``operationsApi.mtls``: client certificates on a client port.

    ``enabled``: the port asks for a client certificate, verified against the node's
    trusted CAs; ``required``: a connection without one fails the TLS handshake (gRPC for
    Python cannot ask for an optional one, so an enabled port requires it);
    ``user_from_common_name``: a call without ``authorization`` is the user named by the
    certificate's common name (Harper's ``user: Common Name``); false: the certificate
    only gates the connection (Harper's ``user: null``).
    """

    enabled: bool = False
    required: bool = False
    user_from_common_name: bool = True


MTLS_USER_COMMON_NAME = "Common Name"


@dataclass(frozen=True)
class StorageConfig:
    """``storage.*``: the storage service."""

    port: int = DEFAULT_STORAGE_PORT
    path: Path = Path("database")
    sync_writes: bool = False
    max_message_bytes: int = 16 * 1024 * 1024
    max_records_per_request: int = 100_000
    max_concurrent_rpcs: int = 1000
    max_connections: int = 1000  # client connections at once (more are closed at accept)
    max_streams_per_connection: int = 100  # HTTP/2 concurrent streams of one connection
    max_streams: int = 64  # streamed responses (searches, log reads) served at once
    max_streams_per_client: int = 8  # ...of them from one source address
    stream_idle_timeout_s: float = 60.0  # a stream whose client reads nothing this long ends
    max_sort_rows: int = 1_000_000
    # Levels of arrays and objects a JSON document may nest (services/common/jsoninput.py).
    max_nesting_depth: int = DEFAULT_NESTING_DEPTH
    purge_interval_s: float = 3600.0
    tls: bool = True  # serve TLS when the node has TLS material; false: plaintext
    mtls: MtlsConfig = field(default_factory=MtlsConfig)  # client certificates


@dataclass(frozen=True)
class OperationsApiConfig:
    """``operationsApi.*``: the admin service."""

    port: int = DEFAULT_ADMIN_PORT
    tls: bool = True  # serve TLS when the node has TLS material; false: plaintext
    mtls: MtlsConfig = field(default_factory=MtlsConfig)  # client certificates
    max_concurrent_rpcs: int = 16  # calls served at once; more get RESOURCE_EXHAUSTED
    max_request_memory: int = 384 * 1024 * 1024  # estimated memory of one Execute, at most
    max_memory: int = 512 * 1024 * 1024  # ...of the Execute calls in progress together


@dataclass(frozen=True)
class ReplicationConfig:
    """``replication.*``: the replicator service."""

    hostname: str
    # The plain port: closed (None) by default whenever securePort is open.
    port: int | None = None
    secure_port: int | None = DEFAULT_REPLICATION_SECURE_PORT
    # Source addresses (networks) that may speak for any route or member on the plain port.
    allowed_sources: tuple[IPNetwork, ...] = ()
    routes: tuple[Route, ...] = ()
    # None means every database ('*'); a list may hold '*' too, with per-database entries
    databases: tuple[ReplicatedDatabase, ...] | None = None
    max_clock_skew_s: float = 60.0
    enable_root_cas: bool = False
    heartbeat_interval_s: float = 2.0
    peer_timeout_s: float = 10.0
    reconnect_delay_s: float = 0.2
    reconnect_max_delay_s: float = 10.0
    window_batches: int = 8
    window_bytes: int = 8 * 1024 * 1024
    batch_transactions: int = 500
    batch_bytes: int = 1024 * 1024
    copy_rows_per_second: int = 0  # 0: as fast as possible
    batch_linger_s: float = 0.002
    url: str | None = None  # how peers reach this node; None: derived from hostname and ports
    gossip: bool = True  # also dial every member of system.hdb_nodes, not only routes
    shard: int | None = None
    residency_repair_after_s: float = 3600.0  # re-home a down member's records; 0: never

    def replicate_to(self, database: str) -> int | None:
        """``replicateTo`` of a database's entry (None: full replication)."""
        for entry in self.databases or ():
            if entry.name == database:
                return entry.replicate_to
        return None

    @property
    def database_names(self) -> tuple[str, ...] | None:
        """The databases replicated; None for every database ('*')."""
        if self.databases is None or any(d.name == ALL_DATABASES for d in self.databases):
            return None
        return tuple(d.name for d in self.databases)

    @property
    def sharded_databases(self) -> tuple[str, ...]:
        """The databases declared ``sharded: true``."""
        return tuple(d.name for d in self.databases or () if d.sharded)


@dataclass(frozen=True)
class TlsConfig:
    """``tls.*``: certificate files (paths relative to rootPath)."""

    certificate: Path | None = None
    private_key: Path | None = None
    certificate_authority: Path | None = None
    crl: tuple[Path, ...] = ()  # certificate revocation lists (PEM or DER), read per handshake
    crl_fail_closed: bool = True  # refuse every peer while a CRL cannot be read


@dataclass(frozen=True)
class AuthenticationConfig:
    """``authentication.*``: sign-in throttling of the storage service, per user name and
    source address (see services/storage/throttle.py)."""

    lockout_attempts: int = 5  # failures of one name from one address before waits; 0: never
    lockout_duration_s: float = 300.0  # the longest wait, and how long failures are remembered
    initial_backoff_s: float = 1.0  # the first wait; it doubles with each further failure
    source_lockout_attempts: int = 100  # failures from one address (any names); 0: never
    tracked_failures: int = 100_000  # (name, address) and address entries kept at most
    max_concurrent_verifications: int = 2  # scrypt checks at once (16 MiB each)


@dataclass(frozen=True)
class AdminBootstrap:
    """``admin.*``: the super user created at first start (or SHOAL_ADMIN_* env)."""

    username: str = "admin"
    password: str | None = None


@dataclass(frozen=True)
class TestingConfig:
    """``testing.*``: knobs for fault tests; never set in production."""

    clock_offset_ms: int = 0


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics.*``: the Prometheus endpoint of each service (on ``metrics.host``, by
    default the node's ``host``), with an optional exporter-style web config."""

    enabled: bool = True
    storage_port: int = DEFAULT_METRICS_STORAGE_PORT
    replicator_port: int = DEFAULT_METRICS_REPLICATOR_PORT
    admin_port: int = DEFAULT_METRICS_ADMIN_PORT
    host: str | None = None  # the address to listen on; None: the node's host
    web_config_file: Path | None = None  # exporter-toolkit web config (TLS, basic auth)
    web: MetricsWebConfig = field(default_factory=MetricsWebConfig)

    def port(self, service: str) -> int:
        """The metrics port of ``storage``, ``replicator`` or ``admin``."""
        ports = {
            "storage": self.storage_port,
            "replicator": self.replicator_port,
            "admin": self.admin_port,
        }
        return ports[service]


@dataclass(frozen=True)
class HealthConfig:
    """``health.*``: a plaintext port per service serving only ``grpc.health.v1`` (for
    orchestrator probes), on the node's ``host``."""

    enabled: bool = True
    admin_port: int = DEFAULT_HEALTH_ADMIN_PORT
    storage_port: int = DEFAULT_HEALTH_STORAGE_PORT
    replicator_port: int = DEFAULT_HEALTH_REPLICATOR_PORT

    def port(self, service: str) -> int:
        """The health port of ``storage``, ``replicator`` or ``admin``."""
        ports = {
            "storage": self.storage_port,
            "replicator": self.replicator_port,
            "admin": self.admin_port,
        }
        return ports[service]


@dataclass(frozen=True)
class AnalyticsConfig:
    """``analytics.*``: the node-local analytics history (``system.hdb_raw_analytics``,
    ``system.hdb_analytics``)."""

    enabled: bool = True
    raw_retention_s: float = 3600.0
    aggregate_retention_s: float = 7 * 86400.0
    max_rows: int = 10_000  # the most rows one get_analytics answers


MIN_RAW_RETENTION_S = 120.0  # a minute is aggregated once it is over: keep it until then


@dataclass(frozen=True)
class ShoalConfig:
    """A node's whole configuration."""

    root_path: Path
    host: str
    replication: ReplicationConfig
    storage: StorageConfig = field(default_factory=StorageConfig)
    operations_api: OperationsApiConfig = field(default_factory=OperationsApiConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    admin: AdminBootstrap = field(default_factory=AdminBootstrap)
    authentication: AuthenticationConfig = field(default_factory=AuthenticationConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    analytics: AnalyticsConfig = field(default_factory=AnalyticsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    # Folder of the node-local sockets of its services (node-internal RPCs).
    sockets_path: Path | None = None
    source: Path | None = None

    @property
    def node_name(self) -> str:
        """This node's name (``replication.hostname``)."""
        return self.replication.hostname

    @property
    def storage_path(self) -> Path:
        """The RocksDB directory."""
        return self.root_path / self.storage.path

    @property
    def sockets_folder(self) -> Path:
        """The folder of the node-local sockets (``socketsPath``, mode 0700): by default
        ``<rootPath>/sockets``, or, when a socket path there would be too long for a Unix
        socket, a folder of the system's temporary folder named after ``rootPath`` (the
        same for the node's three processes)."""
        if self.sockets_path is not None:
            return self.sockets_path
        folder = self.root_path / "sockets"
        if _socket_path_fits(folder):
            return folder
        digest = hashlib.sha256(str(self.root_path).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"shoal-{digest}"

    def socket_address(self, service: str) -> str:
        """The gRPC address of the node-local socket of ``service`` (``storage``,
        ``replicator`` or ``admin``), where its node-internal RPCs are served."""
        return f"unix:{self.sockets_folder / (service + SOCKET_SUFFIX)}"

    @property
    def keys_path(self) -> Path:
        """Directory for secrets and private keys (mode 0700)."""
        return self.root_path / "keys"

    def local_address(self, port: int) -> str:
        """``host:port`` where this node's own processes reach one of its services."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{port}"


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string like ``100ms``, ``60s``, ``5m``, ``3d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError("expected a duration such as 60, '500ms', '60s', '5m' or '3d'")


class _Reader:
    """Reads one mapping section, recording problems under dotted key names."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        problems: list[str],
        env: Mapping[str, str],
        trace: set[str] | None = None,
    ) -> None:
        self._data = data
        self._path = path
        self._problems = problems
        self._env = env
        self._seen: set[str] = set()
        self._trace = trace

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def problem(self, name: str, value: object, why: str) -> None:
        self._problems.append(f"{self.key(name)}: {why} (got {value!r})")

    def raw(self, name: str) -> tuple[bool, Any]:
        """(present, value), with the environment override taking precedence."""
        self._seen.add(name)
        if self._trace is not None:
            self._trace.add(self.key(name))
        env_name = ENV_PREFIX + self.key(name).replace(".", "_").upper()
        if env_name in self._env:
            try:
                return True, yaml.safe_load(self._env[env_name])
            except yaml.YAMLError as exc:
                self._problems.append(f"{env_name}: not valid YAML ({exc})")
                return False, None
        if name in self._data:
            return True, self._data[name]
        return False, None

    def string(self, name: str, default: str) -> str:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.problem(name, value, "expected a string")
            return default
        return str(value)

    def optional_string(self, name: str) -> str | None:
        present, value = self.raw(name)
        if not present or value is None:
            return None
        if not isinstance(value, str | int):
            self.problem(name, value, "expected a string")
            return None
        return str(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, value, "expected a whole number")
            return default
        if not low <= value <= high:
            self.problem(name, value, f"must be between {low} and {high}")
            return default
        return value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        present, value = self.raw(name)
        if not present or value is None:
            return None
        return self.integer(name, low, low, high)

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 1, 65535)

    def boolean(self, name: str, default: bool) -> bool:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        if not isinstance(value, bool):
            self.problem(name, value, "expected true or false")
            return default
        return value

    def duration(self, name: str, default: float) -> float:
        present, value = self.raw(name)
        if not present or value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(name, value, str(exc))
            return default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).lower()
        if value not in choices:
            self.problem(name, value, f"must be one of {', '.join(choices)}")
            return default
        return value

    def section(self, name: str) -> _Reader:
        present, value = self.raw(name)
        if present and value is not None and not isinstance(value, Mapping):
            self.problem(name, value, "expected a mapping")
            value = {}
        return _Reader(value or {}, self.key(name), self._problems, self._env, self._trace)

    def finish(self) -> None:
        for name in sorted(set(self._data) - self._seen):
            self._problems.append(f"{self.key(str(name))}: unknown key")


def _valid_hostname(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    return (
        bool(name)
        and len(name) <= 253
        and all(
            re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label)
            for label in labels
        )
    )


def parse_route_url(text: str) -> tuple[str, int | None, bool | None]:
    """``server``, ``server:9933``, ``shoal://server:9933``, ``wss://…`` → (host, port, secure)."""
    secure: bool | None = None
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("shoals", "wss", "https", "grpcs"):
            secure = True
        elif scheme in ("ws", "http", "grpc"):
            secure = False
        elif scheme != "shoal":
            raise ValueError(f"unknown scheme {scheme!r}")
        rest = rest.rstrip("/")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = int(port_text)
    else:
        host = rest
    if not _valid_hostname(host):
        raise ValueError(f"{host!r} is not a valid host name or address")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port, secure


def parse_time(value: object) -> datetime:
    """A startTime as shoal.yaml and system.hdb_nodes hold it (ISO 8601; naive is UTC)."""
    return _parse_time(value)


def _parse_time(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError("expected an ISO 8601 time such as 2024-01-01T00:00:00Z")


def _parse_route(reader: _Reader, index: int, item: object) -> Route | None:
    name = f"routes[{index}]"
    if isinstance(item, str):
        try:
            url_host, url_port, url_secure = parse_route_url(item)
        except ValueError as exc:
            reader.problem(name, item, str(exc))
            return None
        return Route(hostname=url_host, port=url_port, secure=url_secure)
    if not isinstance(item, Mapping):
        reader.problem(name, item, "expected a host name, a URL or a mapping")
        return None
    sub = _Reader(item, reader.key(name), reader._problems, {})
    host: str | None = sub.optional_string("hostname") or sub.optional_string("host")
    url = sub.optional_string("url")
    port: int | None = None
    secure: bool | None = None
    if url:
        try:
            host, port, secure = parse_route_url(url)
        except ValueError as exc:
            sub.problem("url", url, str(exc))
            return None
    if not host:
        reader.problem(name, item, "a route needs hostname (or host, or url)")
        return None
    if not _valid_hostname(host):
        sub.problem("hostname", host, "not a valid host name or address")
    present, _ = sub.raw("port")
    if present:
        port = sub.port("port", 0) or None
    replicates = Replicates()
    present, rep = sub.raw("replicates")
    if present:
        if isinstance(rep, bool):
            replicates = Replicates(sends=rep, receives=rep)
        elif isinstance(rep, Mapping):
            rr = sub.section("replicates")
            replicates = Replicates(
                sends=rr.boolean("sends", True), receives=rr.boolean("receives", True)
            )
            rr.finish()
        else:
            sub.problem("replicates", rep, "expected true/false or {sends, receives}")
    start_time: datetime | None = None
    present, raw_start = sub.raw("startTime")
    if present and raw_start is not None:
        try:
            start_time = _parse_time(raw_start)
        except ValueError as exc:
            sub.problem("startTime", raw_start, str(exc))
    revoked: tuple[str, ...] = ()
    present, raw_revoked = sub.raw("revokedCertificates")
    if present and raw_revoked is not None:
        if isinstance(raw_revoked, list) and all(isinstance(s, str | int) for s in raw_revoked):
            revoked = tuple(str(s).upper() for s in raw_revoked)
        else:
            sub.problem("revokedCertificates", raw_revoked, "expected a list of serial numbers")
    subscriptions: list[Subscription] = []
    present, raw_subs = sub.raw("subscriptions")
    if present and raw_subs is not None:
        if not isinstance(raw_subs, list):
            sub.problem("subscriptions", raw_subs, "expected a list")
        for i, raw_entry in enumerate(raw_subs if isinstance(raw_subs, list) else []):
            if not isinstance(raw_entry, Mapping):
                sub.problem(
                    f"subscriptions[{i}]",
                    raw_entry,
                    "expected {database, table, publish, subscribe}",
                )
                continue
            entry = _Reader(raw_entry, sub.key(f"subscriptions[{i}]"), reader._problems, {})
            database = entry.string("database", "")
            table = entry.string("table", "")
            if not _NAME_RE.match(database) or not _NAME_RE.match(table):
                sub.problem(
                    f"subscriptions[{i}]", raw_entry, "database and table names are required"
                )
            subscriptions.append(
                Subscription(
                    database,
                    table,
                    entry.boolean("publish", False),
                    entry.boolean("subscribe", False),
                )
            )
            entry.finish()
    sub.finish()
    return Route(
        hostname=host,
        port=port,
        secure=secure,
        replicates=replicates,
        start_time=start_time,
        revoked_certificates=revoked,
        subscriptions=tuple(subscriptions),
    )


def _parse_database(reader: _Reader, index: int, item: object) -> ReplicatedDatabase | None:
    """One entry of ``replication.databases``: a name, ``'*'``, or
    ``{name, sharded, replicateTo}``."""
    name = f"databases[{index}]"
    if isinstance(item, str):
        if item != ALL_DATABASES and not _NAME_RE.match(item):
            reader.problem(name, item, "not a valid database name")
            return None
        return ReplicatedDatabase(item)
    if not isinstance(item, Mapping):
        reader.problem(name, item, "expected a database name or {name, sharded, replicateTo}")
        return None
    entry = _Reader(item, reader.key(name), reader._problems, {})
    database = entry.string("name", "")
    sharded = entry.boolean("sharded", False)
    replicate_to = entry.optional_integer("replicateTo", 1, 1000)
    entry.finish()  # an unknown key is an error naming it
    if not _NAME_RE.match(database) and database != ALL_DATABASES:
        entry.problem("name", database or None, "a database name is required")
        return None
    if database == ALL_DATABASES and sharded:
        entry.problem("sharded", sharded, "'*' cannot be sharded; list each sharded database")
        return None
    if database == ALL_DATABASES and replicate_to is not None:
        entry.problem("replicateTo", replicate_to, "'*' cannot have residents; name the database")
        return None
    if database == "system" and (sharded or replicate_to is not None):
        key, value = ("sharded", sharded) if sharded else ("replicateTo", replicate_to)
        entry.problem(key, value, "the system database always replicates to every node")
        return None
    return ReplicatedDatabase(database, sharded, replicate_to)


def _parse_databases(reader: _Reader) -> tuple[ReplicatedDatabase, ...] | None:
    """``replication.databases``: ``'*'`` (None) or a list of entries."""
    present, raw = reader.raw("databases")
    if not present or raw is None or raw == ALL_DATABASES:
        return None
    if not isinstance(raw, list):
        reader.problem("databases", raw, "expected '*' or a list of database names or entries")
        return None
    entries = [_parse_database(reader, i, item) for i, item in enumerate(raw)]
    seen: set[str] = set()
    for entry in entries:
        if entry is not None and entry.name in seen:
            reader.problem("databases", entry.name, "the same database is listed twice")
        if entry is not None:
            seen.add(entry.name)
    return tuple(e for e in entries if e is not None)


def _advertised_url(reader: _Reader, hostname: str) -> str | None:
    url = reader.optional_string("url")
    if url is None:
        return None
    try:
        host, _, _ = parse_route_url(url)
    except ValueError as exc:
        reader.problem("url", url, str(exc))
        return None
    if host != hostname:
        reader.problem("url", url, f"the host must be this node's name ({hostname!r})")
    return url


def _socket_path_fits(folder: Path) -> bool:
    """Whether every socket of a node fits a Unix socket path in ``folder``."""
    return len(str(folder / ("replicator" + SOCKET_SUFFIX)).encode()) <= MAX_SOCKET_PATH


def _networks(reader: _Reader, key: str) -> tuple[IPNetwork, ...]:
    """A list of IP addresses or networks (``10.0.0.0/8``, ``127.0.0.1``)."""
    present, raw = reader.raw(key)
    if not present or raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        reader.problem(key, raw, "expected a list of IP addresses or networks")
        return ()
    networks: list[IPNetwork] = []
    for item in raw:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            reader.problem(key, item, "not an IP address or network (e.g. 10.0.0.0/8)")
    return tuple(networks)


def _parse_replication(reader: _Reader) -> ReplicationConfig:
    hostname = reader.string("hostname", socket.gethostname())
    if not _valid_hostname(hostname):
        reader.problem("hostname", hostname, "not a valid host name or address")
    present, raw_secure = reader.raw("securePort")
    secure_port: int | None = DEFAULT_REPLICATION_SECURE_PORT
    if present:
        secure_port = None if raw_secure is None else reader.port("securePort", 0) or None
    # The plain port is open only when asked for, or when there is no TLS port at all.
    present, raw_port = reader.raw("port")
    port: int | None = None if secure_port is not None else DEFAULT_REPLICATION_PORT
    if present:
        port = None if raw_port is None else reader.port("port", 0) or None
    if port is None and secure_port is None:
        reader.problem(
            "port",
            raw_port,
            "replication.port and replication.securePort cannot both be null: the node"
            " would have no replication port",
        )
    allowed_sources = _networks(reader, "allowedSources")
    routes: list[Route] = []
    present, raw_routes = reader.raw("routes")
    if present and raw_routes is not None:
        if not isinstance(raw_routes, list):
            reader.problem("routes", raw_routes, "expected a list")
        else:
            for i, item in enumerate(raw_routes):
                route = _parse_route(reader, i, item)
                if route is not None:
                    routes.append(route)
    seen: set[str] = set()
    for route in routes:
        if route.hostname == hostname:
            reader.problem("routes", route.hostname, "a route names this node itself")
        if route.hostname in seen:
            reader.problem("routes", route.hostname, "the same peer is listed twice")
        seen.add(route.hostname)
    databases = _parse_databases(reader)
    config = ReplicationConfig(
        hostname=hostname,
        port=port,
        secure_port=secure_port,
        allowed_sources=allowed_sources,
        routes=tuple(routes),
        databases=databases,
        max_clock_skew_s=reader.duration("maxClockSkew", 60.0),
        enable_root_cas=reader.boolean("enableRootCAs", False),
        heartbeat_interval_s=reader.duration("heartbeatInterval", 2.0),
        peer_timeout_s=reader.duration("peerTimeout", 10.0),
        reconnect_delay_s=reader.duration("reconnectDelay", 0.2),
        reconnect_max_delay_s=reader.duration("reconnectMaxDelay", 10.0),
        window_batches=reader.integer("windowBatches", 8, 1, 1024),
        window_bytes=reader.integer("windowBytes", 8 * 1024 * 1024, 65536, 1 << 30),
        batch_transactions=reader.integer("batchTransactions", 500, 1, 100_000),
        batch_bytes=reader.integer("batchBytes", 1024 * 1024, 1024, 64 * 1024 * 1024),
        copy_rows_per_second=reader.integer("copyRowsPerSecond", 0, 0, 100_000_000),
        batch_linger_s=reader.duration("batchLinger", 0.002),
        url=_advertised_url(reader, hostname),
        gossip=reader.boolean("gossip", True),
        shard=reader.optional_integer("shard", 0, 1_000_000),
        residency_repair_after_s=reader.duration("residencyRepairAfter", 3600.0),
    )
    if config.peer_timeout_s < 2 * config.heartbeat_interval_s:
        reader.problem(
            "peerTimeout",
            config.peer_timeout_s,
            "must be at least twice replication.heartbeatInterval",
        )
    resident = [d.name for d in config.databases or () if d.replicate_to is not None]
    if resident and not config.gossip:
        reader.problem(
            "gossip",
            False,
            f"{', '.join(resident)} {'has' if len(resident) == 1 else 'have'} replicateTo,"
            " which needs every node to dial every member (a relay never passes a record"
            " whole to its residents): keep replication.gossip true",
        )
    reader.finish()
    return config


def _optional_path(reader: _Reader, name: str) -> Path | None:
    text = reader.optional_string(name)
    return Path(text) if text else None


def _paths(reader: _Reader, name: str) -> tuple[Path, ...]:
    """A path or a list of paths (empty when absent)."""
    present, value = reader.raw(name)
    if not present or value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        reader.problem(name, value, "expected a path or a list of paths")
        return ()
    return tuple(Path(item) for item in items)


def _mtls(reader: _Reader, name: str) -> MtlsConfig:
    """``false`` / ``true`` / ``{required, user}`` (every sub-key is read, so environment
    overrides such as ``SHOAL_STORAGE_MTLS_REQUIRED`` work too)."""
    present, value = reader.raw(name)
    enabled = present and (value is True or isinstance(value, Mapping))
    if present and value is not None and not isinstance(value, bool | Mapping):
        reader.problem(name, value, "expected true, false or {required: true, user: ...}")
    sub = _Reader(
        value if isinstance(value, Mapping) else {},
        reader.key(name),
        reader._problems,
        reader._env,
        reader._trace,
    )
    required_given, _ = sub.raw("required")
    required = sub.boolean("required", False)
    user_given, user = sub.raw("user")
    enabled = enabled or required_given or user_given
    from_common_name = True
    if user_given:
        if user is None:
            from_common_name = False
        elif user != MTLS_USER_COMMON_NAME:
            sub.problem("user", user, f"expected {MTLS_USER_COMMON_NAME!r} or null")
    sub.finish()
    if enabled and not required:
        sub.problem(
            "required",
            required,
            "must be true: a port with client certificates requires them (gRPC for Python"
            " cannot ask for an optional client certificate); write"
            f" {name}: {{required: true}}",
        )
    return MtlsConfig(enabled=enabled, required=required, user_from_common_name=from_common_name)


def parse_config(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    source: Path | None = None,
    trace: set[str] | None = None,
) -> ShoalConfig:
    """Validate a parsed YAML document (plus environment overrides) as a whole.

    ``trace``, when given, collects the dotted name of every key the loader looks at
    (used to check that docs/configuration.md documents them all).
    """
    environment = os.environ if env is None else env
    problems: list[str] = []
    top = _Reader(data, "", problems, environment, trace)
    root = Path(top.string("rootPath", "shoal-data")).expanduser()
    if not root.is_absolute():
        root = (base_dir or Path.cwd()) / root
    host = top.string("host", "127.0.0.1")
    if not _valid_hostname(host) and host not in ("0.0.0.0", "::"):
        top.problem("host", host, "not a valid address to listen on")
    sockets: Path | None = None
    raw_sockets = top.optional_string("socketsPath")
    if raw_sockets is not None:
        sockets = Path(raw_sockets).expanduser()
        if not sockets.is_absolute():
            sockets = root / sockets
    folder = sockets if sockets is not None else root / "sockets"
    longest = folder / ("replicator" + SOCKET_SUFFIX)
    if sockets is not None and not _socket_path_fits(folder):
        top.problem(
            "socketsPath",
            str(longest.parent),
            f"a socket path there would be {len(str(longest).encode())} bytes, more than the"
            f" {MAX_SOCKET_PATH} a Unix socket allows: set socketsPath to a shorter folder",
        )

    lg = top.section("logging")
    logging_config = LoggingConfig(
        level=lg.choice("level", "info", _LOG_LEVELS),
        format=lg.choice("format", "text", ("text", "json")),
        audit_retention_s=lg.duration("auditRetention", 3 * 86400.0),
    )
    lg.finish()

    st = top.section("storage")
    storage = StorageConfig(
        port=st.port("port", DEFAULT_STORAGE_PORT),
        path=Path(st.string("path", "database")),
        sync_writes=st.boolean("syncWrites", False),
        max_message_bytes=st.integer("maxMessageBytes", 16 * 1024 * 1024, 1024 * 1024, 1 << 30),
        max_records_per_request=st.integer("maxRecordsPerRequest", 100_000, 1, 10_000_000),
        max_concurrent_rpcs=st.integer("maxConcurrentRpcs", 1000, 1, 100_000),
        max_connections=st.integer("maxConnections", 1000, 1, 1_000_000),
        max_streams_per_connection=st.integer("maxStreamsPerConnection", 100, 1, 100_000),
        max_streams=st.integer("maxStreams", 64, 1, 100_000),
        max_streams_per_client=st.integer("maxStreamsPerClient", 8, 1, 100_000),
        stream_idle_timeout_s=st.duration("streamIdleTimeout", 60.0),
        max_sort_rows=st.integer("maxSortRows", 1_000_000, 1, 1_000_000_000),
        max_nesting_depth=st.integer(
            "maxNestingDepth", DEFAULT_NESTING_DEPTH, MIN_NESTING_DEPTH, MAX_NESTING_DEPTH
        ),
        purge_interval_s=st.duration("purgeInterval", 3600.0),
        tls=st.boolean("tls", True),
        mtls=_mtls(st, "mtls"),
    )
    if storage.mtls.enabled and not storage.tls:
        st.problem("mtls", True, "client certificates need TLS on the port (storage.tls: true)")
    if storage.stream_idle_timeout_s < 1.0:
        st.problem("streamIdleTimeout", storage.stream_idle_timeout_s, "must be at least 1s")
    st.finish()

    ops = top.section("operationsApi")
    net = ops.section("network")
    operations_api = OperationsApiConfig(
        port=net.port("port", DEFAULT_ADMIN_PORT),
        tls=ops.boolean("tls", True),
        mtls=_mtls(ops, "mtls"),
        max_concurrent_rpcs=ops.integer("maxConcurrentRpcs", 16, 1, 100_000),
        max_request_memory=ops.integer(
            "maxRequestMemory", 384 * 1024 * 1024, 16 * 1024 * 1024, 1 << 40
        ),
        max_memory=ops.integer("maxMemory", 512 * 1024 * 1024, 16 * 1024 * 1024, 1 << 40),
    )
    if operations_api.max_memory < operations_api.max_request_memory:
        ops.problem(
            "maxMemory",
            operations_api.max_memory,
            "must be at least operationsApi.maxRequestMemory",
        )
    if operations_api.mtls.enabled and not operations_api.tls:
        ops.problem(
            "mtls", True, "client certificates need TLS on the port (operationsApi.tls: true)"
        )
    net.finish()
    ops.finish()

    replication = _parse_replication(top.section("replication"))

    tl = top.section("tls")
    tls = TlsConfig(
        certificate=_optional_path(tl, "certificate"),
        private_key=_optional_path(tl, "privateKey"),
        certificate_authority=_optional_path(tl, "certificateAuthority"),
        crl=_paths(tl, "crl"),
        crl_fail_closed=tl.boolean("crlFailClosed", True),
    )
    if (tls.certificate is None) != (tls.private_key is None):
        given, missing = ("certificate", "privateKey")
        if tls.certificate is None:
            given, missing = missing, given
        problems.append(f"tls.{missing}: missing (tls.{given} is set; they go together)")
    tl.finish()
    if replication.secure_port is None and tls.certificate is None:
        for key, port_config in (("storage", storage), ("operationsApi", operations_api)):
            if port_config.mtls.enabled:
                problems.append(
                    f"{key}.mtls: client certificates need TLS, and this node is in insecure"
                    " mode (replication.securePort: null without tls.*)"
                )

    ad = top.section("admin")
    admin = AdminBootstrap(
        username=ad.string("username", "admin"), password=ad.optional_string("password")
    )
    if not _NAME_RE.match(admin.username):
        ad.problem("username", admin.username, "not a valid user name")
    ad.finish()

    au = top.section("authentication")
    authentication = AuthenticationConfig(
        lockout_attempts=au.integer("lockoutAttempts", 5, 0, 1000),
        lockout_duration_s=au.duration("lockoutDuration", 300.0),
        initial_backoff_s=au.duration("initialBackoff", 1.0),
        source_lockout_attempts=au.integer("sourceLockoutAttempts", 100, 0, 1_000_000),
        tracked_failures=au.integer("trackedFailures", 100_000, 100, 10_000_000),
        max_concurrent_verifications=au.integer("maxConcurrentVerifications", 2, 1, 64),
    )
    if authentication.initial_backoff_s <= 0:
        au.problem("initialBackoff", authentication.initial_backoff_s, "must be above 0")
    if authentication.lockout_duration_s < authentication.initial_backoff_s:
        au.problem(
            "lockoutDuration",
            authentication.lockout_duration_s,
            "must be at least authentication.initialBackoff",
        )
    au.finish()

    te = top.section("testing")
    testing = TestingConfig(
        clock_offset_ms=te.integer("clockOffsetMs", 0, -(10**12), 10**12),
    )
    te.finish()

    me = top.section("metrics")
    metrics_host = me.optional_string("host")
    listens_anywhere = metrics_host in ("0.0.0.0", "::")
    if metrics_host is not None and not _valid_hostname(metrics_host) and not listens_anywhere:
        me.problem("host", metrics_host, "not a valid address to listen on")
    web_config_file = _optional_path(me, "webConfigFile")
    web = MetricsWebConfig()
    if web_config_file is not None:
        if not web_config_file.is_absolute():
            web_config_file = root / web_config_file
        web, web_problems = parse_web_config(web_config_file)
        problems.extend(f"metrics.webConfigFile: {p}" for p in web_problems)
    metrics = MetricsConfig(
        enabled=me.boolean("enabled", True),
        storage_port=me.port("storagePort", DEFAULT_METRICS_STORAGE_PORT),
        replicator_port=me.port("replicatorPort", DEFAULT_METRICS_REPLICATOR_PORT),
        admin_port=me.port("adminPort", DEFAULT_METRICS_ADMIN_PORT),
        host=metrics_host,
        web_config_file=web_config_file,
        web=web,
    )
    me.finish()

    an = top.section("analytics")
    analytics = AnalyticsConfig(
        enabled=an.boolean("enabled", True),
        raw_retention_s=an.duration("rawRetention", 3600.0),
        aggregate_retention_s=an.duration("aggregateRetention", 7 * 86400.0),
        max_rows=an.integer("maxRows", 10_000, 1, 1_000_000),
    )
    if analytics.raw_retention_s < MIN_RAW_RETENTION_S:
        an.problem("rawRetention", analytics.raw_retention_s, "must be at least 2m")
    if analytics.aggregate_retention_s < 60.0:
        an.problem("aggregateRetention", analytics.aggregate_retention_s, "must be at least 1m")
    an.finish()

    he = top.section("health")
    health = HealthConfig(
        enabled=he.boolean("enabled", True),
        admin_port=he.port("adminPort", DEFAULT_HEALTH_ADMIN_PORT),
        storage_port=he.port("storagePort", DEFAULT_HEALTH_STORAGE_PORT),
        replicator_port=he.port("replicatorPort", DEFAULT_HEALTH_REPLICATOR_PORT),
    )
    he.finish()

    ports = {
        "operationsApi.network.port": operations_api.port,
        "storage.port": storage.port,
    }
    if replication.port is not None:
        ports["replication.port"] = replication.port
    if replication.secure_port is not None:
        ports["replication.securePort"] = replication.secure_port
    if metrics.enabled:
        ports["metrics.storagePort"] = metrics.storage_port
        ports["metrics.replicatorPort"] = metrics.replicator_port
        ports["metrics.adminPort"] = metrics.admin_port
    if health.enabled:
        ports["health.adminPort"] = health.admin_port
        ports["health.storagePort"] = health.storage_port
        ports["health.replicatorPort"] = health.replicator_port
    by_port: dict[int, str] = {}
    for key, port in ports.items():
        if port in by_port:
            problems.append(f"{key}: port {port} is already used by {by_port[port]}")
        by_port[port] = key

    top.finish()
    if problems:
        raise ConfigError(problems, str(source) if source else "configuration")
    return ShoalConfig(
        root_path=root,
        host=host,
        replication=replication,
        storage=storage,
        operations_api=operations_api,
        logging=logging_config,
        tls=tls,
        admin=admin,
        authentication=authentication,
        testing=testing,
        metrics=metrics,
        analytics=analytics,
        health=health,
        sockets_path=sockets,
        source=source,
    )


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> ShoalConfig:
    """Load and validate ``shoal.yaml``; relative ``rootPath`` is relative to its folder."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {file}: {exc.strerror}"], str(file)) from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(file)) from exc
    if not isinstance(data, Mapping):
        raise ConfigError(["the file must hold a mapping of keys"], str(file))
    return parse_config(data, env=env, base_dir=file.resolve().parent, source=file)
