"""The replicator's analytics: every second it samples its peers (connection, latency,
lag and backlog per database, transactions and bytes sent and received) and sends the
samples to its node's storage (``RecordAnalytics``), which keeps them in the node-local
``system.hdb_raw_analytics`` table (metrics in ``services.common.analytics``).

Sending never holds up replication: it is one small unary call per second from its own
task. Samples that storage could not take (down or restarting) are kept, up to one
request's worth, and sent with the next second's; a sample storage refuses is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import grpc
import psutil
from shoal.storage.v1 import storage_pb2 as pb

from services.common.analytics import (
    MAX_SAMPLES_PER_REQUEST,
    Deltas,
    Sample,
    metric,
    second_of,
    until_next_second,
)
from services.replicator.local import LocalStorage
from services.replicator.replicator import Replicator

log = logging.getLogger("shoal.replicator.analytics")

SAMPLE_OFFSET_MS = 10  # sample this long after each whole second
SEND_TIMEOUT_S = 5.0
_RETRY = frozenset(
    (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
)


class ReplicatorSampler:
    """Turns the replicator's peer states into samples."""

    def __init__(self, replicator: Replicator) -> None:
        self._replicator = replicator
        self._deltas = Deltas()
        self._process = psutil.Process()
        self.sample(0)

    def sample(self, time_ms: int) -> list[Sample]:
        """The samples of the second starting at ``time_ms``: gauges of every known peer
        (latency only while connected), and counters that grew since the previous call."""
        increase = self._deltas.increase
        out: list[Sample] = []
        for name, state in sorted(self._replicator.peers.items()):
            peer = (name,)
            out.append(
                Sample("replication-connected", time_ms, 1.0 if state.connected else 0.0, peer)
            )
            if state.connected:
                out.append(Sample("replication-latency", time_ms, state.latency_ms / 1000, peer))
            for database, db in sorted(state.databases.items()):
                labels = (name, database)
                out.append(Sample("replication-lag", time_ms, db.backlog_seconds, labels))
                out.append(
                    Sample("replication-backlog", time_ms, float(db.backlog_transactions), labels)
                )
            for counter, value in (
                ("replication-sent-transactions", state.sent_transactions),
                ("replication-sent-bytes", state.sent_bytes),
                ("replication-received-transactions", state.received_transactions),
                ("replication-received-bytes", state.received_bytes),
                ("bytes-sent", state.sent_bytes),
                ("bytes-received", state.received_bytes),
            ):
                grown = increase(counter, peer, value)
                if grown > 0:
                    out.append(Sample(counter, time_ms, grown, peer))
        # Since the previous sample (the first reports 0).
        cpu = self._process.cpu_percent(interval=None)
        out.append(Sample("resource-usage", time_ms, cpu, ("replicator",)))
        return out


def to_proto(sample: Sample) -> pb.AnalyticsSample:
    """The RecordAnalytics form of a sample."""
    spec = metric(sample.metric)
    return pb.AnalyticsSample(
        metric=sample.metric,
        time_ms=sample.time_ms,
        value=sample.value,
        count=sample.count,
        labels=dict(zip(spec.labels, sample.labels, strict=True)),
    )


async def run(replicator: Replicator, storage: LocalStorage, clock_ms: Callable[[], int]) -> None:
    """Sample every second and send the samples to storage, until cancelled."""
    sampler = ReplicatorSampler(replicator)
    pending: deque[pb.AnalyticsSample] = deque(maxlen=MAX_SAMPLES_PER_REQUEST)
    while True:
        await asyncio.sleep(until_next_second(clock_ms(), SAMPLE_OFFSET_MS))
        try:
            pending.extend(to_proto(s) for s in sampler.sample(second_of(clock_ms())))
            if not pending:
                continue
            await storage.record_analytics(list(pending), SEND_TIMEOUT_S)
            pending.clear()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRY:
                log.warning(
                    "analytics: storage refused %d samples: %s", len(pending), exc.details()
                )
                pending.clear()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("analytics: sampling failed")
            pending.clear()
