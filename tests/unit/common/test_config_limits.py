"""The limit settings of shoal.yaml: sign-in throttling, storage streams, the admin
service's memory budget and the metrics endpoints; every problem names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.config import ConfigError, parse_config


def parse(data: dict[str, Any]) -> Any:
    return parse_config({"replication": {"hostname": "server-one"}, **data}, env={})


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


def test_defaults() -> None:
    config = parse({})
    auth = config.authentication
    assert (auth.initial_backoff_s, auth.source_lockout_attempts) == (1.0, 100)
    assert (auth.tracked_failures, auth.max_concurrent_verifications) == (100_000, 2)
    storage = config.storage
    assert (storage.max_connections, storage.max_streams_per_connection) == (1000, 100)
    assert (storage.max_streams, storage.max_streams_per_client) == (64, 8)
    assert storage.stream_idle_timeout_s == 60.0
    api = config.operations_api
    assert (api.max_concurrent_rpcs, api.max_request_memory, api.max_memory) == (
        16,
        384 * 1024 * 1024,
        512 * 1024 * 1024,
    )
    assert (config.metrics.host, config.metrics.web_config_file) == (None, None)


def test_bad_values_name_their_keys() -> None:
    text = problems(
        {
            "authentication": {"initialBackoff": "10m", "lockoutDuration": "1m"},
            "storage": {"maxStreams": 0, "streamIdleTimeout": "10ms"},
            "operationsApi": {"maxRequestMemory": 1 << 30, "maxMemory": 1 << 29},
            "metrics": {"host": "not an address"},
        }
    )
    assert "authentication.lockoutDuration: must be at least authentication.initialBackoff" in text
    assert "storage.maxStreams: must be between 1 and 100000" in text
    assert "storage.streamIdleTimeout: must be at least 1s" in text
    assert "operationsApi.maxMemory: must be at least operationsApi.maxRequestMemory" in text
    assert "metrics.host: not a valid address to listen on" in text


def test_the_metrics_web_config_is_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "m.crt").write_text("x")
    (tmp_path / "m.key").write_text("x")
    web = tmp_path / "web.yaml"
    web.write_text(
        "tls_server_config: {cert_file: m.crt, key_file: m.key}\n"
        "basic_auth_users: {prometheus: $2y$10$abcdefghijklmnopqrstuu}\n"
    )
    config = parse({"rootPath": str(tmp_path), "metrics": {"webConfigFile": "web.yaml"}})
    assert config.metrics.web_config_file == web
    assert config.metrics.web.tls is not None
    assert config.metrics.web.tls.cert_file == tmp_path / "m.crt"
    assert [name for name, _ in config.metrics.web.basic_auth_users] == ["prometheus"]

    web.write_text(
        "tls_server_config: {cert_file: m.crt, client_auth_type: RequireAndVerifyClientCert}\n"
        "basic_auth_users: {prometheus: secret}\n"
        "extra: 1\n"
    )
    text = problems({"rootPath": str(tmp_path), "metrics": {"webConfigFile": "web.yaml"}})
    assert "metrics.webConfigFile:" in text
    for key in (
        "tls_server_config.key_file",
        "tls_server_config.client_ca_file",
        "basic_auth_users.prometheus",
        "extra: unknown key",
    ):
        assert key in text, key
    assert "secret" not in text  # a password given instead of a hash is not repeated
    missing = problems({"rootPath": str(tmp_path), "metrics": {"webConfigFile": "none.yaml"}})
    assert "cannot read" in missing and "none.yaml" in missing
