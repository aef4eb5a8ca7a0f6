"""The residency repair and rebalance: records get new residents in the background.

**Repair.** Every few seconds storage reads the members (the live rows of
``system.hdb_nodes``) and, from its replicator's status, which of them are connected.
A member is *gone* when it was removed (its row deleted) or when it has not been
connected for ``replication.residencyRepairAfter`` (0: never for that reason), counted
only while this node is connected to at least half of the other members (a node cut
off from the cluster, or starting, must not re-home everything to itself). When the
set of live members changed since the last pass (and once at start), storage scans the
tables with residents: a record with a gone resident is re-homed by exactly one node,
the first by name of its live residents, if that node holds it whole (every such node
computes the same choice; one that does not hold it whole yet tries again at the next
check). The new residents are the live ones plus, to get back to the record's count, the
best rendezvous scores among the other live members.

**Rebalance** (an explicit operation, never automatic): records whose residents are not
those rendezvous hashing over the live members gives now (nodes were added) are re-homed
the same way, by their first live resident; a dry run only counts them.

A re-homing is a write that carries the record's whole state with its new residents
(``Write.whole``): receivers merge it as a copied row, keeping every attribute's own
version, so it overwrites nothing newer; a new resident holding a stub holds the whole
record after it, and an old resident keeps only the stub (``residency.settle``). Only
the residency choice gets the re-homing's new version. A record none of whose live
residents holds it whole cannot be re-homed (counted as ``unrecoverable``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.common import jsonbytes
from services.common.errors import ShoalError
from services.storage import keys, merge, residency
from services.storage.commit import BatchWriter
from services.storage.confirmation import ReplicatorClient
from services.storage.engine import Engine
from services.storage.residency import RepairProgress
from services.storage.schema import Table

log = logging.getLogger("shoal.storage.repair")

CHECK_INTERVAL_S = 2.0
BATCH_RECORDS = 200
STATUS_TIMEOUT_S = 5.0
HEAL_BATCH = 512
HEAL_BUDGET_S = 10.0
HEAL_RETRY_S = 30.0  # stubs no resident could heal are tried again this often

Target = Callable[[Table, bytes, merge.RecordState], tuple[str, ...] | None]
Move = tuple[object, dict[str, object], tuple[str, ...]]


def residency_tables(engine: Engine, database: str = "") -> list[Table]:
    """Tables whose records may have residents (of one database when named)."""
    out: list[Table] = []
    for db in engine.catalog.databases.values():
        if database and db.name != database:
            continue
        for table in db.tables.values():
            if table.replicate and engine.has_residents(table):
                out.append(table)
    return out


def repaired(live: set[str]) -> Target:
    """The repair's choice: the live residents plus the best other live members."""

    def target(table: Table, encoded_pk: bytes, state: merge.RecordState) -> tuple[str, ...] | None:
        if all(r in live for r in state.residents):
            return None
        remaining = [r for r in state.residents if r in live]
        others = live - set(remaining)
        extra = residency.rendezvous(
            table.database, table.name, encoded_pk, others, len(state.residents) - len(remaining)
        )
        return tuple(sorted({*remaining, *extra}))

    return target


def rebalanced(live: set[str]) -> Target:
    """A rebalance's choice: where rendezvous hashing over the live members puts it now."""

    def target(table: Table, encoded_pk: bytes, state: merge.RecordState) -> tuple[str, ...] | None:
        count = min(len(state.residents), len(live))
        ideal = residency.rendezvous(table.database, table.name, encoded_pk, live, count)
        return None if set(ideal) == set(state.residents) else ideal

    return target


