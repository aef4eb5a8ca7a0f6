"""The CLI's connection settings: flags, then the environment, then cli.yaml, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from services.cli.settings import Settings


@pytest.fixture
def cli_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("SHOAL_NODE", "SHOAL_USERNAME", "SHOAL_PASSWORD", "SHOAL_CA"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "cli.yaml"
    path.write_text("node: 10.0.0.1\nusername: alice\npassword: from-file\nca: ca.crt\n")
    monkeypatch.setenv("SHOAL_CLI_CONFIG", str(path))
    return path


def test_cli_yaml_fills_what_flags_and_environment_leave(cli_yaml: Path) -> None:
    settings = Settings.load()
    assert settings == Settings("10.0.0.1", "alice", "from-file", cli_yaml.parent / "ca.crt")
    assert settings.given(node="10.0.0.2").node == "10.0.0.2"


def test_environment_beats_cli_yaml(cli_yaml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_USERNAME", "bob")
    monkeypatch.setenv("SHOAL_PASSWORD", "")  # set, though empty: cli.yaml's is not used
    settings = Settings.load(ca=Path("flag.crt"))
    assert (settings.username, settings.password) == ("admin", "")
    assert settings.ca == Path("flag.crt")


def test_defaults_without_a_cli_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_CLI_CONFIG", str(tmp_path / "absent.yaml"))
    assert Settings.load() == Settings("127.0.0.1", "admin", "", None)


def test_a_cli_yaml_with_unknown_keys_is_refused(cli_yaml: Path) -> None:
    cli_yaml.write_text("host: x\n")
    result = CliRunner().invoke(app, ["user", "list"])
    assert result.exit_code == 2
    assert "expected a mapping with node, username, password, ca" in result.output


def test_a_command_without_a_password_says_where_to_give_it(cli_yaml: Path) -> None:
    cli_yaml.write_text("node: 10.0.0.1\n")
    result = CliRunner().invoke(app, ["user", "list", "-u", "bob"])
    assert result.exit_code == 2
    assert "no password" in result.output


def test_output_takes_table_or_json_only(cli_yaml: Path) -> None:
    result = CliRunner().invoke(app, ["user", "list", "-o", "yaml"])
    assert result.exit_code == 2
