"""Membership through system.hdb_nodes: add_node on one node reaches every node (gossip),
remove_node propagates and closes connections, and membership survives restarts."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb

from tests.conftest import MakeCluster
from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

ALL = ("storage", "replicator", "admin")
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED = 3, 5, 6, 7
FAILED_PRECONDITION = 9


def _unrouted(make_cluster: MakeCluster, size: int) -> Cluster:
    """Nodes that know nothing of each other: no routes, gossip on."""
    return make_cluster(
        size=size, topology=lambda names: {n: [] for n in names}, services=ALL, gossip=True
    )


def _wait_mesh(nodes: list[Node], timeout: float = 30.0) -> None:
    def all_connected() -> bool:
        return all(a.connected(b.name) for a in nodes for b in nodes if a is not b)

    wait_for(all_connected, timeout, "every node connected to every other")


def _members(node: Node) -> set[str]:
    rows: list[dict[str, Any]] = node.admin().ok(
        {
            "operation": "search_by_value",
            "database": "system",
            "table": "hdb_nodes",
            "attribute": "name",
            "value": "*",
        }
    )
    return {r["name"] for r in rows}


def _lists(node: Node, names: set[str]) -> bool:
    return _members(node) == names


def test_add_node_on_one_node_reaches_every_node(make_cluster: MakeCluster) -> None:
    cluster = _unrouted(make_cluster, 3)
    a, b, c = cluster
    admin = a.admin()
    added = admin.ok({"operation": "add_node", "hostname": b.name})
    assert added["message"] == f"Successfully added '{b.name}' to cluster"
    assert added["node"]["name"] == b.name and added["node"]["replicates"] is True
    _wait_mesh([a, b])
    # c is added on a only; b learns of c through a's hdb_nodes, and c learns of b.
    admin.ok({"operation": "add_node", "url": f"shoals://{c.name}:9933"})
    _wait_mesh([a, b, c])
    names = {a.name, b.name, c.name}
    for node in cluster:
        wait_for(partial(_lists, node, names), 20, f"{node.name} to list every member")
    # Data written on c reaches b over their own connection.
    c.client().create_table("data", "dog")
    c.client().insert("data", "dog", [{"id": 1, "name": "Penny"}])
    cluster.wait_converged(["data"])
    assert b.connection(c.name).connected

    # Membership survives a restart of every replicator (no routes configured at all).
    for node in cluster:
        node.restart("replicator")
    _wait_mesh([a, b, c])


def test_remove_node_propagates_and_closes_connections(make_cluster: MakeCluster) -> None:
    cluster = _unrouted(make_cluster, 3)
    a, b, c = cluster
    admin = a.admin()
    admin.ok({"operation": "add_node", "hostname": b.name})
    admin.ok({"operation": "add_node", "hostname": c.name})
    _wait_mesh([a, b, c])

    removed = b.admin().ok({"operation": "remove_node", "hostname": c.name})
    assert removed == {"message": f"Successfully removed '{c.name}' from cluster"}
    wait_for(
        lambda: not a.connected(c.name) and not b.connected(c.name),
        20,
        "a and b to drop their connections with c",
    )
    assert _members(a) == {a.name, b.name}
    listed = a.admin().call("ListNodes", apb.ListNodesRequest())
    assert c.name in listed.removed and {n.name for n in listed.nodes} == {a.name, b.name}
    # c is refused from now on, and what it writes no longer reaches the others.
    c.client().create_table("data", "late")
    c.client().insert("data", "late", [{"id": 1}])
    wait_for(lambda: c.status().removed, 20, "c to learn it was removed")
    assert c.admin().ok({"operation": "cluster_status"})["removed"] is True
    assert not a.connected(c.name) and not b.connected(c.name)
    assert "data" not in {
        d.name for d in a.client().call("DescribeAll", spb.DescribeAllRequest()).databases
    }

    # Added back on a, c rejoins everyone.
    a.admin().ok({"operation": "add_node", "hostname": c.name})
    _wait_mesh([a, b, c])
    cluster.wait_converged(["data"])


def test_typed_membership_rpcs_and_errors(make_cluster: MakeCluster) -> None:
    cluster = _unrouted(make_cluster, 2)
    a, b = cluster
    admin = a.admin()
    reply = admin.call(
        "AddNode",
        apb.AddNodeRequest(route=rpb.Route(hostname=b.name, secure=True, port=9933), shard=2),
    )
    assert reply.node.name == b.name and reply.node.url == f"shoals://{b.name}:9933"
    assert reply.node.shard == 2
    _wait_mesh([a, b])

    def code(operation: dict[str, Any]) -> int:
        return int(admin.execute(operation)[1])

    assert code({"operation": "add_node", "hostname": b.name}) == ALREADY_EXISTS
    assert code({"operation": "add_node", "hostname": a.name}) == INVALID_ARGUMENT
    assert code({"operation": "add_node", "hostname": "bad host!"}) == INVALID_ARGUMENT
    assert code({"operation": "add_node", "url": "ftp://x"}) == INVALID_ARGUMENT
    assert code({"operation": "add_node"}) == INVALID_ARGUMENT
    assert code({"operation": "update_node", "hostname": "127.9.9.9"}) == NOT_FOUND
    assert code({"operation": "remove_node", "hostname": "127.9.9.9"}) == NOT_FOUND
    assert code({"operation": "remove_node", "hostname": a.name}) == INVALID_ARGUMENT
    # The certificate exchange replaces only generated certificates; a is configured.
    assert (
        code({"operation": "add_node", "hostname": "127.9.9.8", "authorization": "Basic eDp5"})
        == FAILED_PRECONDITION
    )
    assert (
        code({"operation": "add_node", "hostname": "127.9.9.8", "authorization": "Digest x"})
        == INVALID_ARGUMENT
    )
    assert (
        code(
            {
                "operation": "update_node",
                "hostname": b.name,
                "subscriptions": [{"database": "data"}],
            }
        )
        == INVALID_ARGUMENT
    )
    # None of the refused requests changed the membership.
    assert _members(a) == {a.name, b.name}

    admin.ok({"operation": "add_role", "role": "reader", "permission": {"super_user": False}})
    admin.ok({"operation": "add_user", "username": "ro", "password": "pw-123456", "role": "reader"})
    result, denied = a.admin("ro", "pw-123456").execute(
        {"operation": "add_node", "hostname": "127.9.9.7"}
    )
    assert denied == PERMISSION_DENIED and "super user" in result["reason"]

    updated = admin.ok(
        {"operation": "update_node", "hostname": b.name, "replicates": {"receives": False}}
    )
    assert updated["node"]["replicates"] == {"sends": True, "receives": False}
    assert updated["node"]["shard"] == 2  # kept: update changes only what it names


def test_add_node_with_explicit_subscriptions(make_cluster: MakeCluster) -> None:
    cluster = _unrouted(make_cluster, 2)
    a, b = cluster
    for node in cluster:
        node.client().create_table("data", "shared")
        node.client().create_table("data", "private")
    a.admin().ok(
        {
            "operation": "add_node",
            "hostname": b.name,
            "subscriptions": [
                {"schema": "data", "table": "shared", "publish": True, "subscribe": True}
            ],
        }
    )
    _wait_mesh([a, b])
    a.client().insert("data", "shared", [{"id": "from-a"}])
    a.client().insert("data", "private", [{"id": "from-a"}])
    b.client().insert("data", "shared", [{"id": "from-b"}])
    b.client().insert("data", "private", [{"id": "from-b"}])
    wait_for(
        lambda: (
            len(a.client().all_records("data", "shared")) == 2
            and len(b.client().all_records("data", "shared")) == 2
        ),
        20,
        "the subscribed table to replicate both ways",
    )
    # The private table never travels: a later write on the shared table arrived after it.
    a.client().insert("data", "shared", [{"id": "last"}])
    wait_for(
        lambda: len(b.client().all_records("data", "shared")) == 3, 20, "the last shared write"
    )
    assert [r["id"] for r in a.client().all_records("data", "private")] == ["from-a"]
    assert [r["id"] for r in b.client().all_records("data", "private")] == ["from-b"]


def test_configure_cluster_replaces_the_membership(make_cluster: MakeCluster) -> None:
    cluster = _unrouted(make_cluster, 3)
    a, b, c = cluster
    admin = a.admin()
    admin.ok({"operation": "add_node", "hostname": b.name})
    _wait_mesh([a, b])
    result = admin.ok({"operation": "configure_cluster", "connections": [{"hostname": c.name}]})
    assert result["added"] == [c.name] and result["removed"] == [b.name]
    _wait_mesh([a, c])
    wait_for(lambda: not a.connected(b.name), 20, "a to drop b")
    assert _members(a) == {a.name, c.name}
    refused = admin.execute(
        {"operation": "configure_cluster", "connections": [{"hostname": c.name}, "junk"]}
    )
    assert refused[1] == INVALID_ARGUMENT and _members(a) == {a.name, c.name}


def test_update_node_refuses_what_a_route_overrides(make_cluster: MakeCluster) -> None:
    """With a route to b in a's shoal.yaml, the route wins over b's row on a: update_node
    on a of the connection settings is refused, saying so, and changes nothing."""
    cluster = make_cluster(size=2, services=ALL)  # each node routes to the other
    a, b = cluster
    cluster.wait_members()
    before = next(r for r in a.admin().ok(_ALL_ROWS) if r["name"] == b.name)
    changes: list[dict[str, Any]] = [
        {"replicates": {"receives": False}},
        {"subscriptions": []},
        {"start_time": 1763793000000},
    ]
    for change in changes:
        result, code = a.admin().execute(
            {"operation": "set_node_replication", "hostname": b.name, **change}
        )
        assert code == FAILED_PRECONDITION, result
        assert "route" in result["error"] and "cluster_set_routes" in result["error"]
    assert next(r for r in a.admin().ok(_ALL_ROWS) if r["name"] == b.name) == before
    # What every node reads from the row whatever its routes is still updated.
    updated = a.admin().ok(
        {"operation": "update_node", "hostname": b.name, "revoked_certificates": ["0BADC0DE"]}
    )
    assert updated["node"]["revoked_certificates"] == ["0BADC0DE"]


_ALL_ROWS = {
    "operation": "search_by_value",
    "database": "system",
    "table": "hdb_nodes",
    "attribute": "name",
    "value": "*",
}
