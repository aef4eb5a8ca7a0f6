"""An in-memory stand-in for a node's storage, as the replicator's client sees it.

It keeps what the replicator's roles rely on and nothing more: a log of transactions in
commit order with per-(database, origin) positions that Apply advances (skipping what is
at or below them), a Subscribe that streams the log from given positions without the
excluded origins and databases and then follows it live, rows that Snapshot serves in
key order after a given key, and MergeSnapshot that records a copy's progress per source
until it completes. Every request is recorded, so a test can assert on what a role asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import grpc
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.common.errors import FailedPrecondition

T = TypeVar("T")
Key = tuple[str, str]  # (database, origin)


class FakeCall(Generic[T]):
    """A server-streaming call: async-iterable, cancellable."""

    def __init__(self, replies: AsyncIterator[T]) -> None:
        self._replies = replies
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[T]:
        return self._replies

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def failed_precondition(reason: str, message: str, **metadata: str) -> grpc.aio.AioRpcError:
    """The FAILED_PRECONDITION a storage service answers with, ErrorInfo included."""
    status = FailedPrecondition(message, reason=reason, metadata=metadata).to_status()
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=message,
    )


def txn(origin: str, version: int, database: str = "app") -> types_pb2.Transaction:
    """A transaction of ``origin`` writing one row (its id names origin and version)."""
    return types_pb2.Transaction(
        origin=origin,
        version=version,
        local_time=version,
        database=database,
        writes=[types_pb2.Write(table="t", id=f"{origin}{version}".encode())],
    )


@dataclass
class FakeStorage:
    """One node's storage."""

    name: str
    log: list[types_pb2.Transaction] = field(default_factory=list)
    rows: dict[str, dict[tuple[str, bytes], types_pb2.SnapshotRow]] = field(default_factory=dict)
    positions_of: dict[Key, int] = field(default_factory=dict)
    copies: dict[Key, spb.CopyProgress] = field(default_factory=dict)  # (database, source)
    snapshot_rows: int = 2  # rows per Snapshot reply
    # Per database, the first version of this node's own still in its log: a Subscribe
    # from a position before it (or from none) is answered LOG_TRUNCATED.
    horizons: dict[str, int] = field(default_factory=dict)
    # What was asked of it, in order.
    applied: list[list[types_pb2.Transaction]] = field(default_factory=list)
    subscriptions: list[spb.SubscribeRequest] = field(default_factory=list)
    snapshots: list[spb.SnapshotRequest] = field(default_factory=list)
    merges: list[spb.MergeSnapshotRequest] = field(default_factory=list)
    served: int = 0  # Subscribe replies with transactions taken by a subscriber
    on_merge: Callable[[spb.MergeSnapshotRequest], Awaitable[None]] | None = None
    _copied_positions: dict[Key, list[types_pb2.Position]] = field(default_factory=dict)
    _clock: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # -- test set-up -------------------------------------------------------------------------

    def write(self, database: str, *ids: str, table: str = "t") -> list[types_pb2.Transaction]:
        """Commit one transaction per id as this node (the origin), row included."""
        written = []
        for record_id in ids:
            self._clock += 1
            version = 1000 + self._clock
            txn = types_pb2.Transaction(
                origin=self.name,
                version=version,
                local_time=version,
                database=database,
                writes=[types_pb2.Write(table=table, id=record_id.encode())],
            )
            self._append(txn)
            row = types_pb2.SnapshotRow(table=table, id=record_id.encode())
            self.rows.setdefault(database, {})[(table, row.id)] = row
            written.append(txn)
        return written

    def add(self, *transactions: types_pb2.Transaction) -> None:
        """Hold transactions of other origins, as if applied from a peer earlier."""
        for txn in transactions:
            self._append(txn)

    def applied_transactions(self) -> list[tuple[str, str, int]]:
        """(database, origin, version) of every transaction Apply took, in order."""
        return [(t.database, t.origin, t.version) for batch in self.applied for t in batch]

    def holds(self, database: str, origin: str, version: int) -> bool:
        return self.positions_of.get((database, origin), 0) >= version

    def _append(self, txn: types_pb2.Transaction) -> None:
        self.log.append(txn)
        key = (txn.database, txn.origin)
        self.positions_of[key] = max(self.positions_of.get(key, 0), txn.version)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _positions(self, database: str = "") -> list[types_pb2.Position]:
        return [
            types_pb2.Position(database=d, origin=o, version=v)
            for (d, o), v in sorted(self.positions_of.items())
            if not database or d == database
        ]

    # -- the client's calls --------------------------------------------------------------------

    async def positions(self, database: str = "") -> spb.GetPositionsResponse:
        return spb.GetPositionsResponse(
            positions=self._positions(database),
            copies=list(self.copies.values()),
            node_name=self.name,
            epoch=1,
        )

    async def databases(self) -> list[str]:
        return sorted({t.database for t in self.log} | set(self.rows))

    async def apply(
        self,
        transactions: Sequence[types_pb2.Transaction],
        max_clock_skew_ms: int,
        partial: bool = False,
        epoch: int = 0,
        tables: Sequence[types_pb2.TableRef] = (),
    ) -> spb.ApplyResponse:
        taken = [types_pb2.Transaction.FromString(t.SerializeToString()) for t in transactions]
        self.applied.append(taken)
        applied = skipped = 0
        for txn in taken:
            if self.holds(txn.database, txn.origin, txn.version):
                skipped += 1
                continue
            applied += 1
            self._append(txn)
            for write in txn.writes:
                row = types_pb2.SnapshotRow(table=write.table, id=write.id)
                self.rows.setdefault(txn.database, {})[(write.table, write.id)] = row
        touched = {(t.database, t.origin) for t in taken}
        positions = [p for p in self._positions() if (p.database, p.origin) in touched]
        return spb.ApplyResponse(applied=applied, skipped=skipped, positions=positions)

    def subscribe(self, request: spb.SubscribeRequest) -> FakeCall[spb.SubscribeResponse]:
        self.subscriptions.append(request)
        return FakeCall(self._feed(request))

    async def _feed(self, request: spb.SubscribeRequest) -> AsyncIterator[spb.SubscribeResponse]:
        asked = {(p.database, p.origin): p.version for p in request.positions}
        for database, horizon in sorted(self.horizons.items()):
            if request.databases and database not in request.databases:
                continue
            if asked.get((database, self.name), 0) < horizon - 1:
                raise failed_precondition(
                    "LOG_TRUNCATED",
                    f"the log of {database} no longer holds the positions asked",
                    database=database,
                )
        sent = {(p.database, p.origin): p.version for p in request.positions}
        excluded = set(request.exclude_origins)
        withheld = set(request.exclude_databases)
        databases = set(request.databases)
        told_caught_up = False
        while True:
            changed = self._changed
            ready = [
                t
                for t in self.log
                if t.origin not in excluded
                and t.database not in withheld
                and (not databases or t.database in databases)
                and t.version > sent.get((t.database, t.origin), request.default_version)
            ]
            limit = max(1, request.max_batch_transactions)
            batch = ready[:limit]
            if batch:
                for txn in batch:
                    sent[(txn.database, txn.origin)] = txn.version
                self.served += 1
                yield spb.SubscribeResponse(
                    transactions=batch, caught_up=len(ready) == len(batch), node_time=1
                )
                told_caught_up = len(ready) == len(batch)
                continue
            if not told_caught_up:
                told_caught_up = True
                yield spb.SubscribeResponse(caught_up=True, node_time=1)
                continue
            await changed.wait()

    def snapshot(self, request: spb.SnapshotRequest) -> FakeCall[spb.SnapshotResponse]:
        self.snapshots.append(request)
        return FakeCall(self._snapshot(request))

    async def _snapshot(self, request: spb.SnapshotRequest) -> AsyncIterator[spb.SnapshotResponse]:
        rows = [row for _, row in sorted(self.rows.get(request.database, {}).items())]
        if request.HasField("start_after") and request.start_after.table:
            after = (request.start_after.table, request.start_after.id)
            rows = [r for r in rows if (r.table, r.id) > after]
        positions = self._positions(request.database)
        for start in range(0, len(rows), self.snapshot_rows):
            yield spb.SnapshotResponse(
                positions=positions,
                rows=rows[start : start + self.snapshot_rows],
                estimated_rows=len(rows),
            )

    async def merge_snapshot(self, request: spb.MergeSnapshotRequest) -> spb.MergeSnapshotResponse:
        self.merges.append(request)
        if self.on_merge is not None:
            await self.on_merge(request)
        key = (request.database, request.source)
        progress = self.copies.get(key) or spb.CopyProgress(
            database=request.database, source=request.source
        )
        if request.positions:
            self._copied_positions[key] = list(request.positions)
        for row in request.rows:
            self.rows.setdefault(request.database, {})[(row.table, row.id)] = row
        progress.rows += len(request.rows)
        if request.rows:
            last = request.rows[-1]
            progress.last_key.CopyFrom(types_pb2.SnapshotKey(table=last.table, id=last.id))
        if request.complete:
            progress.complete = True
            self.copies.pop(key, None)
            for p in self._copied_positions.pop(key, []):
                position = (p.database, p.origin)
                self.positions_of[position] = max(self.positions_of.get(position, 0), p.version)
            self._notify()
        else:
            self.copies[key] = progress
        return spb.MergeSnapshotResponse(progress=progress)

    async def upsert(self, database: str, table: str, records: Sequence[bytes]) -> None:
        """Membership rows written by the replicator (a joined node): not needed here."""
