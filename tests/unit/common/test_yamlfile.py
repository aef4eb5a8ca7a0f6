"""Rewriting shoal.yaml (routes, set_configuration) keeps the operator's comments, key
order and layout (services/common/yamlfile.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.admin.configuration import changed_config, write_config
from services.common import yamlfile
from services.common.config import Route, load_config
from services.common.routes import write_routes

SHOAL_YAML = """\
# node1: the first node of the cluster (keep this header)
rootPath: .                 # data, keys and logs live here
host: 127.0.0.1

replication:
  hostname: 127.0.0.1       # this node's name
  # Peers dialled at start-up:
  routes: [127.0.0.2, 127.0.0.3]   # the other two nodes
  heartbeatInterval: 2

logging:
  level: info    # raise to debug while investigating
  # stdStreams: true
"""


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "shoal.yaml"
    path.write_text(SHOAL_YAML, encoding="utf-8")
    return path


def _comments(text: str) -> list[str]:
    return [line[line.index("#") :] for line in text.splitlines() if "#" in line]


def test_route_rewrite_keeps_comments(tmp_path: Path) -> None:
    path = _config(tmp_path)
    write_routes(path, [Route("127.0.0.2"), Route("127.0.0.4", port=9933)])
    text = path.read_text(encoding="utf-8")
    assert _comments(text) == _comments(SHOAL_YAML)
    assert text.startswith("# node1: the first node of the cluster (keep this header)\n")
    assert "rootPath: .                 # data, keys and logs live here\n" in text
    data = yaml.safe_load(text)
    assert data["replication"]["routes"] == ["127.0.0.2", {"hostname": "127.0.0.4", "port": 9933}]
    assert data["replication"]["heartbeatInterval"] == 2
    config = load_config(path)
    assert [r.hostname for r in config.replication.routes] == ["127.0.0.2", "127.0.0.4"]


def test_set_configuration_rewrite_keeps_comments(tmp_path: Path) -> None:
    path = _config(tmp_path)
    data, keys = changed_config(
        yamlfile.load(path), {"logging_level": "debug", "storage.syncWrites": True}, tmp_path
    )
    assert keys == ["logging.level", "storage.syncWrites"]
    write_config(path, data)
    text = path.read_text(encoding="utf-8")
    assert _comments(text) == _comments(SHOAL_YAML)
    assert "  level: debug   # raise to debug while investigating\n" in text  # same column
    assert "  routes: [127.0.0.2, 127.0.0.3]   # the other two nodes\n" in text
    assert list(yaml.safe_load(text)) == ["rootPath", "host", "replication", "logging", "storage"]
    assert load_config(path).storage.sync_writes is True


def test_removing_a_key_keeps_the_other_comments(tmp_path: Path) -> None:
    path = _config(tmp_path)
    data, _ = changed_config(yamlfile.load(path), {"replication.heartbeatInterval": None}, tmp_path)
    write_config(path, data)
    text = path.read_text(encoding="utf-8")
    assert "heartbeatInterval" not in text
    assert "# node1: the first node of the cluster (keep this header)" in text
    assert "# raise to debug while investigating" in text


def test_an_empty_file_and_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "shoal.yaml"
    path.write_text("", encoding="utf-8")
    assert yamlfile.load(path) == {}
    yamlfile.write(path, {"logging": {"level": "warn"}, "routes": ["a", {"hostname": "b"}]})
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == {
        "logging": {"level": "warn"},
        "routes": ["a", {"hostname": "b"}],
    }
