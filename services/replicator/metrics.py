"""Metrics of the replicator, read from its peer states at scrape time (on its event loop;
see services.common.metrics). Labels are peer names (``replication.hostname`` of the
peers: bounded by the cluster) and database names, never addresses."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.replicator.replicator import Replicator


def replicator_metrics(replicator: Replicator) -> Callable[[], list[Metric]]:
    """A source for the replication metrics; run it on the replicator's event loop."""

    def collect() -> list[Metric]:
        connected, latency, back_pressure = _peer_gauges()
        lag, backlog, last_received = _database_gauges()
        received, received_bytes, sent, sent_bytes = _peer_counters()
        for name, state in sorted(replicator.peers.items()):
            peer = [name]
            connected.add_metric(peer, 1 if state.connected else 0)
            latency.add_metric(peer, state.latency_ms / 1000)
            back_pressure.add_metric(peer, min(1.0, state.back_pressure_percent / 100))
            received.add_metric(peer, state.received_transactions)
            received_bytes.add_metric(peer, state.received_bytes)
            sent.add_metric(peer, state.sent_transactions)
            sent_bytes.add_metric(peer, state.sent_bytes)
            for database, db in sorted(state.databases.items()):
                labels = [name, database]
                lag.add_metric(labels, db.backlog_seconds)
                backlog.add_metric(labels, db.backlog_transactions)
                if db.last_received_at_ms:
                    last_received.add_metric(labels, db.last_received_at_ms / 1000)
        return [
            connected,
            latency,
            back_pressure,
            lag,
            backlog,
            last_received,
            received,
            received_bytes,
            sent,
            sent_bytes,
        ]

    return collect


def _peer_gauges() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    """Gauges of each peer: connected, latency, back pressure."""
    connected = GaugeMetricFamily(
        "shoal_replication_connected",
        "1 while a connection with the peer is up, else 0.",
        labels=["peer"],
    )
    latency = GaugeMetricFamily(
        "shoal_replication_latency_seconds",
        "Last heartbeat round-trip time to the peer.",
        labels=["peer"],
    )
    back_pressure = GaugeMetricFamily(
        "shoal_replication_back_pressure_ratio",
        "How full the window of batches sent to the peer and not yet acknowledged is"
        " (0..1; at 1 sending waits for the peer).",
        labels=["peer"],
    )
    return connected, latency, back_pressure


def _database_gauges() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    """Gauges of each peer's databases: lag, backlog, last received."""
    lag = GaugeMetricFamily(
        "shoal_replication_lag_seconds",
        "How far behind the peer's commits this node's copy of a database is (the"
        " backlog of the peer's log still to receive, in seconds).",
        labels=["peer", "database"],
    )
    backlog = GaugeMetricFamily(
        "shoal_replication_backlog_transactions",
        "Transactions sent to the peer and not yet acknowledged.",
        labels=["peer", "database"],
    )
    last_received = GaugeMetricFamily(
        "shoal_replication_last_received_timestamp_seconds",
        "When a transaction of the database last arrived from the peer (Unix time).",
        labels=["peer", "database"],
    )
    return lag, backlog, last_received


def _peer_counters() -> tuple[
    CounterMetricFamily, CounterMetricFamily, CounterMetricFamily, CounterMetricFamily
]:
    """Counters of each peer: transactions and bytes received and sent."""
    received = CounterMetricFamily(
        "shoal_replication_received_transactions",
        "Transactions received from the peer (subscription batches; copies not counted).",
        labels=["peer"],
    )
    received_bytes = CounterMetricFamily(
        "shoal_replication_received_bytes",
        "Serialized size of the batches received from the peer.",
        labels=["peer"],
    )
    sent = CounterMetricFamily(
        "shoal_replication_sent_transactions",
        "Transactions sent to the peer (subscription batches; copies not counted).",
        labels=["peer"],
    )
    sent_bytes = CounterMetricFamily(
        "shoal_replication_sent_bytes",
        "Serialized size of the batches sent to the peer.",
        labels=["peer"],
    )
    return received, received_bytes, sent, sent_bytes
