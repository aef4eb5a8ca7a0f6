"""Cluster operations through the admin service: status and routes, typed and JSON."""

from __future__ import annotations

import yaml
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb

from tests.conftest import MakeCluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")


def _configured_routes(node: Node) -> list[object]:
    return list(yaml.safe_load(node.config_path.read_text())["replication"].get("routes", []))


def test_routes_are_persisted_and_applied_live(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, topology=lambda names: {n: [] for n in names}, services=ALL)
    a, b = cluster[0], cluster[1]
    admin = a.admin()
    assert admin.ok({"operation": "cluster_get_routes"}) == []
    b.client().create_table("db", "t")
    b.client().insert("db", "t", [{"id": 1}])
    result = admin.ok({"operation": "cluster_set_routes", "routes": [{"host": b.name}]})
    assert result == {
        "message": "cluster routes successfully set",
        "set": [{"hostname": b.name}],
        "skipped": [],
    }
    assert _configured_routes(a) == [b.name]
    cluster.wait_converged(["db"])  # the replicator dialed the new route at once
    again = admin.ok({"operation": "cluster_set_routes", "routes": [b.name]})
    assert again["set"] == [] and again["skipped"] == [{"hostname": b.name}]

    status = admin.ok({"operation": "cluster_status"})
    assert status["node_name"] == a.name and status["is_enabled"] is True
    [connection] = status["connections"]
    assert connection["name"] == b.name and connection["connected"] is True
    assert any(s["database"] == "db" for s in connection["database_sockets"])

    deleted = admin.ok(
        {"operation": "cluster_delete_routes", "routes": [{"host": b.name}, {"host": "nobody"}]}
    )
    assert deleted["deleted"] == [{"hostname": b.name}] and deleted["skipped"] == [
        {"hostname": "nobody"}
    ]
    assert _configured_routes(a) == []
    wait_for(
        lambda: not a.connection(b.name) or not a.connection(b.name).connected,
        20,
        "the route's connection closed",
    )
    a.restart("replicator")  # the file is the truth after a restart too
    assert admin.ok({"operation": "cluster_get_routes"}) == []


def test_typed_route_and_status_rpcs(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, topology=lambda names: {n: [] for n in names}, services=ALL)
    a, b = cluster[0], cluster[1]
    admin = a.admin()
    reply = admin.call(
        "SetRoutes", apb.SetRoutesRequest(routes=[rpb.Route(hostname=b.name, sends=False)])
    )
    assert [r.hostname for r in reply.set] == [b.name] and not reply.set[0].sends
    routes = admin.call("GetRoutes", apb.GetRoutesRequest()).routes
    assert [(r.hostname, r.sends, r.receives) for r in routes] == [(b.name, False, True)]
    assert _configured_routes(a) == [
        {"hostname": b.name, "replicates": {"sends": False, "receives": True}}
    ]

    def connected() -> list[rpb.Connection]:
        status = admin.call("ClusterStatus", apb.ClusterStatusRequest())
        return [c for c in status.connections if c.peer == b.name and c.connected]

    [connection] = wait_for(connected, 20, "the connection to b")
    assert connection.receives and not connection.sends
    bad = admin.execute({"operation": "cluster_set_routes", "routes": [a.name]})
    assert bad[1] == 3 and "this node itself" in bad[0]["error"]
    deleted = admin.call("DeleteRoutes", apb.DeleteRoutesRequest(hostnames=[b.name, "ghost"]))
    assert [r.hostname for r in deleted.deleted] == [b.name] and list(deleted.skipped) == ["ghost"]
