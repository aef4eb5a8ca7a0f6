"""One copy of a database into this node at a time, whichever peer it comes from.

Sessions with several peers may each find a database they must copy: a new node joining
a cluster that holds data, or a node back from longer than the log's retention, to which
every peer answers LOG_TRUNCATED. Copying the same database from each of them at once
doubles the work and gains nothing: once one copy completes, this node holds the
database at that peer's positions, and the others' logs usually reach it from there.

So a session takes the database's gate before it copies, and after waiting for it,
copies only if no copy of that database completed since it decided to. Storage keeps
each source's progress apart either way (services/storage/copy.py), so the gate is about
work, not safety.
"""

from __future__ import annotations

import asyncio


class CopyGate:
    """Per database: a lock held for the length of one copy, and how many copies of it
    have completed since the replicator started."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._completed: dict[str, int] = {}

    def lock(self, database: str) -> asyncio.Lock:
        lock = self._locks.get(database)
        if lock is None:
            lock = self._locks[database] = asyncio.Lock()
        return lock

    def completed(self, database: str) -> int:
        """Copies of ``database`` completed so far (to compare with a later reading)."""
        return self._completed.get(database, 0)

    def snapshot(self) -> dict[str, int]:
        """Every database's count now."""
        return dict(self._completed)

    def finished(self, database: str) -> None:
        """A copy of ``database`` completed."""
        self._completed[database] = self._completed.get(database, 0) + 1
