"""What the storage service samples into its analytics every second: its calls per gRPC
method, their durations and successes, its transactions, the records written and read per
table, the size of its log and its process's CPU use (metrics in
``services.common.analytics``; Harper's names next to Shoal's)."""

from __future__ import annotations

import grpc
import psutil

from services.common.analytics import Deltas, Sample
from services.common.metrics import RpcMetrics
from services.storage.engine import Engine

LOG_FAMILIES = ("log", "logidx", "logkey")
_LOG_SIZE_PROPERTIES = ("rocksdb.total-sst-files-size", "rocksdb.size-all-mem-tables")


class StorageSampler:
    """Turns the engine's counters and the server's per-RPC statistics into samples.

    Counters are read as increases since the previous sample; what happened before the
    sampler was created (opening the data) is not counted.
    """

    def __init__(self, engine: Engine, rpc: RpcMetrics) -> None:
        self._engine = engine
        self._rpc = rpc
        self._deltas = Deltas()
        self._process = psutil.Process()
        self.sample(0)

    def sample(self, time_ms: int) -> list[Sample]:
        """The samples of the second starting at ``time_ms``: counters that grew since the
        previous call, timings with calls that ended, and the gauges."""
        increase = self._deltas.increase
        out: list[Sample] = []
        for stats in self._rpc.methods():
            method = (stats.method,)
            started = increase("requests", method, stats.started)
            if started > 0:
                out.append(Sample("requests", time_ms, started, method))
            calls = 0
            seconds = 0.0
            succeeded = 0
            for code, counts, total in stats.histograms():
                calls += sum(counts)
                seconds += total
                if code == grpc.StatusCode.OK:
                    succeeded += sum(counts)
            ok = increase("success", method, succeeded)
            if ok > 0:
                out.append(Sample("success", time_ms, ok, method))
            ended = increase("request-duration", method, calls)
            spent = increase("request-duration-sum", method, seconds)
            if ended > 0:
                out.append(Sample("request-duration", time_ms, spent / ended, method, int(ended)))
        engine = self._engine
        for name, value in (
            ("local-transactions", engine.local_transactions),
            ("applied-transactions", engine.applied_transactions),
        ):
            grown = increase(name, (), value)
            if grown > 0:
                out.append(Sample(name, time_ms, grown))
        for (database, table), written in list(engine.records_written.items()):
            labels = (database, table)
            grown = increase("records-written", labels, written)
            if grown > 0:
                out.append(Sample("records-written", time_ms, grown, labels))
                out.append(Sample("db-write", time_ms, grown, labels))
        for (database, table), read in list(engine.records_read.items()):
            labels = (database, table)
            grown = increase("db-read", labels, read)
            if grown > 0:
                out.append(Sample("db-read", time_ms, grown, labels))
        out.append(Sample("log-size", time_ms, float(self._log_size())))
        # Since the previous sample (the first reports 0).
        cpu = self._process.cpu_percent(interval=None)
        out.append(Sample("resource-usage", time_ms, cpu, ("storage",)))
        return out

    def _log_size(self) -> int:
        cf = self._engine.store.cf
        total = 0
        for family in LOG_FAMILIES:
            for prop in _LOG_SIZE_PROPERTIES:
                total += cf[family].property_int_value(prop) or 0
        return total
