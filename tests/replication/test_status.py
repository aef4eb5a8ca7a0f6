"""The replicator's Status, route startTime, and what is deliberately not replicated."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster


def test_status_reports_each_connection_and_database(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    cluster.wait_connected()
    a, b = cluster[0], cluster[1]
    a.client().create_table("db", "t")
    reply = a.client().insert("db", "t", [{"id": i} for i in range(10)])
    cluster.wait_converged()

    def confirmed() -> Any:
        view = a.connection(b.name)
        dbs = {d.database: d for d in view.databases}
        return "db" in dbs and dbs["db"].last_commit_confirmed >= reply.version and view

    view = wait_for(confirmed, 20, "a's data confirmed by b")
    assert view.connected and view.sends and view.receives
    assert view.connected_since.seconds > 0
    db = {d.database: d for d in view.databases}["db"]
    assert db.backlog_transactions == 0
    assert view.back_pressure_percent == 0.0

    def received() -> Any:
        seen = b.connection(a.name)
        dbs = {d.database: d for d in seen.databases}
        return "db" in dbs and dbs["db"].last_received_version >= reply.version and seen

    b_view = wait_for(received, 20, "b's view of a's data")
    assert {d.database: d for d in b_view.databases}["db"].last_received_local_time.seconds > 0
    wait_for(lambda: a.connection(b.name).latency_ms > 0, 20, "a latency measurement")


def test_status_shows_how_long_a_peer_can_stay_away(make_cluster: MakeCluster) -> None:
    """The log margin: the whole retention while a peer is connected, counting down once
    it is gone (cluster_status in Harper JSON as `logMarginSeconds`)."""
    cluster = make_cluster(size=2, config={"logging": {"auditRetention": "1h"}})
    cluster.wait_connected()
    a, b = cluster[0], cluster[1]
    assert a.connection(b.name).log_margin_seconds == 3600
    b.stop("replicator", "storage")
    wait_for(lambda: not a.connected(b.name), 30, f"{a.name} to see {b.name} gone")
    first = a.connection(b.name).log_margin_seconds
    assert 3500 < first < 3600
    wait_for(
        lambda: a.connection(b.name).log_margin_seconds < first - 0.5, 10, "the margin to shrink"
    )


def test_copy_progress_is_visible(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        size=2, start=False, node_config={1: {"replication": {"copyRowsPerSecond": 4000}}}
    )
    a, b = cluster[0], cluster[1]
    a.start("storage", "replicator")
    a.client().create_table("big", "t")
    for start in range(0, 15000, 1000):
        a.client().insert("big", "t", [{"id": i} for i in range(start, start + 1000)])
    b.start("storage", "replicator")

    def copying() -> Any:
        view = b.connection(a.name)
        if view is None:
            return None
        dbs = {d.database: d for d in view.databases}
        return (
            "big" in dbs
            and dbs["big"].HasField("copy")
            and dbs["big"].copy.rows > 0
            and dbs["big"].copy
        )

    progress = wait_for(copying, 30, "copy progress in b's status")
    assert progress.source == a.name and progress.estimated_rows == 15000
    assert 0 < progress.rows < 15000 and progress.bytes > 0
    cluster.wait_converged(timeout=60)

    def finished() -> bool:
        view = b.connection(a.name)
        return not {d.database: d for d in view.databases}["big"].HasField("copy")

    wait_for(finished, 20, "the copy to be reported finished")


def test_route_start_time_skips_the_copy(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, start=False, topology=lambda names: {names[0]: [], names[1]: []})
    a, b = cluster[0], cluster[1]
    a.start("storage", "replicator")
    a.client().create_table("db", "t")
    a.client().insert("db", "t", [{"id": "before"}])
    start = dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=50)
    b.update_config(
        {"replication": {"routes": [{"hostname": a.name, "startTime": start.isoformat()}]}}
    )
    b.start("storage")
    wait_for(
        lambda: dt.datetime.now(dt.UTC) > start + dt.timedelta(milliseconds=20), 5, "startTime"
    )
    a.client().insert("db", "t", [{"id": "after"}])
    b.start_service("replicator")
    wait_for(lambda: _ids(b) == ["after"], 30, "only the write after startTime on b")
    a.client().insert("db", "t", [{"id": "later"}])
    wait_for(lambda: _ids(b) == ["after", "later"], 30, "later writes too")


def _ids(node: Node) -> list[str]:
    try:
        records = node.client().all_records("db", "t")
    except Exception:
        return []
    return sorted(r["id"] for r in records)


def test_drops_are_local(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    a.client().create_table("db", "keep")
    a.client().insert("db", "keep", [{"id": 1, "x": 1}])
    cluster.wait_converged()
    a.client().call("DropTable", pb.DropTableRequest(database="db", table="keep"))
    a.client().create_table("db", "marker")
    wait_for(lambda: "marker" in _tables(b), 30, "the marker table on b")
    assert "keep" in _tables(b)
    assert b.client().all_records("db", "keep") == [{"id": 1, "x": 1}]


def _tables(node: Node) -> set[str]:
    reply = node.client().call("DescribeAll", pb.DescribeAllRequest())
    return {t.name for d in reply.databases for t in d.tables}
