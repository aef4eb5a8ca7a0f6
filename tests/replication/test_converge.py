"""Nodes writing concurrently converge to identical data (real processes, TLS)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import MakeCluster, MakeNode
from tests.harness.cluster import FAST_REPLICATION, Cluster, line, mesh, star
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

ALL = ("storage", "replicator", "admin")


def _write(client_index: int, cluster_nodes: list[Node], records: int) -> None:
    node = cluster_nodes[client_index]
    client = node.client()
    for start in range(0, records, 10):
        client.insert(
            "app",
            "items",
            [
                {"id": f"n{client_index}-{i}", "writer": client_index, "n": i}
                for i in range(start, start + 10)
            ],
        )
        client.update(
            "app",
            "items",
            [
                {
                    "id": f"n{(client_index + 1) % len(cluster_nodes)}-{start}",
                    "touched": client_index,
                }
            ],
        )


@pytest.mark.parametrize("size,topology", [(2, mesh), (3, mesh), (3, line), (4, star)])
def test_concurrent_writers_converge(
    make_cluster: MakeCluster, size: int, topology: object
) -> None:
    cluster = make_cluster(size=size, topology=topology)
    cluster.wait_connected()
    cluster[0].client().create_table("app", "items", indexed=["writer"])
    cluster.wait_converged()  # the schema travels with the data
    threads = [threading.Thread(target=_write, args=(i, cluster.nodes, 200)) for i in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    digest = cluster.wait_converged(timeout=90)
    assert digest
    for node in cluster:
        records = node.client().all_records("app", "items")
        assert len(records) == 200 * size
        by_writer = node.client().by_value("app", "items", "writer", 0)
        assert len(by_writer) == 200


@pytest.mark.parametrize("then_write", [False, True], ids=["quiet", "then-write"])
def test_a_database_copied_onto_a_node_is_passed_on(make_node: MakeNode, then_write: bool) -> None:
    """B gets `dev` from A by a copy, which no log carries; C, connected only to B, learns
    of it from B's heartbeats and copies it from B, with no further write anywhere. When
    A writes to it right after the copy, B's log brings C that write first: B then answers
    that its history of `dev` starts later (LOG_TRUNCATED), and C copies the rest."""
    alone = {"replication": {**FAST_REPLICATION, "gossip": False}}
    a = make_node(services=ALL, config=alone)
    a.client().create_table("dev", "dog")
    a.client().insert("dev", "dog", [{"id": i, "name": f"dog {i}"} for i in range(50)])
    c = make_node(services=("storage", "replicator"), config=alone)
    b = make_node(
        services=ALL,
        config={"replication": {**FAST_REPLICATION, "gossip": False, "routes": [c.name]}},
    )
    wait_for(lambda: b.connected(c.name), 30, "b to connect to c")
    b.admin().ok({"operation": "cluster_set_routes", "routes": [c.name, a.name]})
    wait_for(lambda: Cluster.digest(b, ["dev"]) == Cluster.digest(a, ["dev"]), 30, "b to copy dev")
    if then_write:
        a.client().insert("dev", "dog", [{"id": 50, "name": "late"}])
    wait_for(
        lambda: Cluster.digest(c, ["dev"]) == Cluster.digest(a, ["dev"]),
        30,
        "c to get dev from b",
    )
    assert len(c.client().all_records("dev", "dog")) == (51 if then_write else 50)
    assert not c.connected(a.name)
