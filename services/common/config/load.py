"""Loading ``shoal.yaml``: every section read and checked at once (``parse_config``),
each problem naming its dotted key, and the checks that span sections."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from services.common.config.model import (
    DEFAULT_HOST,
    DEFAULT_ROOT_PATH,
    MAX_SOCKET_PATH,
    MIN_RAW_RETENTION_S,
    MTLS_USER_COMMON_NAME,
    SOCKET_SUFFIX,
    AdminBootstrap,
    AnalyticsConfig,
    AuthenticationConfig,
    HealthConfig,
    LoggingConfig,
    MetricsConfig,
    MtlsConfig,
    OperationsApiConfig,
    ReplicationConfig,
    ShoalConfig,
    StorageConfig,
    TestingConfig,
    TlsConfig,
    socket_path_fits,
)
from services.common.config.replication import NAME_RE, parse_replication, valid_hostname
from services.common.config.settings import ConfigError, Later, Reader, read_section
from services.common.metrics_web import MetricsWebConfig, parse_web_config


def _mtls(reader: Reader, name: str) -> MtlsConfig:
    """``false`` / ``true`` / ``{required, user}`` (every sub-key is read, so environment
    overrides such as ``SHOAL_STORAGE_MTLS_REQUIRED`` work too)."""
    present, value = reader.raw(name)
    enabled = present and (value is True or isinstance(value, Mapping))
    if present and value is not None and not isinstance(value, bool | Mapping):
        reader.problem(name, value, "expected true, false or {required: true, user: ...}")
    sub = Reader(
        value if isinstance(value, Mapping) else {},
        reader.key(name),
        reader.problems,
        reader.env,
        reader.trace,
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


def _root(top: Reader, base_dir: Path | None) -> tuple[Path, str, Path | None]:
    """``rootPath``, ``host`` and ``socketsPath``."""
    root = Path(top.string("rootPath", DEFAULT_ROOT_PATH)).expanduser()
    if not root.is_absolute():
        root = (base_dir or Path.cwd()) / root
    host = top.string("host", DEFAULT_HOST)
    if not valid_hostname(host) and host not in ("0.0.0.0", "::"):
        top.problem("host", host, "not a valid address to listen on")
    sockets: Path | None = None
    raw_sockets = top.optional_string("socketsPath")
    if raw_sockets is not None:
        sockets = Path(raw_sockets).expanduser()
        if not sockets.is_absolute():
            sockets = root / sockets
    folder = sockets if sockets is not None else root / "sockets"
    longest = folder / ("replicator" + SOCKET_SUFFIX)
    if sockets is not None and not socket_path_fits(folder):
        top.problem(
            "socketsPath",
            str(longest.parent),
            f"a socket path there would be {len(str(longest).encode())} bytes, more than the"
            f" {MAX_SOCKET_PATH} a Unix socket allows: set socketsPath to a shorter folder",
        )
    return root, host, sockets


def _logging(top: Reader) -> LoggingConfig:
    lg = top.section("logging")
    config = read_section(LoggingConfig, lg)
    lg.finish()
    return config


def _storage(top: Reader) -> StorageConfig:
    st = top.section("storage")
    storage = read_section(StorageConfig, st, mtls=Later(lambda: _mtls(st, "mtls")))
    if storage.mtls.enabled and not storage.tls:
        st.problem("mtls", True, "client certificates need TLS on the port (storage.tls: true)")
    if storage.stream_idle_timeout_s < 1.0:
        st.problem("streamIdleTimeout", storage.stream_idle_timeout_s, "must be at least 1s")
    st.finish()
    return storage


def _operations_api(top: Reader) -> OperationsApiConfig:
    ops = top.section("operationsApi")
    net = ops.section("network")  # operationsApi.network.port
    config = read_section(OperationsApiConfig, ops, mtls=Later(lambda: _mtls(ops, "mtls")))
    if config.max_memory < config.max_request_memory:
        ops.problem(
            "maxMemory",
            config.max_memory,
            "must be at least operationsApi.maxRequestMemory",
        )
    if config.mtls.enabled and not config.tls:
        ops.problem(
            "mtls", True, "client certificates need TLS on the port (operationsApi.tls: true)"
        )
    if config.http_timeout_s < 1.0:
        net.problem("timeout", config.http_timeout_s, "must be at least 1s")
    net.finish()
    ops.finish()
    return config


def _tls(top: Reader) -> TlsConfig:
    tl = top.section("tls")
    tls = read_section(TlsConfig, tl)
    if (tls.certificate is None) != (tls.private_key is None):
        given, missing = ("certificate", "privateKey")
        if tls.certificate is None:
            given, missing = missing, given
        top.problems.append(f"tls.{missing}: missing (tls.{given} is set; they go together)")
    tl.finish()
    return tls


def _check_insecure_mtls(
    problems: list[str],
    replication: ReplicationConfig,
    tls: TlsConfig,
    ports: Mapping[str, StorageConfig | OperationsApiConfig],
) -> None:
    """Client certificates need TLS, which a node in insecure mode does not serve."""
    if replication.secure_port is None and tls.certificate is None:
        for key, port_config in ports.items():
            if port_config.mtls.enabled:
                problems.append(
                    f"{key}.mtls: client certificates need TLS, and this node is in insecure"
                    " mode (replication.securePort: null without tls.*)"
                )


def _admin(top: Reader) -> AdminBootstrap:
    ad = top.section("admin")
    admin = read_section(AdminBootstrap, ad)
    if not NAME_RE.match(admin.username):
        ad.problem("username", admin.username, "not a valid user name")
    ad.finish()
    return admin


def _authentication(top: Reader) -> AuthenticationConfig:
    au = top.section("authentication")
    config = read_section(AuthenticationConfig, au)
    if config.initial_backoff_s <= 0:
        au.problem("initialBackoff", config.initial_backoff_s, "must be above 0")
    for key, value in (
        ("operationTokenTimeout", config.operation_token_timeout_s),
        ("refreshTokenTimeout", config.refresh_token_timeout_s),
    ):
        if value < 1.0:
            au.problem(key, value, "must be at least 1s")
    if config.lockout_duration_s < config.initial_backoff_s:
        au.problem(
            "lockoutDuration",
            config.lockout_duration_s,
            "must be at least authentication.initialBackoff",
        )
    au.finish()
    return config


def _testing(top: Reader) -> TestingConfig:
    te = top.section("testing")
    config = read_section(TestingConfig, te)
    te.finish()
    return config


def _metrics(top: Reader, root: Path) -> MetricsConfig:
    me = top.section("metrics")
    metrics_host = me.optional_string("host")
    listens_anywhere = metrics_host in ("0.0.0.0", "::")
    if metrics_host is not None and not valid_hostname(metrics_host) and not listens_anywhere:
        me.problem("host", metrics_host, "not a valid address to listen on")
    web_config_file = me.optional_path("webConfigFile")
    web = MetricsWebConfig()
    if web_config_file is not None:
        if not web_config_file.is_absolute():
            web_config_file = root / web_config_file
        web, web_problems = parse_web_config(web_config_file)
        top.problems.extend(f"metrics.webConfigFile: {p}" for p in web_problems)
    metrics = read_section(
        MetricsConfig, me, host=metrics_host, web_config_file=web_config_file, web=web
    )
    me.finish()
    return metrics


def _analytics(top: Reader) -> AnalyticsConfig:
    an = top.section("analytics")
    analytics = read_section(AnalyticsConfig, an)
    if analytics.raw_retention_s < MIN_RAW_RETENTION_S:
        an.problem("rawRetention", analytics.raw_retention_s, "must be at least 2m")
    if analytics.aggregate_retention_s < 60.0:
        an.problem("aggregateRetention", analytics.aggregate_retention_s, "must be at least 1m")
    an.finish()
    return analytics


def _health(top: Reader) -> HealthConfig:
    he = top.section("health")
    health = read_section(HealthConfig, he)
    he.finish()
    return health


def _check_ports(problems: list[str], config: ShoalConfig) -> None:
    """No two of the node's listening ports are the same."""
    ports = {
        "operationsApi.network.port": config.operations_api.port,
        "storage.port": config.storage.port,
    }
    if config.operations_api.http_port is not None:
        ports["operationsApi.network.httpPort"] = config.operations_api.http_port
    replication, metrics, health = config.replication, config.metrics, config.health
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
    top = Reader(data, "", problems, environment, trace)
    root, host, sockets = _root(top, base_dir)
    logging_config = _logging(top)
    storage = _storage(top)
    operations_api = _operations_api(top)
    replication = parse_replication(top.section("replication"))
    tls = _tls(top)
    ports: dict[str, StorageConfig | OperationsApiConfig] = {
        "storage": storage,
        "operationsApi": operations_api,
    }
    _check_insecure_mtls(problems, replication, tls, ports)
    config = ShoalConfig(
        root_path=root,
        host=host,
        replication=replication,
        storage=storage,
        operations_api=operations_api,
        logging=logging_config,
        tls=tls,
        admin=_admin(top),
        authentication=_authentication(top),
        testing=_testing(top),
        metrics=_metrics(top, root),
        analytics=_analytics(top),
        health=_health(top),
        sockets_path=sockets,
        source=source,
    )
    _check_ports(problems, config)
    top.finish()
    if problems:
        raise ConfigError(problems, str(source) if source else "configuration")
    return config


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
