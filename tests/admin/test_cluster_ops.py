"""Cluster operations through the admin service: status and routes, typed and JSON."""

from __future__ import annotations

import threading

import yaml
from shoal.admin.v1 import admin_pb2 as apb
from shoal.lifecycle.v1 import lifecycle_pb2 as lpb
from shoal.lifecycle.v1 import lifecycle_pb2_grpc
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.auth import bearer_metadata
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
        "set": [{"host": b.name}],
        "skipped": [],
    }
    assert _configured_routes(a) == [{"host": b.name}]  # as given, as Harper keeps it
    cluster.wait_converged(["db"])  # the replicator dialed the new route at once
    again = admin.ok({"operation": "cluster_set_routes", "routes": [b.name]})
    assert again["set"] == [] and again["skipped"] == [b.name]
    assert admin.ok({"operation": "cluster_get_routes"}) == [{"host": b.name}]

    status = admin.ok({"operation": "cluster_status"})
    assert status["node_name"] == a.name and status["is_enabled"] is True
    [connection] = status["connections"]
    assert connection["name"] == b.name and connection["connected"] is True
    assert any(s["database"] == "db" for s in connection["database_sockets"])

    deleted = admin.ok(
        {"operation": "cluster_delete_routes", "routes": [{"host": b.name}, {"host": "nobody"}]}
    )
    assert deleted["deleted"] == [{"host": b.name}] and deleted["skipped"] == [{"host": "nobody"}]
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


# -- cluster-wide operations (replicated: true) ---------------------------------------------


def _instance(node: Node, service: str) -> str:
    """The current start of one of the node's processes (shoal.lifecycle.v1, on its
    node-local socket)."""
    with node.socket_channel(service) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        reply = stub.GetInstance(
            lpb.GetInstanceRequest(), metadata=bearer_metadata(node.node_secret()), timeout=5
        )
        return str(reply.instance)


def _level(node: Node) -> str:
    return str(yaml.safe_load(node.config_path.read_text())["logging"]["level"])


def test_replicated_set_configuration_is_persisted_everywhere(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, services=ALL)
    cluster.wait_members()
    admin = cluster[0].admin()
    result = admin.ok(
        {"operation": "set_configuration", "logging_level": "debug", "replicated": True}
    )
    # Members in name order.
    expected = [{"node": name, "ok": True} for name in sorted(n.name for n in cluster.nodes[1:])]
    assert result["replicated"] == expected
    for node in cluster:
        assert _level(node) == "debug"
        assert node.admin().ok({"operation": "get_configuration"})["logging"]["level"] == "debug"

    # Refused up front, on this node, before any member is asked: nothing changes.
    bad, code = admin.execute(
        {"operation": "set_configuration", "logging.level": "loud", "replicated": True}
    )
    assert code == 3 and "logging.level" in bad["error"] and "replicated" not in bad
    unknown, code = admin.execute({"operation": "set_configuration", "logging_colour": "red"})
    assert code == 3 and "'logging_colour' is not a configuration key" in unknown["error"]
    refused, code = admin.execute(
        {"operation": "set_configuration", "replication_hostname": "other"}
    )
    assert code == 3 and "replication.hostname cannot be set" in refused["error"]
    assert [_level(node) for node in cluster] == ["debug"] * 3

    # The typed RPC, not replicated: this node only; the new setting holds after a restart.
    reply = admin.call(
        "SetConfiguration", apb.SetConfigurationRequest(settings=b'{"logging.level": "warn"}')
    )
    assert list(reply.keys) == ["logging.level"] and list(reply.replicated) == []
    assert [_level(node) for node in cluster] == ["warn", "debug", "debug"]


def test_replicated_drops_reach_every_node_and_plain_drops_stay_local(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(size=3, services=ALL)
    cluster.wait_members()
    cluster.wait_connected()
    a, b, c = cluster
    client = a.client()
    client.create_table("db", "kept")
    client.create_table("db", "gone")
    client.insert("db", "kept", [{"id": 1, "x": 1}])
    client.insert("db", "gone", [{"id": 1}])
    cluster.wait_converged(["db"])

    def tables(node: Node) -> set[str]:
        described = node.admin().ok({"operation": "describe_all"})
        return set(described.get("db", {}))

    local = b.admin().ok({"operation": "drop_table", "database": "db", "table": "kept"})
    assert "replicated" not in local
    assert [tables(n) for n in cluster] == [{"kept", "gone"}, {"gone"}, {"kept", "gone"}]

    result = a.admin().ok(
        {"operation": "drop_table", "database": "db", "table": "gone", "replicated": True}
    )
    assert sorted(r["node"] for r in result["replicated"]) == sorted([b.name, c.name])
    assert all(r["ok"] for r in result["replicated"])
    assert [tables(n) for n in cluster] == [{"kept"}, set(), {"kept"}]

    # A member whose admin service is down is reported, with the others' results.
    c.stop("admin")
    made = a.admin().ok({"operation": "create_database", "database": "extra", "replicated": True})
    by_node = {r["node"]: r for r in made["replicated"]}
    assert by_node[b.name] == {"node": b.name, "ok": True}
    assert by_node[c.name]["ok"] is False and by_node[c.name]["code"] == 14
    assert c.name in by_node[c.name]["error"]
    assert "extra" in b.admin().ok({"operation": "describe_all"})


def test_rolling_restart_under_load_loses_nothing(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, services=ALL)
    cluster.wait_members()
    cluster.wait_connected()
    a = cluster[0]
    writer_client = a.client()
    writer_client.create_table("load", "w")
    cluster.wait_converged(["load"])
    before = {n.name: _instance(n, "storage") for n in cluster}

    stop = threading.Event()
    acknowledged: list[int] = []
    down_together: list[list[str]] = []
    samples = [0]

    def write() -> None:
        next_id = 0
        while not stop.is_set():
            next_id += 1
            try:
                writer_client.insert("load", "w", [{"id": next_id, "v": next_id}])
            except Exception:
                continue  # not acknowledged (this node's storage is restarting)
            acknowledged.append(next_id)

    def up(node: Node) -> bool:
        try:
            return all(node.health(s) for s in ALL)
        except Exception:
            return False

    def sample() -> None:
        while not stop.is_set():
            down = [n.name for n in cluster if not up(n)]
            samples[0] += 1
            if len(down) > 1:
                down_together.append(down)

    threads = [threading.Thread(target=write), threading.Thread(target=sample)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(acknowledged) > 20, 30, "the writer to get going")
        result = a.admin().ok_within({"operation": "restart", "replicated": True}, 300)
        assert [r["ok"] for r in result["replicated"]] == [True, True], result
        assert result["services"] == list(ALL)
        wait_for(lambda: up(a), 60, "this node's admin service back")
        written = len(acknowledged)
        wait_for(lambda: len(acknowledged) > written + 20, 30, "writes after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert samples[0] > 10
    assert down_together == []
    assert all(_instance(n, "storage") != before[n.name] for n in cluster)
    cluster.wait_converged(["load"])
    for node in cluster:
        ids = {r["id"] for r in node.internal_client().all_records("load", "w", "id")}
        missing = set(acknowledged) - ids
        assert not missing, f"{node.name} lacks acknowledged writes {sorted(missing)[:10]}"
