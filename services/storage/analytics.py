"""The analytics tables of one node, ``system.hdb_raw_analytics`` (per second) and
``system.hdb_analytics`` (per minute): recording samples, aggregating each minute once it
is over, and retention (``analytics.*``; row shapes in ``services.common.analytics``).

Rows are written with a WriteBatch of their own, not through ``BatchWriter``: no log
entry, no position, no commit notification, not counted as a commit or a transaction,
and without an fsync (a machine crash may lose the last seconds of analytics, never
data). Each row is stored as a record state (version: its time; origin: this node), so
the searches read these tables like any other; record counts and the schema's attributes
are kept exact in the same batch.

Everything here is synchronous and runs on the engine's event loop, like every write;
the loop (``run``) does a bounded amount of work per step and yields in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import rocksdict

from services.common import analytics
from services.common.analytics import AGGREGATE_PERIOD_MS, Sample
from services.common.hlc import version_from_ms
from services.storage import keys, merge
from services.storage.commit import COUNT_PREFIX
from services.storage.engine import SYSTEM_DATABASE, Engine
from services.storage.schema import SCHEMA_PREFIX, Table

log = logging.getLogger("shoal.storage.analytics")

AGGREGATED_KEY = b"analytics/aggregated"  # meta: start of the last minute aggregated
AGGREGATE_DELAY_MS = 5_000  # aggregate a minute this long after it ends (late samples)
PURGE_CHUNK = 10_000  # rows deleted per write
SAMPLE_OFFSET_MS = 20  # sample this long after each whole second


class AnalyticsTables:
    """Reads and writes the two analytics tables of an open engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config.analytics

    def _table(self, name: str) -> Table:
        return self.engine.catalog.table(SYSTEM_DATABASE, name)

    # -- writing ---------------------------------------------------------------------------

    def record(self, samples: Sequence[Sample]) -> int:
        """Write checked samples as ``hdb_raw_analytics`` rows; returns the rows written."""
        return self._write(analytics.RAW_TABLE, [analytics.raw_row(s) for s in samples])

    def _write(
        self,
        table_name: str,
        rows: Sequence[dict[str, Any]],
        extra: Callable[[rocksdict.WriteBatch], None] | None = None,
    ) -> int:
        """Store rows (replacing rows of the same id) in one unsynced batch."""
        if not rows and extra is None:
            return 0
        engine = self.engine
        store = engine.store
        table = self._table(table_name)
        by_key: dict[bytes, dict[str, Any]] = {}
        for row in rows:
            by_key[table.prefix + keys.encode_key(row["id"])] = row
        dkeys = list(by_key)
        new = sum(1 for value in store.multi_get("data", dkeys) if value is None)
        batch = store.batch()
        data = store.handle["data"]
        meta = store.handle["meta"]
        origin = engine.node_name
        attributes: set[str] = set()
        for dkey, row in by_key.items():
            state = merge.RecordState((version_from_ms(row["time"]), origin), False, row, {})
            batch.put(dkey, merge.encode_state(state), data)
            attributes.update(row)
        if not table.attributes.issuperset(attributes):
            table.attributes.update(attributes)
            database = engine.catalog.database(SYSTEM_DATABASE)
            batch.put(SCHEMA_PREFIX + SYSTEM_DATABASE.encode(), database.encode(), meta)
        count = engine.counts.get(table.table_id, 0) + new
        if new:
            batch.put(COUNT_PREFIX + table.prefix, keys.u64(count), meta)
        if extra is not None:
            extra(batch)
        try:
            store.write_unsynced(batch)
        except Exception:
            engine.reload_catalog()
            raise
        engine.counts[table.table_id] = count
        return len(by_key)

    # -- aggregation -----------------------------------------------------------------------

    def aggregated_through(self) -> int | None:
        """Start of the last minute aggregated; None before the first."""
        raw = self.engine.store.meta.get(AGGREGATED_KEY)
        return keys.read_u64(raw) if raw else None

    def minute_samples(self, minute_ms: int) -> list[Sample]:
        """The raw samples of one minute, every metric."""
        table = self._table(analytics.RAW_TABLE)
        out: list[Sample] = []
        for spec in analytics.METRICS:
            low, high = analytics.id_bounds(
                spec.name, minute_ms, minute_ms + AGGREGATE_PERIOD_MS - 1
            )
            start = table.prefix + keys.encode_key(low)
            end = table.prefix + keys.encode_key(high)
            for _, value in self.engine.store.scan("data", start, end):
                sample = analytics.sample_of(merge.decode_state(value).doc)
                if sample is not None:
                    out.append(sample)
        return out

    def aggregate_minute(self, minute_ms: int) -> int:
        """Write the ``hdb_analytics`` rows of one minute with the new watermark, in one
        batch; returns the rows written."""
        rows = analytics.aggregate(self.minute_samples(minute_ms), minute_ms)

        def watermark(batch: rocksdict.WriteBatch) -> None:
            batch.put(AGGREGATED_KEY, keys.u64(minute_ms), self.engine.store.handle["meta"])

        self._write(analytics.AGGREGATE_TABLE, rows, watermark)
        return len(rows)

    def minutes_due(self, now_ms: int) -> list[int]:
        """Minutes over (by ``AGGREGATE_DELAY_MS``) and not aggregated yet, oldest first;
        none older than the raw retention (their rows are gone)."""
        due = analytics.minute_of(now_ms - AGGREGATE_DELAY_MS) - AGGREGATE_PERIOD_MS
        last = self.aggregated_through()
        oldest = analytics.minute_of(now_ms - int(self.config.raw_retention_s * 1000))
        first = oldest if last is None else max(last + AGGREGATE_PERIOD_MS, oldest)
        return list(range(first, due + 1, AGGREGATE_PERIOD_MS))

    # -- retention -------------------------------------------------------------------------

    def purge(self, table_name: str, cutoff_ms: int, limit: int = PURGE_CHUNK) -> int:
        """Delete up to ``limit`` rows whose time is before ``cutoff_ms``; returns how many.

        Walks the table's metrics (each metric's ids form one key range, sorted by time),
        so rows of any metric name are purged, built-in or not.
        """
        engine = self.engine
        store = engine.store
        table = self._table(table_name)
        table_end = keys.prefix_end(table.prefix)
        doomed: list[bytes] = []
        start: bytes | None = table.prefix
        while start is not None and len(doomed) < limit:
            first = next(store.scan("data", start, table_end), None)
            if first is None:
                break
            pk, _ = keys.decode_value(first[0], len(table.prefix))
            name = str(pk).split("/", 1)[0]
            prefix = table.prefix + keys.string_prefix(analytics.id_prefix(name))
            end = table.prefix + keys.encode_key(analytics.row_id(name, max(0, cutoff_ms)))
            for key, _ in store.scan("data", prefix, end):
                doomed.append(key)
                if len(doomed) >= limit:
                    break
            start = keys.prefix_end(prefix)
        if not doomed:
            return 0
        batch = store.batch()
        data = store.handle["data"]
        for key in doomed:
            batch.delete(key, data)
        count = max(0, engine.counts.get(table.table_id, 0) - len(doomed))
        batch.put(COUNT_PREFIX + table.prefix, keys.u64(count), store.handle["meta"])
        store.write_unsynced(batch)
        engine.counts[table.table_id] = count
        return len(doomed)

    def cutoffs(self, now_ms: int) -> dict[str, int]:
        """The retention cutoff of each table at ``now_ms``."""
        return {
            analytics.RAW_TABLE: now_ms - int(self.config.raw_retention_s * 1000),
            analytics.AGGREGATE_TABLE: now_ms - int(self.config.aggregate_retention_s * 1000),
        }


