"""The ``authentication`` section of shoal.yaml."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.config import ConfigError, parse_config


def parse(section: Any, env: dict[str, str] | None = None) -> Any:
    data: dict[str, Any] = {"replication": {"hostname": "server-one"}}
    if section is not None:
        data["authentication"] = section
    return parse_config(data, env=env or {}).authentication


def test_defaults_and_values() -> None:
    assert (parse(None).lockout_attempts, parse(None).lockout_duration_s) == (5, 300.0)
    parsed = parse({"lockoutAttempts": 0, "lockoutDuration": "1s"})
    assert (parsed.lockout_attempts, parsed.lockout_duration_s) == (0, 1.0)
    from_env = parse(None, {"SHOAL_AUTHENTICATION_LOCKOUTATTEMPTS": "3"})
    assert from_env.lockout_attempts == 3


def test_bad_values_are_reported_by_key() -> None:
    with pytest.raises(ConfigError) as error:
        parse({"lockoutAttempts": -1, "lockoutDuration": "soon", "lockout": 1})
    text = "\n".join(error.value.problems)
    assert "authentication.lockoutAttempts" in text
    assert "authentication.lockoutDuration" in text
    assert "authentication.lockout: unknown key" in text
