"""Metrics of the storage service, read at scrape time (see services.common.metrics).

``engine_metrics`` reads the engine on its event loop (the catalog, the record counts,
the engine's counters and RocksDB's properties); ``disk_metrics`` reads the data
directory and its filesystem from the scrape thread.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.sysinfo import directory_size
from services.storage.db import COLUMN_FAMILIES
from services.storage.engine import Engine

LOG_FAMILIES = ("log", "logidx", "logkey")

# (metric, RocksDB property, help) per column family.
_CF_PROPERTIES = (
    (
        "shoal_storage_rocksdb_live_data_bytes",
        "rocksdb.estimate-live-data-size",
        "RocksDB's estimate of the live data in a column family's SST files.",
    ),
    (
        "shoal_storage_rocksdb_sst_files_bytes",
        "rocksdb.total-sst-files-size",
        "Size of all SST files of a column family (obsolete versions included).",
    ),
    (
        "shoal_storage_rocksdb_memtable_bytes",
        "rocksdb.size-all-mem-tables",
        "Memory held by a column family's memtables (data not yet flushed to SST files).",
    ),
    (
        "shoal_storage_rocksdb_estimated_keys",
        "rocksdb.estimate-num-keys",
        "RocksDB's estimate of the keys in a column family.",
    ),
)


def engine_metrics(engine: Engine) -> Callable[[], list[Metric]]:
    """A source for the metrics owned by the engine; run it on the engine's event loop."""

    def collect() -> list[Metric]:
        if engine.closing:
            return []
        records = GaugeMetricFamily(
            "shoal_storage_records",
            "Records (not deleted) in a table.",
            labels=["database", "table"],
        )
        counts = engine.counts
        for db_name, database in sorted(engine.catalog.databases.items()):
            for table_name, table in sorted(database.tables.items()):
                records.add_metric([db_name, table_name], counts.get(table.table_id, 0))
        commits = CounterMetricFamily(
            "shoal_storage_commits",
            "Atomic data writes: local transactions, Apply calls and copy chunks.",
            engine.commits,
        )
        local = CounterMetricFamily(
            "shoal_storage_local_transactions",
            "Transactions committed on this node (this node is their origin).",
            engine.local_transactions,
        )
        applied = CounterMetricFamily(
            "shoal_storage_applied_transactions",
            "Transactions of other origins applied (Apply).",
            engine.applied_transactions,
        )
        skipped = CounterMetricFamily(
            "shoal_storage_skipped_transactions",
            "Transactions of other origins skipped by Apply as already applied.",
            engine.skipped_transactions,
        )
        out: list[Metric] = [records, commits, local, applied, skipped]
        values: dict[str, dict[str, int]] = {}
        for name, prop, documentation in _CF_PROPERTIES:
            metric = GaugeMetricFamily(name, documentation, labels=["column_family"])
            values[prop] = {}
            for cf in COLUMN_FAMILIES:
                value = engine.store.cf[cf].property_int_value(prop)
                if value is not None:
                    values[prop][cf] = value
                    metric.add_metric([cf], value)
            out.append(metric)
        sst = values["rocksdb.total-sst-files-size"]
        memtables = values["rocksdb.size-all-mem-tables"]
        out.append(
            GaugeMetricFamily(
                "shoal_storage_log_size_bytes",
                "Estimated size of the transaction log and its indexes (SST files and"
                " memtables of the log, logidx and logkey column families).",
                sum(sst.get(cf, 0) + memtables.get(cf, 0) for cf in LOG_FAMILIES),
            )
        )
        out.append(
            GaugeMetricFamily(
                "shoal_storage_log_transactions",
                "Estimated number of transactions in the log.",
                values["rocksdb.estimate-num-keys"].get("log", 0),
            )
        )
        return out

    return collect


def disk_metrics(path: Path) -> Callable[[], list[Metric]]:
    """A source for the data directory's size and its filesystem (any thread)."""

    def collect() -> list[Metric]:
        out: list[Metric] = [
            GaugeMetricFamily(
                "shoal_storage_data_directory_bytes",
                "Bytes of the files in the storage directory (storage.path).",
                directory_size(path),
            )
        ]
        try:
            usage = psutil.disk_usage(str(path))
        except OSError:
            return out
        out.append(
            GaugeMetricFamily(
                "shoal_storage_filesystem_size_bytes",
                "Size of the filesystem holding the storage directory.",
                usage.total,
            )
        )
        out.append(
            GaugeMetricFamily(
                "shoal_storage_filesystem_free_bytes",
                "Bytes available to Shoal on the filesystem holding the storage directory.",
                usage.free,
            )
        )
        return out

    return collect