async def maintain(tables: AnalyticsTables, now_ms: int) -> tuple[int, int]:
    """Aggregate the minutes that are due, then apply retention, yielding to the event loop
    between bounded steps; returns (minutes aggregated, rows purged)."""
    minutes = tables.minutes_due(now_ms)
    for minute in minutes:
        if tables.engine.closing:
            return 0, 0
        tables.aggregate_minute(minute)
        await asyncio.sleep(0)
    purged = 0
    for table_name, cutoff in tables.cutoffs(now_ms).items():
        while not tables.engine.closing:
            removed = tables.purge(table_name, cutoff)
            purged += removed
            await asyncio.sleep(0)
            if removed < PURGE_CHUNK:
                break
    return len(minutes), purged


Sampler = Callable[[int], list[Sample]]


async def run(tables: AnalyticsTables, sample: Sampler) -> None:
    """Every second: record this storage service's samples of the second that just ended
    (when ``analytics.enabled``); every minute: aggregate and apply retention."""
    engine = tables.engine
    clock = engine.clock
    last_minute = analytics.minute_of(clock.physical_ms() - AGGREGATE_DELAY_MS)
    while True:
        await asyncio.sleep(analytics.until_next_second(clock.physical_ms(), SAMPLE_OFFSET_MS))
        if engine.closing:
            continue  # shutting down: the server cancels this task once it stopped
        now = clock.physical_ms()
        try:
            if tables.config.enabled:
                tables.record(sample(analytics.second_of(now)))
            minute = analytics.minute_of(now - AGGREGATE_DELAY_MS)
            if minute != last_minute:  # a minute ended AGGREGATE_DELAY_MS ago
                last_minute = minute
                minutes, purged = await maintain(tables, now)
                if purged:
                    log.debug("analytics: %d minutes aggregated, %d rows purged", minutes, purged)
        except Exception:
            log.exception("analytics: sampling failed")
