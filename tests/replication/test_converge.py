"""Nodes writing concurrently converge to identical data (real processes, TLS)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import MakeCluster
from tests.harness.cluster import line, mesh, star
from tests.harness.node import Node

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("cluster")]


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
