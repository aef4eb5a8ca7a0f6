"""The replicator's view of cluster membership: it watches ``system.hdb_nodes`` in its own
storage and tells the replicator who the members are (see services/common/members.py).

* The table is read whole (a Snapshot of one small table, tombstones included) when the
  watch starts, whenever a transaction touches it (a local Subscribe stream filtered to
  the table wakes the watcher), and at every idle heartbeat of that stream as a safety
  net, so a change is never missed for longer than ``RESYNC_MS``.
* The node's own row is written when it has none (first start) and corrected when
  ``replication.shard`` or ``replication.url`` (when its config sets them) differ from
  it; it is never re-created after a removal (a tombstone), so a removed node stays
  removed until a member adds it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import orjson
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.common import members
from services.common.backoff import Backoff
from services.common.config import ShoalConfig
from services.common.hlc import version_from_ms
from services.replicator.local import LocalStorage, StorageUnavailable

log = logging.getLogger("shoal.replicator")

RESYNC_MS = 5000


class MembershipWatcher:
    """Keeps the replicator's members in step with this node's ``system.hdb_nodes``."""

    def __init__(
        self,
        config: ShoalConfig,
        storage: LocalStorage,
        secure: bool,
        on_change: Callable[[members.Membership], None],
    ) -> None:
        self.name = config.node_name
        self.config = config
        self.storage = storage
        self.url = members.advertised_url(config, secure)
        self.on_change = on_change
        self.current = members.Membership()

    async def run(self) -> None:
        backoff = Backoff(self.config.replication.reconnect_delay_s, 5.0)
        while True:
            try:
                await self._watch(backoff)
            except (StorageUnavailable, grpc.aio.AioRpcError) as exc:
                log.debug("membership watch interrupted: %s", exc)
            await asyncio.sleep(backoff.next())

    async def _watch(self, backoff: Backoff) -> None:
        positions = await self.storage.positions(members.DATABASE)
        call = self.storage.subscribe(
            pb.SubscribeRequest(
                databases=[members.DATABASE],
                tables=[types_pb2.TableRef(database=members.DATABASE, table=members.TABLE)],
                positions=positions.positions,
                default_version=version_from_ms(int(time.time() * 1000)),
                heartbeat_interval_ms=RESYNC_MS,
            )
        )
        try:
            await self.refresh()
            backoff.reset()
            async for _ in call:
                await self.refresh()
        finally:
            call.cancel()

    async def read(self) -> members.Membership:
        rows: list[types_pb2.SnapshotRow] = []
        call = self.storage.snapshot(
            pb.SnapshotRequest(database=members.DATABASE, tables=[members.TABLE])
        )
        async for message in call:
            rows.extend(message.rows)
        return members.parse_rows(rows, self.name)

    async def refresh(self) -> None:
        view = await self.read()
        for problem in view.problems:
            if problem not in self.current.problems:
                log.warning("ignoring a system.hdb_nodes entry: %s", problem)
        self.current = view
        self.on_change(view)
        await self._ensure_own_row(view)

    async def _ensure_own_row(self, view: members.Membership) -> None:
        if self.name in view.removed:
            return  # removed: only a member's add_node brings this node back
        mine = view.rows.get(self.name)
        shard = self.config.replication.shard
        # A url set by add_node is kept unless this node's config names its own.
        url_ok = mine is not None and (
            mine.get("url") == self.url or (mine.get("url") and not self.config.replication.url)
        )
        # Likewise the shard: replication.shard, when set, wins over add_node's.
        shard_ok = mine is not None and (shard is None or mine.get("shard") == shard)
        if mine is not None and url_ok and shard_ok:
            return
        # Only the columns this node speaks for, as an attribute merge: the settings
        # add_node / update_node wrote (replicates, subscriptions, start_time, revoked
        # certificates) are the members' to write, and a row written here at a later
        # version must not erase them (they may not have reached this node yet).
        row: dict[str, Any] = {members.PRIMARY_KEY: self.name}
        if mine is None or not url_ok:
            row["url"] = self.url
        if shard is not None and not shard_ok:
            row["shard"] = shard
        await self.storage.upsert(members.DATABASE, members.TABLE, [orjson.dumps(row)])
