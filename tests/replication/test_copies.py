"""Copies of one database into a node from several peers: a node back from a cut longer
than the log's retention (both peers answer LOG_TRUNCATED), a new node joining a
cluster that holds data, and a copy killed and resumed while another peer's copy of the
same database waits or runs. Every acknowledged write ends on every node, no deleted key
comes back, and the nodes converge. Each runs with several copy paces, so the copies
overlap in different ways."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from google.protobuf import timestamp_pb2
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

OLD_ROWS = 12_000  # three copy chunks of 5,000


def paced(index: int, rows_per_second: int) -> dict[int, dict[str, Any]]:
    if not rows_per_second:
        return {}
    return {index: {"replication": {"copyRowsPerSecond": rows_per_second}}}


def through_the_first(names: list[str]) -> dict[str, list[str]]:
    """The last node is configured with a route to the first node only and learns the
    others from membership (gossip), as a node added with add_node or `shoal node clone`
    does; the others route to each other. Its sessions with them start a little later,
    so its copies from them overlap the first one's at different points."""
    *members, new = names
    routes = {n: [m for m in members if m != n] for n in members}
    routes[new] = [members[0]]
    return routes


def fill_old(node: Node) -> None:
    client = node.client()
    client.create_table("data", "old")
    client.create_table("data", "volume")
    for start in range(0, OLD_ROWS, 3000):
        client.insert(
            "data", "old", [{"id": i, "pad": "o" * 60} for i in range(start, start + 3000)]
        )


def insert(node: Node, ids: range, by: str) -> None:
    client = node.client()
    for start in range(ids.start, ids.stop, 20):
        client.insert(
            "data", "volume", [{"id": i, "by": by} for i in range(start, min(start + 20, ids.stop))]
        )


def purge_logs(node: Node) -> None:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    node.client().call("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=now))


def copy_rows(node: Node) -> int:
    reply = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database="data"))
    return max((c.rows for c in reply.copies), default=0)


def check(cluster: Cluster, volume: set[int]) -> None:
    """Every node holds every row of `old` and exactly ``volume`` in `volume`."""
    cluster.wait_converged(timeout=150)
    for node in cluster:
        client = node.client()
        assert client.describe("data", "old").record_count == OLD_ROWS, node.name
        got = {r["id"] for r in client.all_records("data", "volume")}
        assert got == volume, (node.name, sorted(volume - got)[:10], sorted(got - volume)[:10])


@pytest.mark.parametrize("rate", [3000, 8000, 0])
def test_a_cut_longer_than_the_retention_heals_by_copy(
    make_cluster: MakeCluster, rate: int
) -> None:
    cluster = make_cluster(size=3, node_config=paced(2, rate))
    a, b, c = cluster[0], cluster[1], cluster[2]
    cluster.wait_connected()
    fill_old(a)
    insert(a, range(0, 300), "a")
    cluster.wait_converged(timeout=90)
    # The cut: c's replicator is away, c still serves (and acknowledges) writes.
    c.stop("replicator")
    a.client().delete("data", "volume", list(range(50)))
    insert(a, range(300, 400), "a")
    insert(b, range(1000, 1300), "b")
    insert(c, range(2000, 2380), "c")
    b.client().delete("data", "volume", list(range(100, 120)))
    cluster.wait_converged(timeout=60, nodes=[a, b])
    # Retention passes everywhere: no node's log reaches back to the cut.
    for node in cluster:
        purge_logs(node)
    c.start_service("replicator")
    wanted = set(range(50, 100)) | set(range(120, 400)) | set(range(1000, 1300))
    check(cluster, wanted | set(range(2000, 2380)))
    log = c.log_path("replicator").read_text()
    truncated = [p.name for p in (a, b) if f"{p.name}: log truncated for data" in log]
    # A slow copy gives both sessions time to subscribe and be told LOG_TRUNCATED; after
    # a fast one, the second peer's log may already reach the copied positions.
    assert len(truncated) == (2 if rate == 3000 else len(truncated)) and truncated


@pytest.mark.parametrize("rate", [4000, 0])
def test_a_new_node_joins_a_cluster_that_holds_data(make_cluster: MakeCluster, rate: int) -> None:
    cluster = make_cluster(
        size=4, start=False, node_config=paced(3, rate), topology=through_the_first, gossip=True
    )
    a, b, c, d = cluster[0], cluster[1], cluster[2], cluster[3]
    for node in (a, b, c):
        node.start()
    cluster.wait_converged(timeout=60, nodes=[a, b, c])
    fill_old(a)
    insert(a, range(0, 200), "a")
    insert(b, range(1000, 1200), "b")
    insert(c, range(2000, 2200), "c")
    b.client().delete("data", "volume", list(range(0, 20)))
    cluster.wait_converged(timeout=90, nodes=[a, b, c])
    d.start()
    # Writes go on while the new node copies.
    insert(a, range(200, 260), "a")
    insert(c, range(2200, 2260), "c")
    c.client().delete("data", "volume", list(range(1000, 1010)))
    wanted = set(range(20, 260)) | set(range(1010, 1200)) | set(range(2000, 2260))
    check(cluster, wanted)


@pytest.mark.parametrize("victim", ["replicator", "storage"])
def test_a_copy_killed_and_resumed_while_another_peer_waits_to_copy(
    make_cluster: MakeCluster, victim: str
) -> None:
    cluster = make_cluster(
        size=3, start=False, node_config=paced(2, 3000), topology=through_the_first, gossip=True
    )
    a, b, r = cluster[0], cluster[1], cluster[2]
    a.start()
    b.start()
    cluster.wait_converged(timeout=60, nodes=[a, b])
    fill_old(a)
    insert(a, range(0, 300), "a")
    insert(b, range(1000, 1300), "b")
    cluster.wait_converged(timeout=90, nodes=[a, b])
    r.start()
    for round_ in range(2):
        wait_for(lambda: copy_rows(r) > 0, 60, f"the copy into {r.name} to make progress")
        r.kill(victim, signal.SIGKILL)
        if victim == "storage":
            r.stop("replicator")
            r.start_service("storage")
        r.start_service("replicator")
        insert(a, range(300 + 10 * round_, 310 + 10 * round_), "a")
        insert(b, range(1300 + 10 * round_, 1310 + 10 * round_), "b")
    wanted = set(range(0, 320)) | set(range(1000, 1320))
    check(cluster, wanted)
    assert "resuming copy of data from" in r.log_path("replicator").read_text()
