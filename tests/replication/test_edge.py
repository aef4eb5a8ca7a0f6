"""Controlled flow and data selection: a dial-out-only edge node, sends/receives,
`replicate: false` tables, and `replication.databases`."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeCluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster


def _records(node: Node, database: str, table: str) -> list[dict[str, Any]]:
    try:
        return node.client().all_records(database, table)
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise


def test_dial_out_only_node_sends_and_receives(make_cluster: MakeCluster) -> None:
    # The edge (node 1) routes to the cloud (node 0); the cloud has no route to the edge.
    cluster = make_cluster(size=2, topology=lambda names: {names[0]: [], names[1]: [names[0]]})
    cloud, edge = cluster[0], cluster[1]
    cloud.client().create_table("iot", "thresholds")
    cloud.client().insert("iot", "thresholds", [{"id": "temp", "max": 30}])
    edge.client().create_table("iot", "alerts")
    edge.client().insert("iot", "alerts", [{"id": 1, "sensor": "temp", "value": 35}])
    cluster.wait_converged(["iot"])
    assert _records(edge, "iot", "thresholds") == [{"id": "temp", "max": 30}]
    assert _records(cloud, "iot", "alerts") == [{"id": 1, "sensor": "temp", "value": 35}]
    # Exactly one connection, dialed by the edge.
    edge_view = edge.connection(cloud.name)
    cloud_view = cloud.connection(edge.name)
    assert edge_view.connected and edge_view.dialed
    assert cloud_view.connected and not cloud_view.dialed


def test_mutual_routes_make_exactly_one_connection(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    a.client().create_table("db", "t")
    a.client().insert("db", "t", [{"id": 1}])
    cluster.wait_converged(["db"])

    first, second = sorted((a, b), key=lambda n: n.name)

    def settled() -> bool:
        # One connection, dialed by the node with the smaller name (the tie-break).
        mine, theirs = first.connection(second.name), second.connection(first.name)
        return bool(mine.connected and theirs.connected and mine.dialed and not theirs.dialed)

    wait_for(settled, 20, "a single connection dialed by the smaller name")
    a.client().insert("db", "t", [{"id": 2}])
    cluster.wait_converged(["db"])
    assert settled()


def test_controlled_flow_is_obeyed(make_cluster: MakeCluster) -> None:
    # Node 1 routes to node 0 and only receives from it: node 1's data stays home.
    cluster = make_cluster(
        size=2,
        topology=lambda names: {names[0]: [], names[1]: []},
        node_config={},
        start=False,
    )
    a, b = cluster[0], cluster[1]
    b.update_config(
        {
            "replication": {
                "routes": [{"hostname": a.name, "replicates": {"sends": False, "receives": True}}]
            }
        }
    )
    cluster.start()
    a.client().create_table("db", "from_a")
    a.client().insert("db", "from_a", [{"id": 1}])
    b.client().create_table("db2", "from_b")
    b.client().insert("db2", "from_b", [{"id": 2}])
    wait_for(lambda: _records(b, "db", "from_a") == [{"id": 1}], 30, "a's data on b")
    view = b.connection(a.name)
    assert view.receives and not view.sends
    # b's own data never reaches a: a write after the flow is established, then a marker from a
    # that travels the same connection proves b had every chance to send.
    b.client().insert("db2", "from_b", [{"id": 3}])
    a.client().insert("db", "from_a", [{"id": 4}])
    wait_for(lambda: len(_records(b, "db", "from_a")) == 2, 30, "the marker on b")
    assert _records(a, "db2", "from_b") == []


def test_local_tables_and_database_selection(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, config={"replication": {"databases": ["shared", "other"]}})
    a, b = cluster[0], cluster[1]
    client = a.client()
    client.create_table("shared", "public")
    client.create_table("shared", "secret", replicate=False)
    client.create_table("private", "notes")
    client.insert("shared", "public", [{"id": 1}])
    client.insert("shared", "secret", [{"id": 2, "pin": 1234}])
    client.insert("private", "notes", [{"id": 3}])
    # A transaction across a local and a replicated table sends only the replicated part.
    client.call(
        "Transact",
        pb.TransactRequest(
            database="shared",
            operations=[
                pb.TransactOperation(
                    table="public", operation=types_pb2.OPERATION_INSERT, records=[b'{"id": 10}']
                ),
                pb.TransactOperation(
                    table="secret", operation=types_pb2.OPERATION_INSERT, records=[b'{"id": 11}']
                ),
            ],
        ),
    )
    wait_for(lambda: len(_records(b, "shared", "public")) == 2, 30, "shared.public on b")
    described = b.client().call("DescribeAll", pb.DescribeAllRequest())
    tables = {(d.name, t.name) for d in described.databases for t in d.tables}
    assert ("shared", "secret") not in tables
    assert all(d.name != "private" for d in described.databases)
    assert _records(b, "shared", "public") == [{"id": 1}, {"id": 10}]
