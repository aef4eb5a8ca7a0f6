"""Analytics kept as history, through real processes: per-second rows of what was
written, get_analytics and list_metrics (Execute and typed), their errors, and analytics
that stay on their node."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from shoal.admin.v1 import admin_pb2 as apb

from services.common import analytics
from tests.conftest import MakeCluster, MakeNode
from tests.harness.admin import AdminClient
from tests.harness.client import expect_error
from tests.harness.node import Node
from tests.harness.wait import wait_for

INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED = 3, 5, 7, 8
INSERT = "shoal.storage.v1.StorageService/Insert"
SERVICES = ("storage", "replicator", "admin")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def this_second() -> int:
    """Start of the current second: a row's time is the start of the second it covers."""
    return now_ms() // 1000 * 1000


def per_second(admin: AdminClient, metric: str, start: int, **extra: Any) -> list[Any]:
    rows = admin.ok(
        {"operation": "get_analytics", "metric": metric, "start_time": start, "period": 1000}
        | extra
    )
    assert isinstance(rows, list)
    return rows


def on_table(table: str) -> list[dict[str, str]]:
    return [{"attribute": "table", "comparator": "equals", "value": table}]


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    return make_node(services=SERVICES)


def test_writes_appear_per_second_and_add_up(node: Node) -> None:
    admin = node.admin()
    client = node.client()
    client.create_table("dev", "dog")
    start = this_second()
    batches = [3, 5, 7]
    written = 0
    for size in batches:
        client.insert("dev", "dog", [{"id": written + i} for i in range(size)])
        written += size

        def recorded(total: int = written) -> list[Any] | None:
            rows = per_second(admin, "records-written", start, conditions=on_table("dog"))
            return rows if sum(r["value"] for r in rows) == total else None

        # Wait for this batch's second to be recorded, so the next batch lands in a
        # later second and every batch has a row of its own.
        rows = wait_for(recorded, 30, f"records-written to reach {written}")

    assert [r["value"] for r in rows] == batches
    for row in rows:
        assert row["metric"] == "records-written" and row["period"] == 1000
        assert (row["database"], row["table"]) == ("dev", "dog")
        assert row["time"] % 1000 == 0 and start <= row["time"] <= now_ms()
        assert row["id"] == analytics.row_id("records-written", row["time"], ("dev", "dog"))
    assert [r["time"] for r in rows] == sorted({r["time"] for r in rows})

    # Calls per method: one Insert call per batch.
    inserts = [{"attribute": "method", "comparator": "equals", "value": INSERT}]
    calls = per_second(admin, "requests", start, conditions=inserts)
    assert sum(r["value"] for r in calls) == len(batches)
    durations = per_second(admin, "request-duration", start, conditions=inserts)
    assert sum(r["count"] for r in durations) == len(batches)
    assert all(0 < r["value"] < 30 for r in durations)

    # get_attributes picks attributes; an end time bounds the range.
    picked = per_second(
        admin,
        "records-written",
        start,
        conditions=on_table("dog"),
        get_attributes=["time", "value"],
        end_time=rows[1]["time"],
    )
    assert picked == [{"time": r["time"], "value": r["value"]} for r in rows[:2]]

    # The typed RPC answers the same rows.
    typed = admin.call(
        "GetAnalytics",
        apb.GetAnalyticsRequest(
            metric="records-written",
            start_time_ms=start,
            period_ms=1000,
            labels={"table": "dog", "database": "dev"},
        ),
    )
    assert [(r.time_ms, r.value, dict(r.labels)) for r in typed.rows] == [
        (r["time"], r["value"], {"database": "dev", "table": "dog"}) for r in rows
    ]

    # Gauges are sampled every second; the replicator's samples arrive too.
    assert per_second(admin, "log-size", start)
    assert per_second(admin, "replication-connected", 0) == []  # no peers


