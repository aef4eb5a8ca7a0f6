"""Handing databases over: what storage does when its node leaves a shard.

A node that leaves a shard must no longer hold that shard's sharded databases, and must
not lose any write of them: the admin service's shard change fences them here, has the
replicator wait until other nodes of the shard hold everything this node holds, then asks
storage to forget them (``docs/operations.md``, set_configuration).

* **Fence** (``fence.py``). While a database is fenced, client writes and schema changes
  to it are refused (UNAVAILABLE, reason ``SHARD_CHANGING``), Apply leaves its
  transactions unapplied (their positions do not move, so they come again once the fence
  is lifted) and MergeSnapshot refuses it. This node's positions for it stop moving, so
  what the other nodes must hold is a fixed target. Reads and Subscribe go on: peers
  still receive what this node holds. A fence has a lease and lives in memory only: it
  ends when the lease runs out, when lifted, or when storage restarts.
* **Forget.** In one synchronous step (no write can come between): check that, for
  every origin, this node's position is at or below what the others hold
  (``held_elsewhere``), then remove everything of the database: first its positions,
  copy progress and partial and residency marks (one atomic write), then its rows and
  tables, its log entries and the horizons the log's purge left. Should the process stop
  half-way, its positions never claim more than it holds. The database is then as if
  this node had never held it, so a later copy or subscription starts it afresh (with
  another shard's data) and nothing of the old shard's remains to be sent from this
  node's log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from services.common.errors import FailedPrecondition
from services.common.hlc import MAX_VERSION, format_version
from services.storage import keys
from services.storage import log as txlog
from services.storage.commit import (
    HANDOVER_PREFIX,
    HORIZON_PREFIX,
    POSITION_PREFIX,
    RESIDENCY_PREFIX,
    position_key,
)
from services.storage.copy import PARTIAL_PREFIX, copy_key
from services.storage.engine import Engine
from services.storage.fence import checked
from services.storage.limited import limited_key

log = logging.getLogger("shoal.storage.handover")

REASON_NOT_FENCED = "NOT_FENCED"
REASON_NOT_HELD = "NOT_HELD_ELSEWHERE"


def forget(engine: Engine, database: str, held_elsewhere: Mapping[str, int]) -> bool:
    """Remove everything of ``database`` once ``held_elsewhere`` covers every position
    of it here (see the module docstring); False when this node holds nothing of it."""
    checked(database)
    if database not in engine.fences:
        raise FailedPrecondition(
            f"database {database!r} is not fenced: fence it (FenceDatabases) before"
            " forgetting it, so that no write comes in between",
            reason=REASON_NOT_FENCED,
        )
    mine = {o: v for (d, o), v in engine.positions.items() if d == database}
    behind = {o: v for o, v in sorted(mine.items()) if held_elsewhere.get(o, 0) < v}
    if behind:
        shown = ", ".join(
            f"{origin} {format_version(v)} (held elsewhere up to"
            f" {format_version(held_elsewhere.get(origin, 0))})"
            for origin, v in behind.items()
        )
        raise FailedPrecondition(
            f"{database!r} is not forgotten: this node holds writes others do not hold yet:"
            f" {shown}; nothing was removed",
            reason=REASON_NOT_HELD,
        )
    held = (
        database in engine.catalog.databases
        or bool(mine)
        or any(d == database for d, _ in engine.horizons)
    )
    if not held:
        return False
    # Positions first: should the process stop half-way, its positions never claim more
    # than it holds (it would receive the database again, which merges).
    meta = engine.store.handle["meta"]
    batch = engine.store.batch()
    held_keys = [k for k in engine.positions if k[0] == database]
    for _, origin in held_keys:
        batch.delete(position_key(POSITION_PREFIX, database, origin), meta)
    copies = [k for k in engine.copies if k[0] == database]
    for _, source in copies:
        batch.delete(copy_key(database, source), meta)
    batch.delete(PARTIAL_PREFIX + database.encode(), meta)
    batch.delete(RESIDENCY_PREFIX + database.encode(), meta)
    limited = [k for k in engine.limited if k[0] == database]
    for key in limited:
        batch.delete(limited_key(*key), meta)
    queued = HANDOVER_PREFIX + database.encode() + b"\x00"
    for queued_key, _ in engine.store.scan("meta", queued, keys.prefix_end(queued)):
        batch.delete(queued_key, meta)
    engine.store.write(batch)
    for key in held_keys:
        engine.positions.pop(key, None)
    for key in copies:
        engine.copies.pop(key, None)
    for key in limited:
        engine.limited.pop(key, None)
    engine.catching_up.pop(database, None)
    engine.partial_databases.discard(database)
    engine.resident_databases.discard(database)
    if database in engine.catalog.databases:
        engine.remove_database(database)
    removed, _ = txlog.purge_before(engine, MAX_VERSION, database)
    # The purge raised the horizons of what it removed: nothing of the database is
    # left to serve, so they go too.
    horizons = [k for k in engine.horizons if k[0] == database]
    batch = engine.store.batch()
    for _, origin in horizons:
        batch.delete(position_key(HORIZON_PREFIX, database, origin), meta)
    engine.store.write(batch)
    for key in horizons:
        engine.horizons.pop(key, None)
    log.info("forgot %s: %d log entries removed, held elsewhere", database, removed)
    return True
