"""Explicit subscriptions on three TLS nodes: a subscription that widens catches up on
the writes it was not subscribed to, and cluster_status shows each connection's tables."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import MakeCluster
from tests.harness.joined import joined_mesh
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

CAT_ONLY = [{"schema": "dev", "table": "cat", "publish": True, "subscribe": True}]


def _received(node: Node, peer: str) -> set[tuple[str, str]] | None:
    """The tables ``node`` receives from ``peer`` (empty: every table); None until
    connected."""
    connection = node.connection(peer)
    if connection is None or not connection.connected:
        return None
    return {(t.database, t.table) for t in connection.received_tables}


def _ids(node: Node, table: str) -> set[Any]:
    return {r["id"] for r in node.client().all_records("dev", table)}


def test_a_widened_subscription_catches_up(make_cluster: MakeCluster) -> None:
    cluster = joined_mesh(make_cluster)
    a, b, c = cluster
    a.client().create_table("dev", "cat")
    a.client().create_table("dev", "dog")
    a.client().insert("dev", "dog", [{"id": 600, "name": "before"}])
    cluster.wait_converged(["dev"])

    a.admin().ok(
        {"operation": "set_node_replication", "hostname": c.name, "subscriptions": CAT_ONLY}
    )
    narrow = {("dev", "cat"), ("system", "hdb_nodes")}
    wait_for(
        lambda: _received(c, a.name) == narrow and _received(c, b.name) == narrow,
        30,
        "c to receive only dev.cat from a and b",
    )
    status = c.admin().ok({"operation": "cluster_status"})
    shown = {x["name"]: x["flowingTables"] for x in status["connections"]}
    assert {(t["database"], t["table"]) for t in shown[a.name]["receives"]} == narrow
    assert shown[a.name]["sends"] is None  # c's own view: no subscriptions of its own

    # While c takes only cats, b writes a dog and then a cat: the cat moves c's position
    # of b past the dog.
    b.client().insert("dev", "dog", [{"id": 612, "name": "missed"}])
    b.client().insert("dev", "cat", [{"id": 4, "name": "cat4"}])
    wait_for(lambda: 4 in _ids(c, "cat"), 30, "cat 4 to reach c")
    assert 612 not in _ids(c, "dog")

    a.admin().ok({"operation": "set_node_replication", "hostname": c.name, "subscriptions": []})
    wait_for(
        lambda: _received(c, a.name) == set() and _received(c, b.name) == set(),
        30,
        "c to receive every table again",
    )
    a.client().insert("dev", "dog", [{"id": 611, "name": "after"}])
    wait_for(lambda: {611, 612} <= _ids(c, "dog"), 30, "both dogs to reach c")
    cluster.wait_converged(["dev"])
    assert _ids(c, "dog") == {600, 611, 612}
