"""What the storage service samples into its analytics every second: its calls per gRPC
method and their durations, its transactions, the records written per table and the
size of its log (metrics in ``services.common.analytics``)."""

from __future__ import annotations

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
            for _, counts, total in stats.histograms():
                calls += sum(counts)
                seconds += total
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
        out.append(Sample("log-size", time_ms, float(self._log_size())))
        return out

    def _log_size(self) -> int:
        cf = self._engine.store.cf
        total = 0
        for family in LOG_FAMILIES:
            for prop in _LOG_SIZE_PROPERTIES:
                total += cf[family].property_int_value(prop) or 0
        return total
