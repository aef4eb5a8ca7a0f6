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

The modules: ``model.py`` (the dataclasses, each setting's key, default and bounds written
once on its field), ``settings.py`` (the field settings and the one generic reader),
``replication.py`` (routes, databases and the replication section), ``load.py``
(``parse_config``, ``load_config`` and the checks that span sections).
"""

from services.common.config.load import load_config, parse_config
from services.common.config.model import (
    ALL_DATABASES,
    DEFAULT_ADMIN_PORT,
    DEFAULT_HEALTH_ADMIN_PORT,
    DEFAULT_HEALTH_REPLICATOR_PORT,
    DEFAULT_HEALTH_STORAGE_PORT,
    DEFAULT_HOST,
    DEFAULT_METRICS_ADMIN_PORT,
    DEFAULT_METRICS_REPLICATOR_PORT,
    DEFAULT_METRICS_STORAGE_PORT,
    DEFAULT_REPLICATION_PORT,
    DEFAULT_REPLICATION_SECURE_PORT,
    DEFAULT_ROOT_PATH,
    DEFAULT_STORAGE_PORT,
    MAX_SOCKET_PATH,
    MIN_RAW_RETENTION_S,
    MTLS_USER_COMMON_NAME,
    SOCKET_SUFFIX,
    AdminBootstrap,
    AnalyticsConfig,
    AuthenticationConfig,
    HealthConfig,
    IPNetwork,
    LoggingConfig,
    MetricsConfig,
    MtlsConfig,
    OperationsApiConfig,
    ReplicatedDatabase,
    Replicates,
    ReplicationConfig,
    Route,
    ShoalConfig,
    StorageConfig,
    Subscription,
    TestingConfig,
    TlsConfig,
)
from services.common.config.replication import parse_route_url, parse_time
from services.common.config.settings import ENV_PREFIX, ConfigError, parse_duration

__all__ = [
    "ALL_DATABASES",
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_HEALTH_ADMIN_PORT",
    "DEFAULT_HEALTH_REPLICATOR_PORT",
    "DEFAULT_HEALTH_STORAGE_PORT",
    "DEFAULT_HOST",
    "DEFAULT_METRICS_ADMIN_PORT",
    "DEFAULT_METRICS_REPLICATOR_PORT",
    "DEFAULT_METRICS_STORAGE_PORT",
    "DEFAULT_REPLICATION_PORT",
    "DEFAULT_REPLICATION_SECURE_PORT",
    "DEFAULT_ROOT_PATH",
    "DEFAULT_STORAGE_PORT",
    "ENV_PREFIX",
    "MAX_SOCKET_PATH",
    "MIN_RAW_RETENTION_S",
    "MTLS_USER_COMMON_NAME",
    "SOCKET_SUFFIX",
    "AdminBootstrap",
    "AnalyticsConfig",
    "AuthenticationConfig",
    "ConfigError",
    "HealthConfig",
    "IPNetwork",
    "LoggingConfig",
    "MetricsConfig",
    "MtlsConfig",
    "OperationsApiConfig",
    "ReplicatedDatabase",
    "Replicates",
    "ReplicationConfig",
    "Route",
    "ShoalConfig",
    "StorageConfig",
    "Subscription",
    "TestingConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_route_url",
    "parse_time",
]
