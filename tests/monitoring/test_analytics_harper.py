"""Harper's metric names through Execute, on real processes: list_metrics lists them next to
Shoal's own, and get_analytics answers their rows (`db-write`, `db-read`, `success`,
`resource-usage` here; `bytes-sent` and `bytes-received` with a peer)."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import MakeCluster, MakeNode
from tests.harness.admin import AdminClient
from tests.harness.wait import wait_for

HARPER_NAMES = ["db-read", "db-write", "success", "resource-usage", "bytes-sent", "bytes-received"]
SEARCH = "shoal.storage.v1.StorageService/SearchById"


def _start() -> int:
    return time.time_ns() // 1_000_000 // 1000 * 1000 - 1000


def _rows(admin: AdminClient, metric: str, start: int, **extra: Any) -> list[dict[str, Any]]:
    rows = admin.ok(
        {"operation": "get_analytics", "metric": metric, "start_time": start, "period": 1000}
        | extra
    )
    assert isinstance(rows, list)
    return rows


def _on(attribute: str, value: str) -> list[dict[str, str]]:
    return [{"attribute": attribute, "comparator": "equals", "value": value}]


def test_harper_metric_names_are_listed_and_answered(make_node: MakeNode) -> None:
    node = make_node(services=("storage", "replicator", "admin"))
    admin = node.admin()
    listed = admin.ok({"operation": "list_metrics"})
    assert set(HARPER_NAMES) <= set(listed) and "records-written" in listed

    start = _start()
    client = node.client()
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": i} for i in range(4)])
    admin.ok({"operation": "search_by_id", "database": "dev", "table": "dog", "ids": [0, 1]})

    def total(metric: str, table: str) -> float:
        return sum(r["value"] for r in _rows(admin, metric, start, conditions=_on("table", table)))

    wait_for(lambda: total("db-write", "dog") == 4, 30, "db-write to count the 4 records")
    written = _rows(admin, "db-write", start, conditions=_on("table", "dog"))
    assert {(r["metric"], r["database"], r["table"]) for r in written} == {
        ("db-write", "dev", "dog")
    }
    wait_for(lambda: total("db-read", "dog") >= 2, 30, "db-read to count the records read")

    def searched() -> float:
        return sum(
            r["value"] for r in _rows(admin, "success", start, conditions=_on("method", SEARCH))
        )

    wait_for(lambda: searched() >= 1, 30, "success to count the search")

    def usage() -> set[str]:
        return {r["service"] for r in _rows(admin, "resource-usage", start)}

    wait_for(lambda: usage() == {"storage", "replicator"}, 30, "resource-usage of both services")
    [row, *_] = _rows(admin, "resource-usage", start, conditions=_on("service", "storage"))
    assert row["metric"] == "resource-usage" and row["period"] == 1000
    assert isinstance(row["value"], int | float) and row["value"] >= 0


def test_bytes_sent_and_received_with_a_peer(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, services=("storage", "replicator", "admin"))
    cluster.wait_connected()
    a, b = cluster[0], cluster[1]
    start = _start()
    a.client().create_table("dev", "dog")
    a.client().insert("dev", "dog", [{"id": 1, "name": "x" * 100}])
    cluster.wait_converged(["dev"])

    def bytes_of(node_admin: AdminClient, metric: str, peer: str) -> float:
        return sum(
            r["value"] for r in _rows(node_admin, metric, start, conditions=_on("peer", peer))
        )

    wait_for(lambda: bytes_of(a.admin(), "bytes-sent", b.name) > 0, 30, "a's bytes-sent to b")
    wait_for(lambda: bytes_of(b.admin(), "bytes-received", a.name) > 0, 30, "b's bytes-received")
