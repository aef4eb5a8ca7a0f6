"""The residency repair: records that lost residents to a removed node get new ones.

Every few seconds storage reads the members (the live rows of ``system.hdb_nodes``).
When the set changed since the last pass (and once at start), it scans the tables with
residents. A record whose residents include a node that is no longer a member is
re-homed by exactly one node: the first by name of its residents that are still members
and hold it whole (every such node computes the same choice). The new residents are the
remaining ones plus, to get back to the record's count, the best rendezvous scores among
the other members; the re-homing is a PATCH of every attribute with the new residents,
marked ``whole``, so a new resident holding a stub holds the whole record after it (see
``residency.settle``). It replicates like any write.

Re-homing writes the record's current values at a new version: a write of it committed
elsewhere earlier and not yet received here loses to it attribute by attribute (the usual
last-writer-wins). A record none of whose remaining residents holds it whole cannot be
re-homed from here (counted as ``unrecoverable``).

Only removals (``remove_node``) trigger a re-homing; a node that is merely down keeps its
residencies, and reads go to the other residents meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.storage import keys, merge, residency
from services.storage.engine import Engine
from services.storage.residency import RepairProgress
from services.storage.schema import Table

log = logging.getLogger("shoal.storage.repair")

CHECK_INTERVAL_S = 2.0
BATCH_RECORDS = 200


def residency_tables(engine: Engine) -> list[Table]:
    """Tables whose records may have residents."""
    out: list[Table] = []
    for database in engine.catalog.databases.values():
        for table in database.tables.values():
            if table.replicate and engine.has_residents(table):
                out.append(table)
    return out


async def repair_pass(engine: Engine, members: set[str], progress: RepairProgress) -> None:
    """Scan every table with residents once and re-home what this node must."""
    progress.running = True
    progress.passes += 1
    progress.scanned = progress.needing = progress.rehomed = 0
    progress.unrecoverable = progress.deferred = 0
    progress.started_ms = int(time.time() * 1000)
    node = engine.node_name
    try:
        for table in residency_tables(engine):
            prefix = table.prefix
            todo: list[tuple[object, dict[str, object], tuple[str, ...]]] = []
            for key, value in engine.store.scan("data", prefix, keys.prefix_end(prefix)):
                progress.scanned += 1
                if not value.endswith(b"]]"):
                    continue
                state = merge.decode_state(value)
                if not state.visible or not state.residents:
                    continue
                if all(r in members for r in state.residents):
                    continue
                progress.needing += 1
                remaining = sorted(r for r in state.residents if r in members)
                if node not in remaining:
                    if not remaining:
                        progress.unrecoverable += 1
                    continue
                if remaining[0] != node:
                    continue  # another remaining resident re-homes it
                if not residency.holds_full(state, node):
                    progress.deferred += 1
                    continue
                pk, _ = keys.decode_value(key, len(prefix))
                todo.append(
                    (pk, state.doc, new_residents(table, key[len(prefix) :], state, members))
                )
                if len(todo) >= BATCH_RECORDS:
                    progress.rehomed += _rehome(engine, table, todo)
                    todo = []
                    await asyncio.sleep(0)  # let reads and writes run between batches
            if todo:
                progress.rehomed += _rehome(engine, table, todo)
            await asyncio.sleep(0)
    finally:
        progress.running = False
        progress.finished_ms = int(time.time() * 1000)
    if progress.needing:
        log.info(
            "residency repair: %d records had a removed resident; %d re-homed here,"
            " %d unrecoverable",
            progress.needing,
            progress.rehomed,
            progress.unrecoverable,
        )


def new_residents(
    table: Table, encoded_pk: bytes, state: merge.RecordState, members: set[str]
) -> tuple[str, ...]:
    """The remaining residents plus the best-scoring other members, up to the count."""
    remaining = [r for r in state.residents if r in members]
    wanted = len(state.residents) - len(remaining)
    others = set(members) - set(remaining)
    extra = residency.rendezvous(table.database, table.name, encoded_pk, others, wanted)
    return tuple(sorted({*remaining, *extra}))


def _rehome(
    engine: Engine, table: Table, todo: list[tuple[object, dict[str, object], tuple[str, ...]]]
) -> int:
    txn = engine.transaction(table.database, engine.node_name, internal=True)
    for pk, doc, residents in todo:
        txn.rehome(table, pk, dict(doc), residents)
    txn.commit()
    return len(todo)


async def run(engine: Engine, progress: RepairProgress) -> None:
    """Watch the members; run a pass at start and whenever they change."""
    last: set[str] | None = None
    while not engine.closing:
        try:
            members = set(residency.member_names(engine))
            if members != last and residency_tables(engine):
                await repair_pass(engine, members, progress)
                last = None if progress.deferred else members
        except Exception:  # a failed pass is retried at the next check
            log.exception("residency repair pass failed")
            last = None
        await asyncio.sleep(CHECK_INTERVAL_S)
