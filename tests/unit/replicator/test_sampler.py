"""The replicator's analytics samples, from its peer states (no processes)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from services.replicator.replicator import Replicator
from services.replicator.sampler import ReplicatorSampler, to_proto
from services.replicator.status import PeerState


def by_key(samples: list[Any]) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.metric, s.labels): s.value for s in samples}


def test_peers_become_gauges_and_counter_increases() -> None:
    peer = PeerState("server-two", connected=True, latency_ms=12.0, sent_transactions=4)
    peer.database("dev").backlog_seconds = 0.5
    peer.database("dev").backlog_transactions = 3
    replicator = cast(Replicator, SimpleNamespace(peers={"server-two": peer}))
    sampler = ReplicatorSampler(replicator)  # counters so far are the baseline

    first = by_key(sampler.sample(5000))
    assert first == {
        ("replication-connected", ("server-two",)): 1,
        ("replication-latency", ("server-two",)): 0.012,
        ("replication-lag", ("server-two", "dev")): 0.5,
        ("replication-backlog", ("server-two", "dev")): 3,
        ("resource-usage", ("replicator",)): first[("resource-usage", ("replicator",))],
    }

    peer.sent_transactions += 6
    peer.received_bytes += 1000
    peer.connected = False
    second = by_key(sampler.sample(6000))
    assert second[("replication-sent-transactions", ("server-two",))] == 6
    assert second[("replication-received-bytes", ("server-two",))] == 1000
    # Harper's names of the same counters.
    assert second[("bytes-received", ("server-two",))] == 1000
    assert ("bytes-sent", ("server-two",)) not in second
    assert second[("replication-connected", ("server-two",))] == 0
    assert ("replication-latency", ("server-two",)) not in second  # only while connected
    assert ("replication-sent-bytes", ("server-two",)) not in second  # did not grow


def test_samples_travel_with_named_labels() -> None:
    peer = PeerState("server-two")
    peer.database("dev").backlog_seconds = 2.0
    sampler = ReplicatorSampler(cast(Replicator, SimpleNamespace(peers={"server-two": peer})))
    lag = [s for s in sampler.sample(7000) if s.metric == "replication-lag"]
    message = to_proto(lag[0])
    assert (message.metric, message.time_ms, message.value) == ("replication-lag", 7000, 2.0)
    assert dict(message.labels) == {"peer": "server-two", "database": "dev"}
