"""Reads of records this node holds only as stubs (residency): the whole record comes
from one of its residents, through this node's replicator (``FetchRecords``), which asks
the connected residents lowest latency first. See services/storage/residency.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson

from services.common import jsonbytes
from services.storage import keys, merge, residency
from services.storage.confirmation import ReplicatorClient
from services.storage.engine import Engine
from services.storage.schema import Table

BATCH = 512
DEFAULT_BUDGET_S = 10.0
MAX_BUDGET_S = 60.0

Doc = dict[str, Any]


def budget(time_remaining: float | None) -> float:
    """Seconds a read may spend fetching: most of the call's time left, bounded."""
    if time_remaining is None:
        return DEFAULT_BUDGET_S
    return max(0.05, min(MAX_BUDGET_S, time_remaining * 0.9))


class ResidentReads:
    """Whole records for reads, fetching those held here only as stubs."""

    def __init__(self, engine: Engine, replicator: ReplicatorClient) -> None:
        self.engine = engine
        self.replicator = replicator

    async def by_ids(
        self, table: Table, encoded: list[bytes], time_remaining: float | None
    ) -> AsyncIterator[Doc]:
        """Visible records by encoded key, in the order asked (missing ones left out)."""
        for i in range(0, len(encoded), BATCH):
            part = encoded[i : i + BATCH]
            raw = self.engine.store.multi_get("data", [table.prefix + e for e in part])
            states = [None if r is None else merge.decode_state(r) for r in raw]
            for doc in await self._complete(table, states, time_remaining):
                yield doc

    async def whole(
        self, table: Table, docs: Iterator[bytes], time_remaining: float | None
    ) -> AsyncIterator[Doc]:
        """Search results (JSON records, possibly stubs) made whole, in order."""
        chunk: list[bytes] = []
        for record in docs:
            chunk.append(record)
            if len(chunk) >= BATCH:
                for doc in await self._whole_chunk(table, chunk, time_remaining):
                    yield doc
                chunk = []
        if chunk:
            for doc in await self._whole_chunk(table, chunk, time_remaining):
                yield doc

    async def _whole_chunk(
        self, table: Table, chunk: list[bytes], time_remaining: float | None
    ) -> list[Doc]:
        docs = [orjson.loads(r) for r in chunk]
        encoded = [keys.encode_key(d[table.primary_key]) for d in docs]
        raw = self.engine.store.multi_get("data", [table.prefix + e for e in encoded])
        states = [None if r is None else merge.decode_state(r) for r in raw]
        # A record changed since the search read it is shown as it is now.
        return await self._complete(table, states, time_remaining)

    async def _complete(
        self,
        table: Table,
        states: list[merge.RecordState | None],
        time_remaining: float | None,
    ) -> list[Doc]:
        node = self.engine.node_name
        out: list[Doc | None] = []
        wanted: dict[tuple[str, ...], list[int]] = {}
        for state in states:
            if state is None or not state.visible:
                continue
            if residency.holds_full(state, node):
                out.append(state.doc)
                continue
            residents = tuple(n for n in state.residents if n != node) or state.residents
            wanted.setdefault(residents, []).append(len(out))
            out.append(state.doc)
        seconds = budget(time_remaining)
        for residents, positions in wanted.items():
            ids = [jsonbytes.dumps(out[p][table.primary_key]) for p in positions]  # type: ignore[index]
            reply = await self.replicator.fetch(table.database, table.name, ids, residents, seconds)
            found: dict[bytes, Doc] = {}
            for record in reply.records:
                doc = orjson.loads(record)
                found[keys.encode_key(doc[table.primary_key])] = doc
            for p in positions:
                doc = out[p]
                assert doc is not None
                out[p] = found.get(keys.encode_key(doc[table.primary_key]))
        return [d for d in out if d is not None]
