"""A node's TLS at start (services/common/node_tls.py, tls.with_tls_files) and the keys
of its client ports and health ports (services/common/config)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from services.common import certs
from services.common.config import ConfigError, parse_config
from services.common.errors import FailedPrecondition
from services.common.node_tls import names_host, prepare
from services.common.tls import with_tls_files


def _config(tmp_path: Path, **extra: Any) -> Any:
    data = {"rootPath": str(tmp_path), "replication": {"hostname": "server-one"}, **extra}
    return parse_config(data, env={})


def test_health_and_client_port_keys_have_their_defaults(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.health.enabled is True
    ports = {s: config.health.port(s) for s in ("admin", "storage", "replicator")}
    assert ports == {"admin": 9935, "storage": 9936, "replicator": 9937}
    assert config.storage.tls is True and config.operations_api.tls is True
    off = _config(
        tmp_path,
        storage={"tls": False},
        operationsApi={"tls": False, "network": {"port": 9000}},
        health={"enabled": False, "storagePort": 9926},  # closed ports never clash
    )
    assert off.storage.tls is False and off.operations_api.tls is False
    assert off.operations_api.port == 9000 and off.health.enabled is False


def test_bad_health_and_tls_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _config(
            tmp_path,
            health={"storagePort": 9926, "adminPort": 0, "probe": 1},
            storage={"tls": "yes"},
            tls={"certificate": "keys/node.crt"},
        )
    problems = info.value.problems
    assert "health.storagePort: port 9926 is already used by storage.port" in problems
    assert "health.adminPort: must be between 1 and 65535 (got 0)" in problems
    assert "health.probe: unknown key" in problems
    assert "storage.tls: expected true or false (got 'yes')" in problems
    assert "tls.privateKey: missing (tls.certificate is set; they go together)" in problems


def test_configured_and_insecure_nodes_generate_nothing(tmp_path: Path) -> None:
    insecure = _config(tmp_path, replication={"hostname": "server-one", "securePort": None})
    assert with_tls_files(insecure) is insecure
    assert prepare(insecure).material is None
    assert not prepare(insecure).serves_tls("storage")
    configured = _config(
        tmp_path, tls={"certificate": "mine/node.crt", "privateKey": "mine/node.key"}
    )
    assert with_tls_files(configured) is configured
    assert not (tmp_path / "keys").exists()


def test_a_node_without_tls_generates_its_files_once(tmp_path: Path) -> None:
    config = _config(tmp_path)
    node = prepare(config)
    assert node.config.tls.certificate == Path("keys/node.crt")
    assert node.config.tls.private_key == Path("keys/node.key")
    assert node.config.tls.certificate_authority == Path("keys/ca.crt")
    assert node.material is not None
    assert node.material.certificate == (tmp_path / "keys" / "node.crt").read_bytes()
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "keys" / "ca.key").stat().st_mode) == 0o600
    assert prepare(config).material == node.material  # reused
    assert node.serves_tls("storage") and node.serves_tls("admin")
    with pytest.raises(ValueError, match="not a client port"):
        node.serves_tls("replicator")


def test_the_node_name_is_checked_when_the_dialed_host_is_not_in_the_certificate(
    tmp_path: Path,
) -> None:
    authority = certs.create_authority("Test-CA")
    by_name = certs.issue_node_certificate(authority, "server-one").certificate_pem
    assert names_host(by_name, "server-one") and names_host(by_name, "SERVER-ONE")
    assert not names_host(by_name, "127.0.0.1")
    by_address = certs.issue_node_certificate(authority, "10.0.0.1").certificate_pem
    assert names_host(by_address, "10.0.0.1") and not names_host(by_address, "10.0.0.2")

    node = prepare(_config(tmp_path, host="0.0.0.0"))  # processes dial 127.0.0.1
    assert node.target_name_override("127.0.0.1:9926") == "server-one"
    assert node.target_name_override("[::1]:9926") == "server-one"
    named = prepare(
        _config(tmp_path / "b", host="127.0.0.5", replication={"hostname": "127.0.0.5"})
    )
    assert named.target_name_override("127.0.0.5:9926") is None


def test_unusable_files_are_a_clear_failure(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "ca.crt").write_text("not a certificate")
    with pytest.raises(FailedPrecondition, match="cannot use this node's TLS files"):
        prepare(_config(tmp_path))