async def run_pass(
    engine: Engine,
    tables: list[Table],
    live: set[str],
    target: Target,
    progress: RepairProgress,
    dry_run: bool = False,
) -> None:
    """Scan ``tables`` once and re-home the records this node must (see the docstring)."""
    progress.running = True
    progress.dry_run = dry_run
    progress.passes += 1
    progress.scanned = progress.needing = progress.rehomed = 0
    progress.unrecoverable = progress.deferred = 0
    progress.started_ms = int(time.time() * 1000)
    progress.finished_ms = 0
    node = engine.node_name
    try:
        for table in tables:
            prefix = table.prefix
            todo: list[Move] = []
            scanned = 0
            for key, value in engine.store.scan("data", prefix, keys.prefix_end(prefix)):
                progress.scanned += 1
                scanned += 1
                if scanned % 1000 == 0:
                    await asyncio.sleep(0)  # the scan's iterator is a fixed view
                if not value.endswith(b"]]"):
                    continue  # no residency element (merge.encode_state)
                state = merge.decode_state(value)
                if not state.visible or not state.residents:
                    continue
                encoded = key[len(prefix) :]
                new = target(table, encoded, state)
                if new is None:
                    continue
                progress.needing += 1
                remaining = sorted(r for r in state.residents if r in live)
                if not remaining:
                    progress.unrecoverable += 1
                    continue
                if remaining[0] != node:
                    continue  # its first live resident re-homes it
                if not residency.holds_full(state, node):
                    progress.deferred += 1
                    continue
                if dry_run:
                    progress.rehomed += 1
                    continue
                pk, _ = keys.decode_value(key, len(prefix))
                todo.append((pk, state.doc, new))
                if len(todo) >= BATCH_RECORDS:
                    progress.rehomed += _rehome(engine, table, todo)
                    todo = []
                    await asyncio.sleep(0)  # let reads and writes run between batches
            if todo:
                progress.rehomed += _rehome(engine, table, todo)
    finally:
        progress.running = False
        progress.finished_ms = int(time.time() * 1000)


def _rehome(engine: Engine, table: Table, todo: list[Move]) -> int:
    """Re-home records in one local transaction; records changed or deleted since the
    scan read them are left for the next pass."""
    txn = engine.transaction(table.database, engine.node_name, internal=True)
    encoded = [keys.encode_key(pk) for pk, _, _ in todo]
    raw = engine.store.multi_get("data", [table.prefix + e for e in encoded])
    moved = 0
    for (pk, _, residents), value in zip(todo, raw, strict=True):
        if value is None:
            continue
        state = merge.decode_state(value)
        if not state.visible or not residency.holds_full(state, engine.node_name):
            continue
        txn.rehome(table, pk, residents)
        moved += 1
    txn.commit()
    return moved


async def heal_stubs(engine: Engine, tables: list[Table], replicator: ReplicatorClient) -> int:
    """Records this node is a resident of but holds only as a stub (a copy from a node
    that held a stub, a write that reached it as a stub): their whole states are fetched
    from the other residents and merged (``residency.merge_whole``). Returns how many
    are still stubs (no other resident answered, or none holds them whole yet)."""
    node = engine.node_name
    left = 0
    for table in tables:
        prefix = table.prefix
        wanted: dict[tuple[str, ...], list[bytes]] = {}
        scanned = 0
        for key, value in engine.store.scan("data", prefix, keys.prefix_end(prefix)):
            scanned += 1
            if scanned % 1000 == 0:
                await asyncio.sleep(0)
            if not value.endswith(b"]]"):
                continue
            state = merge.decode_state(value)
            if not state.visible or not state.stub or node not in state.residents:
                continue
            others = tuple(r for r in state.residents if r != node)
            if others:
                wanted.setdefault(others, []).append(key[len(prefix) :])
        for others, encoded in wanted.items():
            for i in range(0, len(encoded), HEAL_BATCH):
                left += await _heal(engine, table, replicator, others, encoded[i : i + HEAL_BATCH])
    return left


async def _heal(
    engine: Engine,
    table: Table,
    replicator: ReplicatorClient,
    residents: tuple[str, ...],
    encoded: list[bytes],
) -> int:
    """Fetch and merge the whole states of some records; how many stay stubs."""
    ids = [jsonbytes.dumps(keys.decode_value(e)[0]) for e in encoded]
    try:
        reply = await replicator.fetch(
            table.database, table.name, ids, residents, HEAL_BUDGET_S, states=True
        )
    except ShoalError as exc:
        log.info("cannot heal %d stubs of %s yet: %s", len(ids), table.name, exc)
        return len(ids)
    node = engine.node_name
    writer = BatchWriter(engine)
    healed = 0
    for raw in reply.states:
        try:
            theirs = merge.decode_state(raw)
            pk_value = theirs.doc[table.primary_key]
            key = keys.encode_key(pk_value)
        except (ValueError, KeyError, keys.InvalidKey):
            continue
        [old] = writer.load(table, [key])
        if old is None or not old.stub:
            continue
        new = residency.merge_whole(old, theirs, node)
        writer.set_state(table, key, old, new)
        healed += 0 if new.stub else 1
    writer.commit()
    return len(ids) - healed


