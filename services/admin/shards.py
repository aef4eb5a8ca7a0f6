"""set_configuration, including shard changes, which take effect at once.

Most keys of shoal.yaml take effect at the next restart. A change of
``replication.shard`` moves data, so it is an operation of its own:

1. fence the sharded databases (storage's FenceDatabases: no write into them on this
   node, so its positions of them stop moving);
2. wait until other nodes of the old shard hold every write this node holds of them
   (the replicator's HandOver, which asks the peers of the shard for their positions
   while this node's log keeps flowing to them);
3. forget them here (storage's ForgetDatabase checks the peers' positions again, in the
   same synchronous step as the removal);
4. write shoal.yaml and restart the replicator, which announces the new shard in its
   Hellos and its system.hdb_nodes row (so every member learns it);
5. lift the fence: the node copies the new shard's sharded databases from its members,
   as a new node does.

Nothing is removed before step 3 succeeds, and when a step before the file is written
fails, the fence is lifted and nothing has changed (a database forgotten before a later
one failed is held elsewhere and comes back by a copy). The fence stays on through the
replicator's restart, so the old replicator cannot bring the old shard's data back in
between. A node without a shard, or told ``keep_sharded_data``, keeps its data (steps
1-3 are skipped): it then belongs to the new shard. A ``replicated`` shard change moves
every member to one shard, keeping everything (the shards merge).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb

from services.admin import clusterwide
from services.admin.configuration import changed_config, write_config
from services.admin.node import AdminNode
from services.admin.nodes import Nodes
from services.common import yamlfile
from services.common.config import ConfigError, ShoalConfig, parse_config
from services.common.errors import FailedPrecondition, ShoalError

log = logging.getLogger("shoal.admin.shards")

HANDOVER_TIMEOUT_S = 60.0
FENCE_LEASE_MS = 600_000  # the fence outlives a stuck change by at most this much
CALL_TIMEOUT_S = 30.0


@dataclass
class ShardChange:
    """What a shard change did on this node."""

    previous: int | None
    shard: int | None
    handed_over: list[rpb.HandedOver] = field(default_factory=list)
    kept: bool = False

    def json(self) -> dict[str, Any]:
        return {
            "previousShard": self.previous,
            "shard": self.shard,
            "handedOver": [
                {"database": h.database, "heldBy": sorted(h.held_by)} for h in self.handed_over
            ],
            "kept": self.kept,
        }

    def message(self) -> apb.ShardChange:
        return apb.ShardChange(
            previous_shard=self.previous,
            shard=self.shard,
            handed_over=[
                apb.HandedOverDatabase(database=h.database, held_by=sorted(h.held_by))
                for h in self.handed_over
            ],
            kept=self.kept,
        )

    def sentence(self) -> str:
        moved = f"moved from shard {_shown(self.previous)} to shard {_shown(self.shard)}"
        if self.handed_over:
            handed = "; ".join(
                f"{h.database} to {', '.join(sorted(h.held_by))}"
                for h in self.handed_over
                if h.held_by
            )
            if handed:
                moved += f"; handed over {handed}"
        if self.kept:
            moved += "; kept the sharded data it held, which now belongs to the new shard"
        return moved


def _shown(shard: int | None) -> str:
    return "none" if shard is None else str(shard)


@dataclass
class Outcome:
    """A set_configuration on this node: the keys changed and any shard change."""

    keys: list[str]
    shard_change: ShardChange | None = None


def _parsed(data: dict[str, Any], base_dir: Path) -> ShoalConfig | None:
    with contextlib.suppress(ConfigError):
        return parse_config(data, env={}, base_dir=base_dir)
    return None


async def set_configuration(
    nodes: Nodes, settings: dict[str, Any], keep_sharded_data: bool
) -> Outcome:
    """Change keys of shoal.yaml; a shard change is carried out at once (see the module
    docstring)."""
    node, cluster = nodes.node, nodes.cluster
    source = node.config.source
    if source is None:
        raise FailedPrecondition("this node was started without a configuration file")
    base_dir = source.resolve().parent
    async with cluster.config_lock:
        current = yamlfile.load(source)
        data, keys = changed_config(current, settings, base_dir)
        new = parse_config(data, env={}, base_dir=base_dir)
        status = await node.call(
            node.replicator.Status, rpb.StatusRequest(), node.internal, "the replicator"
        )
        previous = status.shard if status.HasField("shard") else None
        if previous == new.replication.shard:
            write_config(source, data)
            return Outcome(keys)
        old = _parsed(current, base_dir) or node.config
        sharded = sorted(
            set(old.replication.sharded_databases) | set(new.replication.sharded_databases)
        )
        connected = {c.peer for c in status.connections if c.connected}
        change = ShardChange(previous, new.replication.shard)
        if previous is None or keep_sharded_data or not sharded:
            change.kept = bool(sharded)
            write_config(source, data)
            await _restart_replicator(node, connected)
            await _announce(nodes, change)
            log.info("%s", change.sentence())
            return Outcome(keys, change)
        await _fence(node, sharded, FENCE_LEASE_MS)
        try:
            handed = await node.call(
                node.replicator.HandOver,
                rpb.HandOverRequest(databases=sharded, timeout_ms=int(HANDOVER_TIMEOUT_S * 1000)),
                node.internal,
                "the replicator",
                deadline_s=HANDOVER_TIMEOUT_S + CALL_TIMEOUT_S,
            )
            for database in handed.databases:
                await node.call(
                    node.storage_node.ForgetDatabase,
                    spb.ForgetDatabaseRequest(
                        database=database.database, held_elsewhere=database.positions
                    ),
                    node.internal,
                    "storage",
                    deadline_s=CALL_TIMEOUT_S,
                )
                if database.held_by:
                    change.handed_over.append(database)
            write_config(source, data)
            await _restart_replicator(node, connected, lift=lambda: _fence(node, sharded, 0))
        finally:
            with contextlib.suppress(ShoalError):
                await _fence(node, sharded, 0)
        await _announce(nodes, change)
        log.info("%s", change.sentence())
        return Outcome(keys, change)


async def _announce(nodes: Nodes, change: ShardChange) -> None:
    """The replicator writes a shard it is configured with into this node's
    system.hdb_nodes row, but leaves the row alone without one (add_node may have set
    it): a node that left every shard says so here."""
    if change.shard is None and change.previous is not None:
        try:
            await nodes.clear_own_shard()
        except ShoalError as exc:  # the change is made; the row says the old shard
            log.warning("cannot clear the shard in this node's system.hdb_nodes row: %s", exc)


async def _fence(node: AdminNode, databases: list[str], lease_ms: int) -> None:
    await node.call(
        node.storage_node.FenceDatabases,
        spb.FenceDatabasesRequest(databases=databases, lease_ms=lease_ms),
        node.internal,
        "storage",
        deadline_s=CALL_TIMEOUT_S,
    )


async def _restart_replicator(node: AdminNode, connected: set[str], lift: Any = None) -> None:
    """Restart the replicator (it reads the new shard), lift the fence (``lift``), and
    wait until it is connected again to the peers it was connected to."""
    await clusterwide.restart_service(node, "replicator")
    if lift is not None:
        await lift()
    await clusterwide.wait_caught_up(node, connected)
