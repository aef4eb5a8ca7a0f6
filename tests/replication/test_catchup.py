"""Nodes that were away: deletes they missed, catch-up from positions, copy when the
log is gone, and a copy into an empty node that survives being killed mid-way."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from google.protobuf import timestamp_pb2
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster


def _stop(node: Node) -> None:
    node.stop("replicator", "storage")


def _start(node: Node) -> None:
    node.start_service("storage")
    node.start_service("replicator")


def test_deleted_keys_never_come_back(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3)
    a, c = cluster[0], cluster[2]
    a.client().create_table("db", "t")
    a.client().insert("db", "t", [{"id": i, "v": "old"} for i in range(50)])
    cluster.wait_converged()
    _stop(c)
    a.client().delete("db", "t", list(range(25)))
    _start(c)
    cluster.wait_converged(timeout=60)
    for node in cluster:
        assert sorted(r["id"] for r in node.client().all_records("db", "t")) == list(range(25, 50))


def test_offline_node_catches_up_from_its_positions(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3)
    a, b, c = cluster[0], cluster[1], cluster[2]
    a.client().create_table("db", "t")
    cluster.wait_converged()
    _stop(c)
    a.client().insert("db", "t", [{"id": i, "by": "a"} for i in range(100)])
    b.client().insert("db", "t", [{"id": 1000 + i, "by": "b"} for i in range(100)])
    _start(c)
    cluster.wait_converged(timeout=60)
    assert len(c.client().all_records("db", "t")) == 200
    # It resumed from positions: no copy was needed.
    assert (
        "copying db"
        not in c.log_path("replicator").read_text().split("replicator shutting down")[-1]
    )


def test_copy_when_the_log_was_truncated(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    a.client().create_table("db", "t")
    a.client().insert("db", "t", [{"id": i} for i in range(10)])
    cluster.wait_converged()
    _stop(b)
    a.client().insert("db", "t", [{"id": 100 + i} for i in range(10)])
    a.client().delete("db", "t", [0, 1])
    # Retention passes: a keeps no log of what b missed.
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    purged = a.client().call("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=now))
    assert purged.deleted_transactions > 0
    _start(b)
    cluster.wait_converged(timeout=60)
    ids = sorted(r["id"] for r in b.client().all_records("db", "t"))
    assert ids == [*range(2, 10), *range(100, 110)]
    assert "log truncated" in b.log_path("replicator").read_text()


def _copy_rows(node: Node) -> int:
    reply = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database="big"))
    return max((c.rows for c in reply.copies), default=0)


def _beyond(node: Node, floor: int) -> Callable[[], int]:
    """A condition: the copy into ``node`` has merged more than ``floor`` rows."""

    def check() -> int:
        rows = _copy_rows(node)
        return rows if rows > floor else 0

    return check


def test_empty_node_joins_by_copy_that_resumes_after_kills(make_cluster: MakeCluster) -> None:
    rows = 30_000  # six copy chunks of 5,000: three kills cannot reach the end
    cluster = make_cluster(
        size=2,
        start=False,
        node_config={1: {"replication": {"copyRowsPerSecond": 5000, "batchTransactions": 50}}},
    )
    a, b = cluster[0], cluster[1]
    a.start_service("storage")
    a.start_service("replicator")
    client = a.client()
    client.create_table("big", "rows")
    for start in range(0, rows, 1000):
        client.insert(
            "big", "rows", [{"id": i, "pad": "x" * 50} for i in range(start, start + 1000)]
        )
    b.start_service("storage")
    b.start_service("replicator")
    seen = 0
    for round_ in range(3):
        # Wait until the copy made progress beyond what we saw, then kill the receiving side.
        progress = wait_for(_beyond(b, seen), 60, f"copy progress {round_}")
        victim = "replicator" if round_ % 2 == 0 else "storage"
        b.kill(victim, signal.SIGKILL)
        if victim == "storage":
            b.stop("replicator")
            b.start_service("storage")
        after = _copy_rows(b)
        assert after >= progress, "the copy's progress must survive the kill"
        seen = after
        b.start_service("replicator")
    Cluster.digest(b)
    cluster.wait_converged(timeout=90)
    assert len(b.client().all_records("big", "rows")) == rows
    log = b.log_path("replicator").read_text()
    assert log.count("resuming copy of big") >= 3
