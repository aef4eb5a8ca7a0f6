"""The typed configuration of a node: one frozen dataclass per section of ``shoal.yaml``.
Each field read from the file names its key, default and bounds once, on the field
(``settings.py``); the fields without a setting are read by code in ``load.py`` and
``replication.py``."""

from __future__ import annotations

import hashlib
import ipaddress
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.common.config import settings as setting
from services.common.jsoninput import (
    DEFAULT_NESTING_DEPTH,
    MAX_NESTING_DEPTH,
    MIN_NESTING_DEPTH,
)
from services.common.metrics_web import MetricsWebConfig

DEFAULT_ROOT_PATH = "shoal-data"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 9925
DEFAULT_OPERATIONS_HTTP_PORT = 9924
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
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "notify")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Replicates:
    """Controlled flow with one peer (Harper's ``replicates: {sends, receives}``)."""

    sends: bool = setting.boolean("sends", True)
    receives: bool = setting.boolean("receives", True)


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
    # Flows only between nodes of the same replication.shard.
    sharded: bool = setting.boolean("sharded", False)
    # Residents per record; None: every node in full.
    replicate_to: int | None = setting.optional_integer("replicateTo", 1, 1000)


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

    level: str = setting.choice("level", "info", LOG_LEVELS)
    format: str = setting.choice("format", "text", ("text", "json"))
    audit_retention_s: float = setting.duration("auditRetention", 3 * 86400.0)


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

    port: int = setting.port("port", DEFAULT_STORAGE_PORT)
    path: Path = setting.path("path", "database")
    sync_writes: bool = setting.boolean("syncWrites", False)
    max_message_bytes: int = setting.integer("maxMessageBytes", 16 * MIB, MIB, 1 << 30)
    max_records_per_request: int = setting.integer("maxRecordsPerRequest", 100_000, 1, 10_000_000)
    max_concurrent_rpcs: int = setting.integer("maxConcurrentRpcs", 1000, 1, 100_000)
    # Client connections at once (more are closed at accept).
    max_connections: int = setting.integer("maxConnections", 1000, 1, 1_000_000)
    # HTTP/2 concurrent streams of one connection.
    max_streams_per_connection: int = setting.integer("maxStreamsPerConnection", 100, 1, 100_000)
    # Streamed responses (searches, log reads) served at once...
    max_streams: int = setting.integer("maxStreams", 64, 1, 100_000)
    # ...of them from one source address.
    max_streams_per_client: int = setting.integer("maxStreamsPerClient", 8, 1, 100_000)
    # A stream whose client reads nothing this long ends.
    stream_idle_timeout_s: float = setting.duration("streamIdleTimeout", 60.0)
    max_sort_rows: int = setting.integer("maxSortRows", 1_000_000, 1, 1_000_000_000)
    # Levels of arrays and objects a JSON document may nest (services/common/jsoninput.py).
    max_nesting_depth: int = setting.integer(
        "maxNestingDepth", DEFAULT_NESTING_DEPTH, MIN_NESTING_DEPTH, MAX_NESTING_DEPTH
    )
    purge_interval_s: float = setting.duration("purgeInterval", 3600.0)
    # Serve TLS when the node has TLS material; false: plaintext.
    tls: bool = setting.boolean("tls", True)
    mtls: MtlsConfig = field(default_factory=MtlsConfig)  # client certificates


@dataclass(frozen=True)
class OperationsApiConfig:
    """``operationsApi.*``: the admin service."""

    port: int = setting.port("network.port", DEFAULT_ADMIN_PORT)
    # Harper's HTTP form of the operations API (POST / with a JSON body); null: closed.
    http_port: int | None = setting.nullable_port("network.httpPort", DEFAULT_OPERATIONS_HTTP_PORT)
    # The longest an HTTP request may take, from its first byte to its answer.
    http_timeout_s: float = setting.duration("network.timeout", 120.0)
    # Serve TLS when the node has TLS material (both ports); false: plaintext.
    tls: bool = setting.boolean("tls", True)
    mtls: MtlsConfig = field(default_factory=MtlsConfig)  # client certificates
    # Calls served at once; more get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = setting.integer("maxConcurrentRpcs", 16, 1, 100_000)
    # Estimated memory of one Execute, at most...
    max_request_memory: int = setting.integer("maxRequestMemory", 384 * MIB, 16 * MIB, 1 << 40)
    # ...and of the Execute calls in progress together.
    max_memory: int = setting.integer("maxMemory", 512 * MIB, 16 * MIB, 1 << 40)


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
    max_clock_skew_s: float = setting.duration("maxClockSkew", 60.0)
    enable_root_cas: bool = setting.boolean("enableRootCAs", False)
    heartbeat_interval_s: float = setting.duration("heartbeatInterval", 2.0)
    peer_timeout_s: float = setting.duration("peerTimeout", 10.0)
    reconnect_delay_s: float = setting.duration("reconnectDelay", 0.2)
    reconnect_max_delay_s: float = setting.duration("reconnectMaxDelay", 10.0)
    window_batches: int = setting.integer("windowBatches", 8, 1, 1024)
    window_bytes: int = setting.integer("windowBytes", 8 * MIB, 65536, 1 << 30)
    batch_transactions: int = setting.integer("batchTransactions", 500, 1, 100_000)
    batch_bytes: int = setting.integer("batchBytes", MIB, 1024, 64 * MIB)
    # Rows per second of a copy; 0: as fast as possible.
    copy_rows_per_second: int = setting.integer("copyRowsPerSecond", 0, 0, 100_000_000)
    batch_linger_s: float = setting.duration("batchLinger", 0.002)
    url: str | None = None  # how peers reach this node; None: derived from hostname and ports
    # Also dial every member of system.hdb_nodes, not only routes.
    gossip: bool = setting.boolean("gossip", True)
    shard: int | None = setting.optional_integer("shard", 0, 1_000_000)
    # Re-home a down member's records after this long; 0: never.
    residency_repair_after_s: float = setting.duration("residencyRepairAfter", 3600.0)

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

    certificate: Path | None = setting.optional_path("certificate")
    private_key: Path | None = setting.optional_path("privateKey")
    certificate_authority: Path | None = setting.optional_path("certificateAuthority")
    # Certificate revocation lists (PEM or DER), read per handshake.
    crl: tuple[Path, ...] = setting.paths("crl")
    # Refuse every peer while a CRL cannot be read.
    crl_fail_closed: bool = setting.boolean("crlFailClosed", True)


