"""Static shards: a sharded database replicates only among the nodes of one shard; the
`system` database and unsharded databases go everywhere."""

from __future__ import annotations

from functools import partial
from typing import Any

import grpc
import pytest

from tests.conftest import MakeCluster
from tests.harness.cluster import line
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

DATABASES = ["*", {"name": "metrics", "sharded": True}]
SHARDS = [1, 1, 2, 2]


def _ids(node: Node, database: str, table: str) -> set[Any]:
    try:
        return {r["id"] for r in node.internal_client().all_records(database, table)}
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
            return set()
        raise


def _ensure_table(node: Node, database: str, table: str) -> None:
    """Create a table unless replication already brought it."""
    try:
        node.client().create_table(database, table)
    except grpc.RpcError as exc:
        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.ALREADY_EXISTS):
            raise


def _holds(node: Node, database: str, table: str, ids: set[Any]) -> bool:
    return _ids(node, database, table) == ids


def _has(node: Node, database: str, table: str, key: Any) -> bool:
    return key in _ids(node, database, table)


def _rows_name_shards(node: Node, shards: dict[str, int]) -> bool:
    """True when ``node``'s system.hdb_nodes holds exactly these nodes with these shards."""
    rows = node.internal_client().all_records("system", "hdb_nodes", "name")
    return {r["name"]: r.get("shard") for r in rows} == shards


def test_sharded_database_never_leaves_its_shard(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        size=4,
        start=False,
        config={"replication": {"databases": DATABASES}},
        node_config={i: {"replication": {"shard": s}} for i, s in enumerate(SHARDS)},
    )
    nodes = list(cluster)
    # Three nodes first: the fourth joins later and gets what exists by copies.
    for node in nodes[:3]:
        node.start()
    for i, node in enumerate(nodes[:3]):
        _ensure_table(node, "metrics", "m")
        _ensure_table(node, "shared", "s")
        client = node.client()
        client.insert("metrics", "m", [{"id": f"early{i}", "shard": SHARDS[i]}])
        client.insert("shared", "s", [{"id": f"early{i}"}])
    wait_for(
        lambda: all(_ids(n, "shared", "s") == {"early0", "early1", "early2"} for n in nodes[:3]),
        60,
        "the early unsharded rows everywhere",
    )
    nodes[3].start()
    cluster.wait_connected()
    for i, node in enumerate(nodes):
        client = node.client()
        client.insert("metrics", "m", [{"id": f"n{i}", "shard": SHARDS[i]}])
        client.insert("shared", "s", [{"id": f"n{i}"}])

    everywhere = {f"early{i}" for i in range(3)} | {f"n{i}" for i in range(4)}
    expected = {
        1: {"early0", "early1", "n0", "n1"},
        2: {"early2", "n2", "n3"},
    }
    for i, node in enumerate(nodes):
        wait_for(
            partial(_holds, node, "shared", "s", everywhere),
            60,
            f"every unsharded row on {node.name}",
        )
        wait_for(
            partial(_holds, node, "metrics", "m", expected[SHARDS[i]]),
            60,
            f"its shard's rows of metrics on {node.name}",
        )

    # A last sharded write, then an unsharded marker from the same node: the marker travels
    # the same streams after it, so once the marker is everywhere the sharded row would
    # have reached the other shard too, had it leaked.
    nodes[0].client().insert("metrics", "m", [{"id": "late", "shard": 1}])
    nodes[0].client().insert("shared", "s", [{"id": "marker"}])
    for node in nodes:
        wait_for(partial(_has, node, "shared", "s", "marker"), 60, f"marker on {node.name}")
    wait_for(lambda: "late" in _ids(nodes[1], "metrics", "m"), 60, "the late row in shard 1")
    for i, node in enumerate(nodes):
        rows = node.internal_client().all_records("metrics", "m")
        assert {r["shard"] for r in rows} == {SHARDS[i]}, (node.name, rows)
        held = {r["id"] for r in rows}
        assert held == expected[SHARDS[i]] | ({"late"} if SHARDS[i] == 1 else set())
    # Within a shard the sharded database is identical; the unsharded one everywhere.
    assert cluster.digest(nodes[0], ["metrics"]) == cluster.digest(nodes[1], ["metrics"])
    assert cluster.digest(nodes[2], ["metrics"]) == cluster.digest(nodes[3], ["metrics"])
    assert cluster.digest(nodes[0], ["metrics"]) != cluster.digest(nodes[2], ["metrics"])
    assert len(set(cluster.digests(["shared"]))) == 1

    # Status: each node's shard, its peers' shards, and what is withheld from which peer.
    for i, node in enumerate(nodes):
        status = node.status()
        assert status.shard == SHARDS[i]
        for j, peer in enumerate(nodes):
            if j == i:
                continue
            view = node.connection(peer.name)
            assert view.connected and view.shard == SHARDS[j]
            withheld = [] if SHARDS[i] == SHARDS[j] else ["metrics"]
            assert list(view.withheld_databases) == withheld
            # Nothing withheld was ever sent: the receivers refused nothing.
            assert "refused" not in view.last_connection_error, view.last_connection_error
    # Each node's row in system.hdb_nodes carries its shard, on every node.
    names = {node.name: shard for node, shard in zip(nodes, SHARDS, strict=True)}
    for node in nodes:
        wait_for(partial(_rows_name_shards, node, names), 30, "shards in hdb_nodes")


def test_cluster_status_shows_shards(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        size=2,
        services=("storage", "replicator", "admin"),
        config={"replication": {"databases": DATABASES}},
        node_config={0: {"replication": {"shard": 1}}, 1: {"replication": {"shard": 2}}},
    )
    cluster.wait_connected()
    a, b = cluster[0], cluster[1]
    status = a.admin().ok({"operation": "cluster_status"})
    assert status["shard"] == 1
    (connection,) = [c for c in status["connections"] if c["name"] == b.name]
    assert connection["shard"] == 2
    assert connection["withheldDatabases"] == ["metrics"]
    # A sharded write on a stays on a; an unsharded one reaches b.
    a.client().create_table("metrics", "m")
    a.client().insert("metrics", "m", [{"id": 1}])
    a.client().create_table("shared", "s")
    a.client().insert("shared", "s", [{"id": 1}])
    wait_for(lambda: _ids(b, "shared", "s") == {1}, 30, "the unsharded row on b")
    assert _ids(b, "metrics", "m") == set()


def test_a_relay_never_carries_a_sharded_database_out_of_its_shard(
    make_cluster: MakeCluster,
) -> None:
    # a - b - c in a line: b relays a's transactions to c. a and b are of shard 1, c of 2.
    cluster = make_cluster(
        size=3,
        topology=line,
        config={"replication": {"databases": DATABASES}},
        node_config={i: {"replication": {"shard": s}} for i, s in enumerate([1, 1, 2])},
    )
    cluster.wait_connected()
    a, b, c = cluster[0], cluster[1], cluster[2]
    _ensure_table(a, "metrics", "m")
    _ensure_table(a, "shared", "s")
    a.client().insert("metrics", "m", [{"id": "from_a"}])
    a.client().insert("shared", "s", [{"id": "marker"}])
    wait_for(lambda: _ids(c, "shared", "s") == {"marker"}, 60, "the relayed marker on c")
    wait_for(lambda: _ids(b, "metrics", "m") == {"from_a"}, 60, "the sharded row on b")
    # b got the sharded row before the marker and relayed the marker, not the row.
    assert _ids(c, "metrics", "m") == set()
    assert list(b.connection(c.name).withheld_databases) == ["metrics"]
    assert "refused" not in c.connection(b.name).last_connection_error
