"""set_configuration's key resolution and validation (services/admin/configuration.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.admin.configuration import changed_config, settings_from
from services.common.errors import InvalidArgument

CURRENT = {"rootPath": "/data", "replication": {"hostname": "one"}, "logging": {"level": "info"}}


def test_dotted_and_underscore_keys_resolve_case_insensitively(tmp_path: Path) -> None:
    data, keys = changed_config(
        CURRENT,
        {"logging_level": "debug", "Replication.HeartbeatInterval": 1, "storage.syncWrites": True},
        tmp_path,
    )
    assert keys == ["logging.level", "replication.heartbeatInterval", "storage.syncWrites"]
    assert data["logging"]["level"] == "debug"
    assert data["replication"] == {"hostname": "one", "heartbeatInterval": 1}
    assert data["storage"] == {"syncWrites": True}
    assert CURRENT["logging"] == {"level": "info"}  # the input is not changed


def test_null_removes_a_key(tmp_path: Path) -> None:
    data, _ = changed_config(CURRENT, {"logging.level": None}, tmp_path)
    assert data["logging"] == {}


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"logging_level": "loud"}, "logging.level: must be one of"),
        ({"storage_port": 9925}, "port 9925 is already used"),
        ({"logging_colour": "red"}, "'logging_colour' is not a configuration key"),
        ({"admin_password": "x"}, "admin.password cannot be set here"),
        ({"replication.routes": []}, "replication.routes cannot be set here"),
        ({"replication_hostname": "two"}, "replication.hostname cannot be set here"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(
    tmp_path: Path, settings: dict[str, object], expected: str
) -> None:
    with pytest.raises(InvalidArgument, match=expected):
        changed_config(CURRENT, settings, tmp_path)


def test_the_operation_fields_are_not_settings() -> None:
    body = {"operation": "set_configuration", "replicated": True, "logging_level": "warn"}
    assert settings_from(body) == {"logging_level": "warn"}
    with pytest.raises(InvalidArgument, match="no configuration key"):
        settings_from({"operation": "set_configuration", "replicated": True})
