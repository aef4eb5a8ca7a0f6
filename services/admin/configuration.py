"""set_configuration: changing keys of a node's shoal.yaml.

A key is named by its dotted path (``logging.level``) or, as in Harper, with underscores
(``logging_level``), matched without regard to case against the keys the configuration
loader knows. The changed file is validated as a whole by the loader used at start-up
(every problem named) before it atomically replaces the old one; nothing changes
otherwise. The running services read the file at start: a change takes effect at the
next restart, except a change of ``replication.shard``, which ``shards.py`` carries out
at once.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common import yamlfile
from services.common.config import ConfigError, parse_config
from services.common.errors import InvalidArgument

# Keys set_configuration refuses, with what to use instead.
_REFUSED = {
    "admin": "the bootstrap credentials are not settable; use alter_user",
    "replication.routes": "use cluster_set_routes and cluster_delete_routes",
    "replication.hostname": "a node's name is its identity in the cluster and its data",
}
_NOT_KEYS = ("operation", "replicated", "keep_sharded_data")


def _known_keys(data: Mapping[str, Any], base_dir: Path) -> set[str]:
    trace: set[str] = set()
    # The current file's problems are reported after the change, if they remain.
    with contextlib.suppress(ConfigError):
        parse_config(data, env={}, base_dir=base_dir, trace=trace)
    return trace


def _resolve(name: str, known: set[str]) -> str:
    wanted = name.lower()
    for key in sorted(known):
        if "[" in key:
            continue
        if wanted in (key.lower(), key.replace(".", "_").lower()):
            return key
    raise InvalidArgument(f"set_configuration: {name!r} is not a configuration key")


def _refused(key: str) -> str | None:
    for prefix, why in _REFUSED.items():
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


def settings_from(data: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a set_configuration body (every field but the operation's own)."""
    settings = {k: v for k, v in data.items() if k not in _NOT_KEYS}
    if not settings:
        raise InvalidArgument("set_configuration: no configuration key given")
    return settings


def changed_config(
    current: Mapping[str, Any], settings: Mapping[str, Any], base_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    """(the whole new configuration, the dotted keys changed); InvalidArgument naming
    every problem when the result would not start."""
    known = _known_keys(current, base_dir)
    # A deep copy keeps a round-trip mapping (yamlfile.load) with its comments.
    data: dict[str, Any] = copy.deepcopy(current) if isinstance(current, dict) else dict(current)
    keys: list[str] = []
    for name, value in settings.items():
        key = _resolve(name, known)
        why = _refused(key)
        if why is not None:
            raise InvalidArgument(f"set_configuration: {key} cannot be set here: {why}")
        parts = key.split(".")
        section = data
        for part in parts[:-1]:
            child = section.get(part)
            if not isinstance(child, dict):
                child = section[part] = {}
            section = child
        if value is None:
            section.pop(parts[-1], None)
        else:
            section[parts[-1]] = value
        keys.append(key)
    try:
        parse_config(yamlfile.plain(data), env={}, base_dir=base_dir)
    except ConfigError as exc:
        raise InvalidArgument("set_configuration: " + "; ".join(exc.problems)) from exc
    return data, keys


def write_config(path: Path, data: Mapping[str, Any]) -> None:
    """Replace the file atomically (written and synced beside it, then renamed), keeping
    the operator's comments when ``data`` was read with ``yamlfile.load``."""
    yamlfile.write(path, data)