def test_list_metrics_and_the_errors_of_both_operations(node: Node) -> None:
    admin = node.admin()
    names = [m.name for m in analytics.METRICS]
    assert admin.ok({"operation": "list_metrics"}) == names
    assert admin.ok({"operation": "list_metrics", "metric_types": ["builtin", "custom"]}) == names
    assert admin.ok({"operation": "list_metrics", "metric_types": ["custom"]}) == []
    typed = admin.call("ListMetrics", apb.ListMetricsRequest())
    assert list(typed.metrics) == names

    def error(operation: dict[str, Any], code: int, *words: str) -> None:
        result, answered = admin.execute(operation)
        assert answered == code, result
        assert all(w in result["error"] for w in words), result

    error({"operation": "list_metrics", "metric_types": ["bogus"]}, INVALID_ARGUMENT, "bogus")
    error({"operation": "get_analytics"}, INVALID_ARGUMENT, "metric", "required")
    error({"operation": "get_analytics", "metric": "nope"}, NOT_FOUND, "nope", "list_metrics")
    error(
        {"operation": "get_analytics", "metric": "log-size", "start_time": 2000, "end_time": 1000},
        INVALID_ARGUMENT,
        "end_time",
        "before",
    )
    error(
        {"operation": "get_analytics", "metric": "log-size", "start_time": "yesterday"},
        INVALID_ARGUMENT,
        "start_time",
    )
    error({"operation": "get_analytics", "metric": "log-size", "start_time": -5}, INVALID_ARGUMENT)
    error({"operation": "get_analytics", "metric": "log-size", "period": 10}, INVALID_ARGUMENT)
    error(
        {"operation": "get_analytics", "metric": "log-size", "conditions": [{"value": 1}]},
        INVALID_ARGUMENT,
        "condition 0",
    )
    # A known metric without rows in the range is an empty history.
    assert admin.ok({"operation": "get_analytics", "metric": "log-size", "end_time": 1}) == []

    expect_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: admin.call("GetAnalytics", apb.GetAnalyticsRequest(metric="nope")),
        "nope",
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: admin.call(
            "GetAnalytics",
            apb.GetAnalyticsRequest(metric="log-size", start_time_ms=5, end_time_ms=4),
        ),
        "before",
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: admin.call(
            "GetAnalytics", apb.GetAnalyticsRequest(metric="log-size", labels={"peer": "x"})
        ),
        "peer",
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: admin.call("ListMetrics", apb.ListMetricsRequest(metric_types=["bogus"])),
        "bogus",
    )

    # Super user only.
    admin.ok({"operation": "add_role", "role": "reader", "permission": {"super_user": False}})
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw", "role": "reader"})
    ann = node.admin("ann", "pw")
    for operation in (
        {"operation": "get_analytics", "metric": "log-size"},
        {"operation": "list_metrics"},
    ):
        result, code = ann.execute(operation)
        assert code == PERMISSION_DENIED and "super user" in result["reason"]
    expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        lambda: ann.call("GetAnalytics", apb.GetAnalyticsRequest(metric="log-size")),
        "super user",
    )


def test_a_result_larger_than_max_rows_is_refused(make_node: MakeNode) -> None:
    node = make_node(services=("storage", "admin"), config={"analytics": {"maxRows": 3}})
    admin = node.admin()
    query = {"operation": "get_analytics", "metric": "log-size", "period": 1000}

    def refused() -> str | None:
        result, code = admin.execute(query)
        return result["error"] if code == RESOURCE_EXHAUSTED else None

    message = wait_for(refused, 30, "four seconds of log-size samples")
    assert "more than 3 rows" in message and "analytics.maxRows" in message
    # A narrower range fits: the seconds of a window of 1.5 s, among those recorded.
    now = now_ms()
    rows = admin.ok(query | {"start_time": now - 3500, "end_time": now - 2000})
    assert 1 <= len(rows) <= 2
    assert all(now - 3500 <= r["time"] <= now - 2000 for r in rows)


@pytest.mark.cluster
def test_analytics_stay_on_their_node(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, services=SERVICES)
    a, b = cluster[0], cluster[1]
    cluster.wait_members()
    start = this_second()
    client = a.client()
    client.create_table("db", "t")
    client.insert("db", "t", [{"id": i} for i in range(10)])
    cluster.wait_converged()
    on_a, on_b = a.admin(), b.admin()

    def written_on_a() -> bool:
        rows = per_second(on_a, "records-written", start, conditions=on_table("t"))
        return sum(r["value"] for r in rows) == 10

    wait_for(written_on_a, 30, "a's records-written rows")

    def connected(admin: AdminClient, peer: str) -> bool:
        rows = per_second(admin, "replication-connected", start)
        return any(r["peer"] == peer and r["value"] == 1 for r in rows)

    wait_for(lambda: connected(on_a, b.name), 30, "a's samples of its connection to b")
    wait_for(lambda: connected(on_b, a.name), 30, "b's samples of its connection to a")
    received = per_second(on_b, "replication-received-transactions", start)
    assert sum(r["value"] for r in received if r["peer"] == a.name) >= 1

    # b applied a's records but wrote none itself; a's rows never reached b.
    assert per_second(on_b, "records-written", start, conditions=on_table("t")) == []
    for admin, own in ((on_a, a.name), (on_b, b.name)):
        rows = per_second(admin, "replication-connected", 0)
        assert rows and {r["peer"] for r in rows} == {b.name if own == a.name else a.name}
    # Nothing about the analytics tables is in either node's transaction log.
    for node in (a, b):
        log = node.client().transactions("system")
        assert log  # membership rows are logged (and replicate)
        tables = {w.table for t in log for w in t.writes} | {s.name for t in log for s in t.tables}
        assert not tables & {analytics.RAW_TABLE, analytics.AGGREGATE_TABLE}, tables
