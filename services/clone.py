"""Cloning a node: ``shoal node clone --from SOURCE --hostname NEW --data DIR``.

1. Read the source's configuration (``get_configuration``, without its bootstrap
   credentials) and write DIR/shoal.yaml for the new node: the cluster-wide settings are
   kept; what belongs to one node is not (``rootPath``, ``host``, ``replication.hostname``,
   ``url``, ``shard``, ``routes``, ``storage.path``, ``tls``, ``admin``, ``testing``). The
   new node routes to the source.
2. Start the new node's services.
3. ``add_node`` on the source: the source's membership row for the new node replicates to
   every member, each connects to it, and the new node copies every database (schema and
   data) from the source, then tails its log.
4. Follow the copy in the new node's ``cluster_status`` until every database of the source
   is present and caught up.

Users and roles are local to each node and are not cloned; the new node's super user is
the one whose credentials ran the clone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NODE_LOCAL_KEYS = ("rootPath", "host", "admin", "tls", "testing")
NODE_LOCAL_REPLICATION_KEYS = ("hostname", "url", "shard", "routes")


def clone_config(source: dict[str, Any], source_name: str, hostname: str) -> dict[str, Any]:
    """The new node's configuration, from the source's."""
    config = {k: copy.deepcopy(v) for k, v in source.items() if k not in NODE_LOCAL_KEYS}
    replication = {
        k: v
        for k, v in dict(config.get("replication") or {}).items()
        if k not in NODE_LOCAL_REPLICATION_KEYS
    }
    replication["hostname"] = hostname
    replication["routes"] = [source_name]
    config["replication"] = replication
    storage = dict(config.get("storage") or {})
    storage.pop("path", None)
    if storage:
        config["storage"] = storage
    else:
        config.pop("storage", None)
    return {"rootPath": ".", "host": hostname, **config}


def write_config(directory: Path, config: dict[str, Any], source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "shoal.yaml"
    if path.exists():
        raise FileExistsError(f"{path} exists: clone into an empty folder")
    path.write_text(
        f"# A clone of node {source}, made by `shoal node clone`.\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    return path


@dataclass
class CopyProgress:
    """How far the new node is, from its cluster_status."""

    connected: bool = False
    rows: int = 0
    estimated_rows: int = 0
    copying: list[str] | None = None
    databases: set[str] | None = None
    backlog: int = 0

    def ready(self, wanted: set[str]) -> bool:
        return (
            self.connected
            and not self.copying
            and self.backlog == 0
            and wanted <= (self.databases or set())
        )


def progress(status: dict[str, Any], source: str) -> CopyProgress:
    """The copy from ``source`` as the new node's cluster_status (Harper JSON) shows it."""
    state = CopyProgress(copying=[], databases=set())
    for connection in status.get("connections", []):
        if connection.get("name") != source:
            continue
        state.connected = bool(connection.get("connected"))
        for socket in connection.get("database_sockets", []):
            assert state.databases is not None and state.copying is not None
            state.databases.add(socket["database"])
            state.backlog += int((socket.get("backlog") or {}).get("transactions", 0))
            copied = socket.get("copy")
            if copied:
                state.copying.append(socket["database"])
                state.rows += int(copied.get("rows", 0))
                state.estimated_rows += int(copied.get("estimatedRows", 0))
    return state


def follow(
    read_status: Callable[[], dict[str, Any]],
    source: str,
    wanted: set[str],
    report: Callable[[CopyProgress], None],
    timeout_s: float,
    interval_s: float = 0.5,
) -> bool:
    """Poll until the clone is ready (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = progress(read_status(), source)
        except Exception:  # the admin service may still be starting
            state = CopyProgress()
        report(state)
        if state.ready(wanted):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
