"""Cloning a node: ``shoal node clone --from SOURCE --hostname NEW --data DIR``.

1. Read the source's configuration (``get_configuration``, without its bootstrap
   credentials) and write DIR/shoal.yaml for the new node: the cluster-wide settings are
   kept; what belongs to one node is not (``rootPath``, ``socketsPath``, ``host``,
   ``replication.hostname``,
   ``url``, ``shard``, ``routes``, ``storage.path``, ``tls``, ``admin``, ``testing``). The
   new node routes to the source. With the cluster's CA folder (``--ca-dir``), the new
   node gets a certificate from it (``tls.*``); without, unless the cluster is in insecure
   mode (``replication.securePort: null``, which the clone keeps), it generates its own
   CA on its first start, which the members do not trust.
2. Start the new node's services.
3. ``add_node`` on the source: the source's membership row for the new node replicates to
   every member, each connects to it, and the new node copies every database (schema and
   data) from the source, then tails its log.
4. Follow the copy in the new node's ``cluster_status`` until every database of the source
   that flows to the new node is present and caught up.

Shards: the new node's ``replication.shard`` is its own (``--shard``; none without). The
source's sharded databases flow to it only when both are of the same shard, so a clone
into another shard (or into none) never copies them: it is not waited for them, and it
receives its own shard's sharded databases from that shard's members, as any new node.

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

from services.common import certs

NODE_LOCAL_KEYS = ("rootPath", "socketsPath", "host", "admin", "tls", "testing")
CONFIG_FILE = "shoal.yaml"
KEYS_FOLDER = "keys"
NODE_LOCAL_REPLICATION_KEYS = ("hostname", "url", "shard", "routes")


def clone_config(
    source: dict[str, Any], source_name: str, hostname: str, shard: int | None = None
) -> dict[str, Any]:
    """The new node's configuration, from the source's; ``shard`` is the new node's."""
    config = {k: copy.deepcopy(v) for k, v in source.items() if k not in NODE_LOCAL_KEYS}
    replication = {
        k: v
        for k, v in dict(config.get("replication") or {}).items()
        if k not in NODE_LOCAL_REPLICATION_KEYS
    }
    replication["hostname"] = hostname
    replication["routes"] = [source_name]
    if shard is not None:
        replication["shard"] = shard
    config["replication"] = replication
    storage = dict(config.get("storage") or {})
    storage.pop("path", None)
    if storage:
        config["storage"] = storage
    else:
        config.pop("storage", None)
    return {"rootPath": ".", "host": hostname, **config}


def sharded(config: dict[str, Any]) -> set[str]:
    """The databases a node's configuration (shoal.yaml as JSON) declares sharded."""
    databases = (config.get("replication") or {}).get("databases")
    if not isinstance(databases, list):
        return set()
    return {
        str(entry["name"])
        for entry in databases
        if isinstance(entry, dict) and entry.get("sharded") and "name" in entry
    }


def withheld(source: dict[str, Any], clone: dict[str, Any]) -> set[str]:
    """The source's databases that do not flow to the clone: those either declares
    sharded, unless both have a shard and it is the same (the replicator's rule)."""
    mine = (source.get("replication") or {}).get("shard")
    theirs = (clone.get("replication") or {}).get("shard")
    if mine is not None and mine == theirs:
        return set()
    return sharded(source) | sharded(clone)


def secure(config: dict[str, Any]) -> bool:
    """Whether a node with this configuration (shoal.yaml as JSON) uses TLS."""
    replication = config.get("replication") or {}
    return bool(config.get("tls")) or replication.get("securePort", 9933) is not None


def exists(directory: Path) -> bool:
    return (directory / CONFIG_FILE).exists()


def issue_certificate(directory: Path, ca_dir: Path, hostname: str) -> dict[str, str]:
    """A certificate for the new node from the cluster's CA in ``ca_dir`` (which must hold
    ``ca.key`` and ``ca.crt``), in ``directory/keys``; the ``tls`` section naming it."""
    key, cert = ca_dir / certs.CA_KEY_FILE, ca_dir / certs.CA_CERT_FILE
    if not (key.exists() and cert.exists()):
        names = f"{certs.CA_KEY_FILE} and {certs.CA_CERT_FILE}"
        raise certs.CertificateError(f"{ca_dir} must hold the CA's {names}")
    authority = certs.KeyPair(key.read_bytes(), cert.read_bytes())
    files = certs.ensure_node_files(directory / KEYS_FOLDER, authority, hostname, replace=True)
    return {
        "certificate": str(files.certificate.relative_to(directory)),
        "privateKey": str(files.private_key.relative_to(directory)),
        "certificateAuthority": str(files.certificate_authority.relative_to(directory)),
    }


def ca_path(directory: Path) -> Path:
    """Where the new node's CA certificate is (given, or generated on its first start)."""
    return directory / KEYS_FOLDER / certs.CA_CERT_FILE


def write_config(directory: Path, config: dict[str, Any], source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
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


def held_rows(described: dict[str, Any], wanted: set[str]) -> int:
    """The records the new node holds in the wanted databases (a describe_all answer):
    what the clone copied, whether or not a poll saw each copy running (a small copy is
    over between two polls, and cluster_status shows a copy only while it runs)."""
    return sum(
        int(table.get("record_count") or 0)
        for database, tables in described.items()
        if database in wanted and isinstance(tables, dict)
        for table in tables.values()
        if isinstance(table, dict)
    )


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
