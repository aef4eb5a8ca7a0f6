"""add_node with start_time on three TLS nodes: the new node's own row keeps the settings a
member wrote, and the node starts from that time instead of copying what came before."""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest

from tests.conftest import MakeCluster
from tests.harness.joined import joined_mesh
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster


def _row(node: Node, name: str) -> dict[str, Any] | None:
    rows: list[dict[str, Any]] = node.admin().ok(
        {"operation": "search_by_id", "database": "system", "table": "hdb_nodes", "ids": [name]}
    )
    return rows[0] if rows else None


def _ids(node: Node) -> set[Any]:
    return {r["id"] for r in node.client().all_records("dev", "events")}


def test_add_node_with_start_time_is_honoured(make_cluster: MakeCluster) -> None:
    cluster = joined_mesh(make_cluster)
    a, b, c = cluster
    a.client().create_table("dev", "events")
    a.client().insert("dev", "events", [{"id": "early"}])
    cluster.wait_converged(["dev"])

    a.admin().ok({"operation": "remove_node", "hostname": c.name})
    wait_for(lambda: c.status().removed, 30, "c to learn it was removed")
    c.stop()
    shutil.rmtree(c.config["rootPath"])

    a.client().insert("dev", "events", [{"id": "before-t1"}])
    t1 = int(time.time() * 1000) + 1
    wait_for(lambda: time.time() * 1000 > t1 + 5, 2, "the clock to pass T1")
    b.client().insert("dev", "events", [{"id": "after-t1"}])
    added = a.admin().ok({"operation": "add_node", "hostname": c.name, "start_time": t1})
    assert added["node"]["start_time"] is not None
    wait_for(
        lambda: (_row(b, c.name) or {}).get("start_time") is not None, 30, "the row to reach b"
    )

    c.start()  # a fresh node: no data, no routes
    wait_for(lambda: a.connected(c.name) and b.connected(c.name), 30, "a and b to reach c")
    a.client().insert("dev", "events", [{"id": "later"}])
    wait_for(lambda: {"after-t1", "later"} <= _ids(c), 30, "the writes after T1 to reach c")
    # The fresh node wrote its own row; the start_time add_node wrote survives it.
    for node in cluster:
        row = _row(node, c.name)
        assert row is not None and row.get("start_time") == added["node"]["start_time"]
    assert _ids(c) == {"after-t1", "later"}