@dataclass(frozen=True)
class AuthenticationConfig:
    """``authentication.*``: sign-in throttling of the storage service, per user name and
    source address (see services/storage/throttle.py)."""

    # Failures of one name from one address before waits; 0: never.
    lockout_attempts: int = setting.integer("lockoutAttempts", 5, 0, 1000)
    # The longest wait, and how long failures are remembered.
    lockout_duration_s: float = setting.duration("lockoutDuration", 300.0)
    # The first wait; it doubles with each further failure.
    initial_backoff_s: float = setting.duration("initialBackoff", 1.0)
    # Failures from one address (any names); 0: never.
    source_lockout_attempts: int = setting.integer("sourceLockoutAttempts", 100, 0, 1_000_000)
    # (name, address) and address entries kept at most.
    tracked_failures: int = setting.integer("trackedFailures", 100_000, 100, 10_000_000)
    # Scrypt checks at once (16 MiB each).
    max_concurrent_verifications: int = setting.integer("maxConcurrentVerifications", 2, 1, 64)
    # Lifetimes of the tokens of create_authentication_tokens (Harper's defaults).
    operation_token_timeout_s: float = setting.duration("operationTokenTimeout", 86400.0)
    refresh_token_timeout_s: float = setting.duration("refreshTokenTimeout", 30 * 86400.0)


@dataclass(frozen=True)
class AdminBootstrap:
    """``admin.*``: the super user created at first start (or SHOAL_ADMIN_* env)."""

    username: str = setting.string("username", "admin")
    password: str | None = setting.optional_string("password")


@dataclass(frozen=True)
class TestingConfig:
    """``testing.*``: knobs for fault tests; never set in production."""

    clock_offset_ms: int = setting.integer("clockOffsetMs", 0, -(10**12), 10**12)
    # How long a join (add_node with credentials) waits between installing its new
    # certificate and recording the target: time for the replication it starts to
    # record the target first.
    join_record_delay_ms: int = setting.integer("joinRecordDelayMs", 0, 0, 600_000)


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics.*``: the Prometheus endpoint of each service (on ``metrics.host``, by
    default the node's ``host``), with an optional exporter-style web config."""

    enabled: bool = setting.boolean("enabled", True)
    storage_port: int = setting.port("storagePort", DEFAULT_METRICS_STORAGE_PORT)
    replicator_port: int = setting.port("replicatorPort", DEFAULT_METRICS_REPLICATOR_PORT)
    admin_port: int = setting.port("adminPort", DEFAULT_METRICS_ADMIN_PORT)
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

    enabled: bool = setting.boolean("enabled", True)
    admin_port: int = setting.port("adminPort", DEFAULT_HEALTH_ADMIN_PORT)
    storage_port: int = setting.port("storagePort", DEFAULT_HEALTH_STORAGE_PORT)
    replicator_port: int = setting.port("replicatorPort", DEFAULT_HEALTH_REPLICATOR_PORT)

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

    enabled: bool = setting.boolean("enabled", True)
    raw_retention_s: float = setting.duration("rawRetention", 3600.0)
    aggregate_retention_s: float = setting.duration("aggregateRetention", 7 * 86400.0)
    # The most rows one get_analytics answers.
    max_rows: int = setting.integer("maxRows", 10_000, 1, 1_000_000)


MIN_RAW_RETENTION_S = 120.0  # a minute is aggregated once it is over: keep it until then


def socket_path_fits(folder: Path) -> bool:
    """Whether every socket of a node fits a Unix socket path in ``folder``."""
    return len(str(folder / ("replicator" + SOCKET_SUFFIX)).encode()) <= MAX_SOCKET_PATH


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
        if socket_path_fits(folder):
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
