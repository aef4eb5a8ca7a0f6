"""The analytics tables on a real engine (RocksDB in a temporary folder, no processes):
recording never touches the log, the counters or the positions; a minute aggregates its
raw rows; retention deletes exactly the rows older than the cutoff; the record counts
stay exact; the sampler reports what was written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common import analytics
from services.common.analytics import Sample
from services.common.config import parse_config
from services.common.metrics import RpcMetrics
from services.storage import merge
from services.storage.analytics import AGGREGATE_DELAY_MS, AnalyticsTables
from services.storage.engine import SYSTEM_DATABASE, Engine
from services.storage.sampler import StorageSampler

MINUTE = 1_763_793_000_000 - 1_763_793_000_000 % 60_000
PEER = ("server-two",)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    config = parse_config(
        {
            "rootPath": str(tmp_path),
            "replication": {"hostname": "node-a"},
            "admin": {"password": "secret"},
            "analytics": {"rawRetention": "1h", "aggregateRetention": "1d"},
        },
        env={},
    )
    engine = Engine(config)
    engine.open()
    try:
        yield engine
    finally:
        engine.close()


def rows(engine: Engine, table_name: str) -> list[dict[str, Any]]:
    table = engine.catalog.table(SYSTEM_DATABASE, table_name)
    end = table.prefix[:-1] + bytes([table.prefix[-1] + 1])
    return [merge.decode_state(v).doc for _, v in engine.store.scan("data", table.prefix, end)]


def count(engine: Engine, table_name: str) -> int:
    return engine.counts.get(engine.catalog.table(SYSTEM_DATABASE, table_name).table_id, 0)


def test_tables_are_node_local_and_created_without_a_log_entry(engine: Engine) -> None:
    for name in (analytics.RAW_TABLE, analytics.AGGREGATE_TABLE):
        table = engine.catalog.table(SYSTEM_DATABASE, name)
        assert table.replicate is False and table.primary_key == "id"
    assert list(engine.store.scan("log", b"")) != []  # hdb_nodes and hdb_certificate
    for _, value in engine.store.scan("log", b""):
        assert b"analytics" not in value


def test_recording_writes_rows_and_nothing_else(engine: Engine) -> None:
    log_before = list(engine.store.scan("log", b""))
    positions = dict(engine.positions)
    commits, local = engine.commits, engine.local_transactions
    event = engine.commit_event
    tables = AnalyticsTables(engine)
    samples = [
        Sample("replication-sent-bytes", MINUTE + 1000 * i, float(10 * i), PEER)
        for i in range(1, 4)
    ]
    assert tables.record(samples) == 3
    assert tables.record(samples[:1]) == 1  # the same second again replaces its row
    assert [r["value"] for r in rows(engine, analytics.RAW_TABLE)] == [10, 20, 30]
    assert count(engine, analytics.RAW_TABLE) == 3
    assert list(engine.store.scan("log", b"")) == log_before
    assert (engine.positions, engine.commits, engine.local_transactions) == (
        positions,
        commits,
        local,
    )
    assert not event.is_set()  # Subscribe streams were not woken
    table = engine.catalog.table(SYSTEM_DATABASE, analytics.RAW_TABLE)
    assert {"metric", "time", "period", "value", "peer"} <= table.attributes
    engine.reload_catalog()  # counts and attributes were persisted with the rows
    assert count(engine, analytics.RAW_TABLE) == 3
    assert "peer" in engine.catalog.table(SYSTEM_DATABASE, analytics.RAW_TABLE).attributes


def test_a_minute_aggregates_its_raw_rows_once(engine: Engine) -> None:
    tables = AnalyticsTables(engine)
    tables.record(
        [Sample("local-transactions", MINUTE + 1000 * i, float(i + 1)) for i in range(60)]
        + [Sample("local-transactions", MINUTE + 60_000, 1000.0)]  # the next minute
        + [Sample("local-transactions", MINUTE - 1000, 1000.0)]  # the previous one
    )
    assert tables.aggregated_through() is None
    assert tables.aggregate_minute(MINUTE) == 1
    assert tables.aggregated_through() == MINUTE
    [row] = rows(engine, analytics.AGGREGATE_TABLE)
    assert row["id"] == f"local-transactions/{MINUTE}"
    assert (row["count"], row["sum"], row["min"], row["max"]) == (60, 1830, 1, 60)
    assert row["period"] == 60_000
    assert count(engine, analytics.AGGREGATE_TABLE) == 1


def test_minutes_due_start_after_the_last_aggregated_and_wait_for_late_samples(
    engine: Engine,
) -> None:
    tables = AnalyticsTables(engine)
    now = MINUTE + 60_000 + AGGREGATE_DELAY_MS  # MINUTE ended AGGREGATE_DELAY_MS ago
    due = tables.minutes_due(now)
    assert due[-1] == MINUTE and len(due) == 60  # within the raw retention (an hour)
    assert tables.minutes_due(now - 1)[-1] == MINUTE - 60_000
    tables.aggregate_minute(MINUTE - 120_000)
    assert tables.minutes_due(now) == [MINUTE - 60_000, MINUTE]


def test_retention_deletes_exactly_the_rows_before_the_cutoff(engine: Engine) -> None:
    tables = AnalyticsTables(engine)
    tables.record(
        [Sample("log-size", MINUTE + 1000 * i, 1.0) for i in range(10)]
        + [Sample("replication-lag", MINUTE + 1000 * i, 0.5, ("b", "data")) for i in range(10)]
        + [Sample("replication-lag", MINUTE + 1000 * i, 0.5, ("c", "data")) for i in range(10)]
    )
    assert count(engine, analytics.RAW_TABLE) == 30
    cutoff = MINUTE + 4000
    assert tables.purge(analytics.RAW_TABLE, cutoff, limit=5) == 5  # bounded per call
    assert tables.purge(analytics.RAW_TABLE, cutoff) == 7
    assert tables.purge(analytics.RAW_TABLE, cutoff) == 0
    left = rows(engine, analytics.RAW_TABLE)
    assert len(left) == 18 and min(r["time"] for r in left) == cutoff
    assert count(engine, analytics.RAW_TABLE) == 18
    engine.reload_catalog()
    assert count(engine, analytics.RAW_TABLE) == 18
    cutoffs = tables.cutoffs(MINUTE + 3_600_000)
    assert cutoffs[analytics.RAW_TABLE] == MINUTE
    assert cutoffs[analytics.AGGREGATE_TABLE] == MINUTE + 3_600_000 - 86_400_000


def test_the_sampler_reports_increases_since_the_previous_sample(engine: Engine) -> None:
    rpc = RpcMetrics()
    txn = engine.transaction("system", "test", internal=True)
    txn.commit()
    sampler = StorageSampler(engine, rpc)
    # Nothing happened: the gauges only.
    assert [s.metric for s in sampler.sample(MINUTE)] == ["log-size", "resource-usage"]
    engine.create_table("dev", "dog", "id", (), True, "admin")
    txn = engine.transaction("dev", "admin")
    txn.insert(engine.catalog.table("dev", "dog"), [b'{"id": 1}', b'{"id": 2}'])
    txn.commit()
    stats = rpc.method("/shoal.storage.v1.StorageService/Insert")
    stats.started += 2
    stats.finish(grpc.StatusCode.OK, 0.002)
    stats.finish(grpc.StatusCode.OK, 0.004)
    by_metric = {(s.metric, s.labels): s for s in sampler.sample(MINUTE + 1000)}
    assert by_metric[("records-written", ("dev", "dog"))].value == 2
    assert by_metric[("local-transactions", ())].value == 2  # create_table, then the insert
    method = ("shoal.storage.v1.StorageService/Insert",)
    assert by_metric[("requests", method)].value == 2
    duration = by_metric[("request-duration", method)]
    assert duration.count == 2 and duration.value == pytest.approx(0.003)
    assert duration.time_ms == MINUTE + 1000
    # Harper's names: the same records written, the calls that succeeded.
    assert by_metric[("db-write", ("dev", "dog"))].value == 2
    assert by_metric[("success", method)].value == 2
    assert by_metric[("resource-usage", ("storage",))].value >= 0
    again = {s.metric for s in sampler.sample(MINUTE + 2000)}
    assert again == {"log-size", "resource-usage"}
