"""Harper's form of the clustering operations through Execute, on real processes:
cluster_status (Harper's keys and types, its time format, Shoal's additions as extra keys,
no start-up error shown once connected) and the routes operations (Harper's keys, routes
answered as they were given)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.conftest import MakeCluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")
# JavaScript's Date.toUTCString(), as Harper shows cluster_status times.
UTC_STRING = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$"
)


def _socket(node: Node, peer: str, database: str) -> dict[str, Any] | None:
    status = node.admin().ok({"operation": "cluster_status"})
    for connection in status["connections"]:
        if connection["name"] == peer:
            for socket in connection["database_sockets"]:
                if socket["database"] == database:
                    return dict(socket)
    return None


def test_cluster_status_answers_harpers_form(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, services=ALL, start=False)
    a, b = cluster[0], cluster[1]
    a.start()
    # b is not up yet: a's dials fail, and the failure shows while they do.
    wait_for(lambda: a.last_error(b.name), 30, f"{a.name}'s dials of {b.name} to fail")
    b.start()
    cluster.wait_connected()
    a.client().create_table("db", "t")
    cluster.wait_converged(["db"])
    a.client().insert("db", "t", [{"id": 1}])
    b.client().insert("db", "t", [{"id": 2}])

    def timed() -> dict[str, Any] | None:
        socket = _socket(a, b.name, "db")
        wanted = ("lastCommitConfirmed", "lastReceivedRemoteTime", "lastReceivedLocalTime")
        return socket if socket and all(k in socket for k in wanted) else None

    wait_for(timed, 30, "a's socket of db with b to show its times")
    status = a.admin().ok({"operation": "cluster_status"})

    # Harper's keys first, in Harper's order; Shoal's own after them.
    assert list(status)[:4] == ["type", "connections", "node_name", "is_enabled"]
    assert status["type"] == "cluster-status"
    assert status["node_name"] == a.name and status["is_enabled"] is True
    assert {"removed", "residency"} <= set(status)
    [connection] = status["connections"]
    assert connection["name"] == b.name
    assert connection["url"] == f"shoals://{b.name}:9933"  # its route
    assert connection["replicates"] is True  # Harper's type: true, or {sends, receives}
    assert connection["replicateByDefault"] is True
    assert connection["subscriptions"] is None
    # Shoal's additions stay as extra keys; the start-up error no longer shows.
    assert connection["connected"] is True and connection["dialed"] in (True, False)
    assert connection["lastConnectionError"] is None
    assert connection["backPressurePercent"] == 0
    assert connection["flowingTables"] == {"receives": None, "sends": None}

    sockets = {s["database"]: s for s in connection["database_sockets"]}
    socket = sockets["db"]
    assert list(socket)[:6] == [
        "database",
        "connected",
        "latency",
        "thread_id",
        "threadId",
        "nodes",
    ]
    assert socket["connected"] is True
    assert isinstance(socket["latency"], float)
    assert isinstance(socket["thread_id"], int) and socket["threadId"] == socket["thread_id"]
    assert socket["nodes"] == [b.name]
    for key in ("lastCommitConfirmed", "lastReceivedRemoteTime", "lastReceivedLocalTime"):
        assert UTC_STRING.match(socket[key]), (key, socket[key])
    assert isinstance(socket["lastReceivedVersion"], float) and socket["lastReceivedVersion"] > 0
    assert socket["lastReceivedStatus"] in ("Receiving", "Waiting")
    assert isinstance(socket["backPressurePercent"], float | int)
    assert socket["lastConnectionError"] is None
    assert socket["backlog"] == {"transactions": 0, "seconds": socket["backlog"]["seconds"]}
    assert "copy" in socket

    # The other way: b's view of a (a flow restricted by a route shows as an object).
    b_status = b.admin().ok({"operation": "cluster_status"})
    assert [c["name"] for c in b_status["connections"]] == [a.name]


def test_routes_answer_with_harpers_keys(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, topology=lambda names: {n: [] for n in names}, services=ALL)
    a, b = cluster[0], cluster[1]
    admin = a.admin()
    route = {"host": b.name, "port": 9933}

    assert admin.ok({"operation": "cluster_get_routes"}) == []
    assert admin.ok({"operation": "cluster_set_routes", "routes": [route]}) == {
        "message": "cluster routes successfully set",
        "set": [route],
        "skipped": [],
    }
    assert admin.ok({"operation": "cluster_get_routes"}) == [route]
    written = yaml.safe_load(a.config_path.read_text())["replication"]["routes"]
    assert written == [route]  # shoal.yaml keeps the route as it was given

    # Harper's documented forms: a URL string and {hostname, port}; both name b, so both
    # are skipped, and answered as given.
    again = admin.ok(
        {
            "operation": "cluster_set_routes",
            "routes": [f"wss://{b.name}:9933", {"hostname": b.name, "port": 9933}],
        }
    )
    assert again == {
        "message": "cluster routes successfully set",
        "set": [],
        "skipped": [f"wss://{b.name}:9933", {"hostname": b.name, "port": 9933}],
    }
    wait_for(lambda: a.connected(b.name), 30, "the route's connection")

    deleted = admin.ok(
        {"operation": "cluster_delete_routes", "routes": [route, {"host": "nobody", "port": 9933}]}
    )
    assert deleted == {
        "message": "cluster routes successfully deleted",
        "deleted": [route],
        "skipped": [{"host": "nobody", "port": 9933}],
    }
    assert admin.ok({"operation": "cluster_get_routes"}) == []

    # A string route is kept and answered as a string.
    url = f"wss://{b.name}:9933"
    assert admin.ok({"operation": "cluster_set_routes", "routes": [url]})["set"] == [url]
    assert admin.ok({"operation": "cluster_get_routes"}) == [url]
    status = admin.ok({"operation": "cluster_status"})
    [connection] = status["connections"]
    assert connection["url"] == f"shoals://{b.name}:9933"