class ResidencyWorker:
    """The background repair, and rebalances started by the Rebalance RPC."""

    def __init__(self, engine: Engine, replicator: ReplicatorClient) -> None:
        self.engine = engine
        self.replicator = replicator
        self.repair = RepairProgress()
        self.rebalance = RepairProgress()
        self.gone: set[str] = set()
        self._down_since: dict[str, float] = {}
        self._rebalancing: asyncio.Task[None] | None = None

    async def _connected(self) -> set[str] | None:
        """Peers the replicator is connected to now (None when it cannot say)."""
        try:
            status = await self.replicator.status(STATUS_TIMEOUT_S)
        except Exception:
            return None
        return {c.peer for c in status.connections if c.connected}

    async def live_members(self) -> set[str]:
        """Members that are not gone (see the module docstring); updates ``gone``."""
        members = set(residency.member_names(self.engine))
        after = self.engine.config.replication.residency_repair_after_s
        down: set[str] = set()
        if after > 0:
            connected = await self._connected()
            now = time.monotonic()
            others = members - {self.engine.node_name}
            if connected is not None and 2 * len(others & connected) < len(others):
                # Connected to fewer than half of the others: this node is more likely
                # the one cut off (or just starting); it counts nobody as down.
                self._down_since.clear()
            elif connected is not None:
                for name in others:
                    if name in connected:
                        self._down_since.pop(name, None)
                    else:
                        since = self._down_since.setdefault(name, now)
                        if now - since >= after:
                            down.add(name)
            for name in list(self._down_since):
                if name not in members:
                    del self._down_since[name]
        self.gone = down
        return members - down

    async def run(self) -> None:
        """Check the members every few seconds; a pass whenever the live ones change, and a
        healing pass whenever a copy completed or a write reached a resident as a stub."""
        last: set[str] | None = None
        attempted: tuple[int, int] | None = None  # the stub markers of the last healing
        clean = True  # ... and whether it healed every stub it found
        retry_at = 0.0
        while not self.engine.closing:
            try:
                tables = residency_tables(self.engine)
                marker = (self.engine.copies_completed, self.engine.stubs_on_residents)
                due = not clean and time.monotonic() >= retry_at
                if tables and (marker != attempted or due):
                    attempted = marker
                    clean = not await heal_stubs(self.engine, tables, self.replicator)
                    retry_at = time.monotonic() + HEAL_RETRY_S
                live = await self.live_members() if tables else set()
                if tables and live != last:
                    await run_pass(self.engine, tables, live, repaired(live), self.repair)
                    if self.repair.needing:
                        log.info(
                            "residency repair: %d records had a gone resident; %d re-homed"
                            " here, %d left for later, %d unrecoverable",
                            self.repair.needing,
                            self.repair.rehomed,
                            self.repair.deferred,
                            self.repair.unrecoverable,
                        )
                    last = None if self.repair.deferred else live
            except Exception:  # a failed pass is retried at the next check
                log.exception("residency repair pass failed")
                last = None
            await asyncio.sleep(CHECK_INTERVAL_S)

    def start_rebalance(self, database: str, dry_run: bool) -> RepairProgress:
        """Start a rebalance pass in the background unless one is running."""
        if self._rebalancing is not None and not self._rebalancing.done():
            return self.rebalance
        tables = residency_tables(self.engine, database)
        self.rebalance.running = True
        self.rebalance.dry_run = dry_run

        async def rebalance() -> None:
            try:
                live = await self.live_members()
                await run_pass(self.engine, tables, live, rebalanced(live), self.rebalance, dry_run)
                log.info(
                    "rebalance%s: %d records placed elsewhere now; %d %s here",
                    " (dry run)" if dry_run else "",
                    self.rebalance.needing,
                    self.rebalance.rehomed,
                    "would move" if dry_run else "moved",
                )
            except Exception:
                log.exception("rebalance failed")
                self.rebalance.running = False

        self._rebalancing = asyncio.create_task(rebalance(), name="rebalance")
        return self.rebalance
