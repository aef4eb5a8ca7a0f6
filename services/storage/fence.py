"""Fences: databases this node is handing over (a shard change; see handover.py).

While a database is fenced, client writes and schema changes to it are refused
(UNAVAILABLE, reason ``SHARD_CHANGING``), Apply leaves its transactions unapplied and
MergeSnapshot refuses it, so this node's positions of it stop moving. A fence has a
lease and lives in memory only: it ends when the lease runs out, when lifted, or when
storage restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.storage.schema import check_name

log = logging.getLogger("shoal.storage.handover")

MAX_LEASE_MS = 3_600_000
REASON_CHANGING = "SHARD_CHANGING"
REASON_FENCED = "DATABASE_FENCED"
RESERVED = ("system",)


def checked(database: str) -> str:
    """``database``, when it is a valid name that may be handed over."""
    check_name("database", database)
    if database in RESERVED:
        raise InvalidArgument(f"database {database!r} is never handed over")
    return database


class Fences:
    """Databases fenced for a hand-over, each until its lease ends."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def set(self, databases: Iterable[str], lease_ms: int) -> list[str]:
        """Fence ``databases`` for ``lease_ms`` (0 lifts the fence); the fenced now."""
        names = [checked(d) for d in databases]
        if not names:
            raise InvalidArgument("FenceDatabases needs at least one database")
        if not 0 <= lease_ms <= MAX_LEASE_MS:
            raise InvalidArgument(f"lease_ms must be 0 to {MAX_LEASE_MS}, not {lease_ms}")
        until = time.monotonic() + lease_ms / 1000
        for name in names:
            if lease_ms:
                self._until[name] = until
                log.info("%s fenced for %.0f s (handing it over)", name, lease_ms / 1000)
            elif self._until.pop(name, None) is not None:
                log.info("%s no longer fenced", name)
        return self.fenced()

    def __contains__(self, database: object) -> bool:
        until = self._until.get(database) if isinstance(database, str) else None
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._until[str(database)]
            log.info("%s no longer fenced: the lease ran out", database)
            return False
        return True

    def fenced(self) -> list[str]:
        return sorted(name for name in list(self._until) if name in self)

    def check_write(self, database: str) -> None:
        """Unavailable when ``database`` is fenced (a client write or schema change)."""
        if database in self:
            raise Unavailable(
                f"database {database!r} is being handed over: this node is changing its"
                " shard; write to a node of the database's shard",
                reason=REASON_CHANGING,
            )

    def check_copy(self, database: str) -> None:
        """FailedPrecondition when ``database`` is fenced (a copy into it)."""
        if database in self:
            raise FailedPrecondition(
                f"database {database!r} is being handed over (this node is changing its"
                " shard): it takes no copy now",
                reason=REASON_FENCED,
            )
