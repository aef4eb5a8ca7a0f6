"""A cluster whose nodes meet only through add_node: no routes in shoal.yaml, gossip on,
so member rows (and what update_node writes into them) decide every connection."""

from __future__ import annotations

from tests.conftest import MakeCluster
from tests.harness.cluster import Cluster
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")


def joined_mesh(make_cluster: MakeCluster, size: int = 3, timeout: float = 30.0) -> Cluster:
    """``size`` TLS nodes, the first adding the others, once every pair is connected."""
    cluster = make_cluster(
        size=size, topology=lambda names: {n: [] for n in names}, services=ALL, gossip=True
    )
    first = cluster[0]
    for node in list(cluster)[1:]:
        first.admin().ok({"operation": "add_node", "hostname": node.name})
    wait_for(
        lambda: all(x.connected(y.name) for x in cluster for y in cluster if x is not y),
        timeout,
        "every node connected to every other",
    )
    return cluster
