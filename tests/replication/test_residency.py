"""Replication count and residency (``replicateTo``): each record is whole on exactly N
nodes and a stub elsewhere; every node answers reads and indexed searches (real
processes, TLS)."""

from __future__ import annotations

import random
from collections import Counter
from functools import partial
from typing import Any

import grpc
import orjson
import pytest
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.storage import keys, residency
from tests.conftest import MakeCluster
from tests.harness.client import expect_error
from tests.harness.cluster import Cluster, line
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

DB = "app"
TABLE = "items"
KEYS = 10_000
COLORS = ("red", "green", "blue", "white")
RESIDENCY = {"replication": {"databases": [{"name": DB, "replicateTo": 2}]}}


def _record(i: int) -> dict[str, Any]:
    return {"id": i, "color": COLORS[i % len(COLORS)], "payload": f"item {i} " + "x" * 40}


def _states(node: Node) -> dict[Any, list[Any]]:
    """Every row of the table on one node, read from its storage: id -> decoded state."""
    client = node.internal_client()
    out: dict[Any, list[Any]] = {}
    for chunk in client.stream("Snapshot", pb.SnapshotRequest(database=DB, tables=[TABLE])):
        for row in chunk.rows:
            out[orjson.loads(row.id)] = orjson.loads(row.state)
    return out


def _whole(node: Node, state: list[Any]) -> bool:
    """A row this node holds in full: it is a resident and the row is not a stub."""
    residency = state[5] if len(state) == 6 else None
    return residency is not None and node.name in residency[2] and not residency[3]


def _filled(make_cluster: MakeCluster) -> Cluster:
    cluster = make_cluster(size=4, config=RESIDENCY)
    cluster.wait_connected()
    cluster.wait_members()
    cluster[0].client().create_table(DB, TABLE, indexed=["color"])
    for node in cluster:
        wait_for(partial(_has_table, node), 30, f"{node.name} to have {DB}.{TABLE}")
    batch = 500
    for n, start in enumerate(range(0, KEYS, batch)):
        writer = cluster[n % 4].client()  # every node places some records
        writer.insert(DB, TABLE, [_record(i) for i in range(start, start + batch)])
    for node in cluster:
        wait_for(partial(_counts, node, KEYS), 90, f"{node.name} to count every record")
    return cluster


def _counts(node: Node, count: int) -> bool:
    return bool(node.client().describe(DB, TABLE).record_count == count)


def _whole_on(node: Node, pk: Any) -> bool:
    state = _states(node).get(pk)
    return state is not None and _whole(node, state)


def _has_table(node: Node) -> bool:
    try:
        node.client().describe(DB, TABLE)
        return True
    except grpc.RpcError:
        return False


def test_every_record_is_whole_on_exactly_two_nodes_and_readable_everywhere(
    make_cluster: MakeCluster,
) -> None:
    cluster = _filled(make_cluster)
    names = {node.name for node in cluster}
    holders: dict[Any, set[str]] = {i: set() for i in range(KEYS)}
    residents: dict[Any, tuple[str, ...]] = {}

    def settled() -> bool:
        for node in cluster:
            for pk, state in _states(node).items():
                if _whole(node, state):
                    holders[pk].add(node.name)
        return all(len(h) == 2 for h in holders.values())

    wait_for(settled, 60, "every record to be whole on two nodes")
    for node in cluster:
        states = _states(node)
        assert len(states) == KEYS  # a stub or the record on every node
        for pk, state in states.items():
            assert len(state) == 6, f"{pk} has no residency on {node.name}"
            listed = tuple(state[5][2])
            assert residents.setdefault(pk, listed) == listed  # every node agrees
            if _whole(node, state):
                assert state[3] == _record(pk)
            else:
                # A stub: key and indexed attributes only, the payload is not here.
                assert state[3] == {"id": pk, "color": COLORS[pk % len(COLORS)]}
    assert all(set(residents[pk]) == holders[pk] for pk in holders)
    assert {n for r in residents.values() for n in r} == names

    # Even spread: each node is a resident of about half the keys (2 of 4), within 10%.
    per_node = Counter(n for r in residents.values() for n in r)
    expected = KEYS * 2 / 4
    for name, count in per_node.items():
        assert abs(count - expected) <= expected * 0.10, (name, count, per_node)

    # Any node answers get-by-id and indexed searches with whole records.
    sample = random.Random(7).sample(range(KEYS), 200)
    for node in cluster:
        client = node.client()
        got = client.get(DB, TABLE, sample)
        assert sorted(got, key=lambda r: r["id"]) == [_record(i) for i in sorted(sample)]
        reds = client.by_value(DB, TABLE, "color", "red")
        assert len(reds) == KEYS // 4
        assert all(r == _record(r["id"]) for r in reds)
        some = client.by_value(DB, TABLE, "color", "blue", limit=10, get_attributes=["payload"])
        assert len(some) == 10 and all(r["payload"].startswith("item ") for r in some)


def test_a_write_names_its_residents(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, config=RESIDENCY)
    cluster.wait_connected()
    cluster.wait_members()
    client = cluster[0].client()
    client.create_table(DB, TABLE, indexed=["color"])
    only = cluster[2].name
    client.call(
        "Insert",
        pb.InsertRequest(
            database=DB,
            table=TABLE,
            records=[orjson.dumps(_record(1))],
            replicate_to=types_pb2.ReplicateTo(nodes=[only]),
        ),
    )
    wait_for(lambda: 1 in _states(cluster[2]), 30, "the record on its resident")
    assert _whole(cluster[2], _states(cluster[2])[1])
    # A later write on another node keeps the residents.
    wait_for(lambda: 1 in _states(cluster[1]), 30, "the stub on node 2")
    cluster[1].client().update(DB, TABLE, [{"id": 1, "payload": "changed"}])
    wait_for(
        lambda: _states(cluster[2])[1][3].get("payload") == "changed",
        30,
        "the update to reach the resident",
    )
    assert cluster[0].client().get(DB, TABLE, [1]) == [{**_record(1), "payload": "changed"}]
    assert tuple(_states(cluster[1])[1][5][2]) == (only,)
    # A count beyond the members, or a name that is not a member, writes nothing.
    for replicate_to, words in (
        (types_pb2.ReplicateTo(count=4), ("more than the 3 members",)),
        (types_pb2.ReplicateTo(nodes=["nobody"]), ("nobody", "not a member")),
    ):
        request = pb.InsertRequest(
            database=DB, table=TABLE, records=[orjson.dumps(_record(2))], replicate_to=replicate_to
        )
        expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, partial(client.call, "Insert", request), *words
        )
    assert client.get(DB, TABLE, [2]) == []


def test_reads_survive_a_stopped_resident_and_fail_clearly_without_any(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(size=4, config=RESIDENCY)
    cluster.wait_connected()
    cluster.wait_members()
    writer = cluster[0].client()
    writer.create_table(DB, TABLE, indexed=["color"])
    writer.insert(DB, TABLE, [_record(i) for i in range(400)])
    for node in cluster:
        wait_for(partial(_counts, node, 400), 60, f"{node.name} to count every record")
    residents = {pk: tuple(state[5][2]) for pk, state in _states(cluster[0]).items()}
    by_name = {node.name: node for node in cluster}
    stopped = cluster[3]
    # Records the stopped node is a resident of, read from a node that is not.
    reader = next(
        n
        for n in cluster.nodes[:3]
        if any(stopped.name in r and n.name not in r for r in residents.values())
    )
    affected = [pk for pk, r in residents.items() if stopped.name in r and reader.name not in r]
    # Every resident is whole before the stop.
    for pk in affected:
        for name in residents[pk]:
            wait_for(partial(_whole_on, by_name[name], pk), 30, f"{pk} whole on {name}")
    stopped.stop("replicator", "storage")
    got = reader.client().get(DB, TABLE, affected)
    assert sorted(got, key=lambda r: r["id"]) == [_record(pk) for pk in sorted(affected)]

    # Stop the other resident of one of them too: that read fails naming both.
    pk = affected[0]
    other = next(n for n in residents[pk] if n != stopped.name)
    by_name[other].stop("replicator", "storage")
    wait_for(
        lambda: not (reader.connection(other) and reader.connection(other).connected),
        30,
        f"{reader.name} to see {other} gone",
    )
    error = expect_error(
        grpc.StatusCode.UNAVAILABLE, lambda: reader.client().get(DB, TABLE, [pk]), other
    )
    assert stopped.name in (error.details() or "")


def _resident_views(cluster: Cluster, live: list[Node]) -> dict[Any, dict[str, bytes]]:
    """id -> {node: canonical whole state} over the live nodes holding it whole."""
    views: dict[Any, dict[str, bytes]] = {}
    for node in live:
        for pk, state in _states(node).items():
            if _whole(node, state):
                views.setdefault(pk, {})[node.name] = orjson.dumps(
                    [*state[:5], state[5][:3]], option=orjson.OPT_SORT_KEYS
                )
    return views


def test_removing_a_resident_rehomes_its_records(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=4, config=RESIDENCY, services=("storage", "replicator", "admin"))
    cluster.wait_connected()
    cluster.wait_members()
    writer = cluster[0].client()
    writer.create_table(DB, TABLE, indexed=["color"])
    records = 400
    writer.insert(DB, TABLE, [_record(i) for i in range(records)])
    for node in cluster:
        wait_for(partial(_counts, node, records), 60, f"{node.name} to count every record")
    gone = cluster[3]
    live = cluster.nodes[:3]
    residents = {pk: tuple(state[5][2]) for pk, state in _states(cluster[0]).items()}
    moved = [pk for pk, r in residents.items() if gone.name in r]
    assert moved
    wait_for(
        lambda: (
            all(len(v) == 2 for v in _resident_views(cluster, cluster.nodes).values())
            and len(_resident_views(cluster, cluster.nodes)) == records
        ),
        60,
        "every record whole on its two residents",
    )
    gone.stop("admin", "replicator", "storage")
    # Reads of its records still succeed through their other resident.
    got = cluster[1].client().get(DB, TABLE, moved)
    assert sorted(got, key=lambda r: r["id"]) == [_record(pk) for pk in sorted(moved)]
    cluster[0].admin().ok({"operation": "remove_node", "hostname": gone.name})

    def repaired() -> bool:
        views = _resident_views(cluster, live)
        return len(views) == records and all(
            len(v) == 2 and len(set(v.values())) == 1 for v in views.values()
        )

    wait_for(repaired, 90, "every record back on two live residents, identical")
    for node in live:
        for pk, state in _states(node).items():
            assert gone.name not in state[5][2], (node.name, pk, state)
    for node in live:
        got = node.client().get(DB, TABLE, moved)
        assert sorted(got, key=lambda r: r["id"]) == [_record(pk) for pk in sorted(moved)]


def _placed_everywhere(cluster: Cluster, records: int) -> bool:
    """Every record whole on exactly its listed residents, on every node's view."""
    views = _resident_views(cluster, cluster.nodes)
    if len(views) != records:
        return False
    listed = {pk: set(state[5][2]) for pk, state in _states(cluster[0]).items()}
    return all(set(v) == listed[pk] and len(set(v.values())) == 1 for pk, v in views.items())


def test_adding_a_node_moves_nothing_until_a_rebalance(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        start=False, size=4, config=RESIDENCY, services=("storage", "replicator", "admin")
    )
    first, late = cluster.nodes[:3], cluster[3]
    for node in first:
        node.start()
    writer = cluster[0].client()
    wait_for(
        lambda: (
            {r["name"] for r in writer.all_records("system", "hdb_nodes", "name")}
            >= {n.name for n in first}
        ),
        30,
        "the first three members",
    )
    writer.create_table(DB, TABLE, indexed=["color"])
    records = 400
    writer.insert(DB, TABLE, [_record(i) for i in range(records)])
    for node in first:
        wait_for(partial(_counts, node, records), 60, f"{node.name} to count every record")
    late.start()
    cluster.wait_members()
    wait_for(partial(_counts, late, records), 60, "the new node to count every record")
    before = {pk: tuple(state[5][2]) for pk, state in _states(cluster[0]).items()}
    assert all(late.name not in r for r in before.values())  # nothing moved to it

    admin = cluster[0].admin()
    dry = admin.ok({"operation": "rebalance", "database": DB, "dry_run": True})
    assert dry["message"] == "rebalance dry run started"
    assert all(r["ok"] for r in dry["replicated"])

    def finished(node: Node) -> dict[str, Any] | None:
        status = node.admin().ok({"operation": "cluster_status"})["residency"]["rebalance"]
        return status if status["passes"] and not status["running"] else None

    counted = [wait_for(partial(finished, n), 30, f"{n.name} dry run") for n in cluster]
    # Rendezvous over 4 nodes instead of 3 moves about a quarter of the residencies.
    would_move = sum(c["rehomed"] for c in counted)
    assert records * 0.25 < would_move < records * 0.75, counted
    assert all(c["dry_run"] for c in counted)
    assert {pk: tuple(s[5][2]) for pk, s in _states(cluster[0]).items()} == before

    admin.ok({"operation": "rebalance", "database": DB})
    wait_for(lambda: _placed_everywhere(cluster, records), 90, "the rebalance to settle")
    after = {pk: tuple(state[5][2]) for pk, state in _states(cluster[0]).items()}
    members = [n.name for n in cluster]
    for pk, residents in after.items():
        ideal = residency.rendezvous(DB, TABLE, keys.encode_key(pk), members, 2)
        assert residents == ideal
    assert sum(late.name in r for r in after.values()) > records * 0.3
    for node in cluster:
        got = node.client().get(DB, TABLE, list(range(0, records, 7)))
        assert got == [_record(i) for i in range(0, records, 7)]


def test_a_member_down_too_long_has_its_records_rehomed(make_cluster: MakeCluster) -> None:
    config = {"replication": {**RESIDENCY["replication"], "residencyRepairAfter": "3s"}}
    cluster = make_cluster(size=4, config=config, services=("storage", "replicator", "admin"))
    cluster.wait_connected()
    cluster.wait_members()
    writer = cluster[0].client()
    writer.create_table(DB, TABLE, indexed=["color"])
    records = 200
    writer.insert(DB, TABLE, [_record(i) for i in range(records)])
    wait_for(lambda: _placed_everywhere(cluster, records), 60, "every record placed")
    down = cluster[2]
    live = [n for n in cluster if n is not down]
    down.stop("admin", "replicator", "storage")

    def repaired() -> bool:
        views = _resident_views(cluster, live)
        return len(views) == records and all(
            len(v) == 2 and len(set(v.values())) == 1 for v in views.values()
        )

    wait_for(repaired, 90, "every record back on two live residents")
    status = cluster[0].admin().ok({"operation": "cluster_status"})["residency"]
    assert status["gone"] == [down.name]
    # When it comes back it learns its records moved and keeps stubs of them.
    down.start()
    wait_for(
        lambda: (
            all(_whole(down, s) == (down.name in s[5][2]) for s in _states(down).values())
            and not any(down.name in s[5][2] for s in _states(down).values())
        ),
        60,
        "the returning node to hold only stubs",
    )


def test_residency_is_refused_where_a_relay_would_carry_it(make_cluster: MakeCluster) -> None:
    """A - B - C in a line (no gossip): a relay would pass only stubs of records whose
    residents are A and C, so a write naming residents is refused and writes nothing."""
    cluster = make_cluster(size=3, topology=line)
    cluster.wait_connected()
    a, _, c = cluster.nodes
    a.client().create_table(DB, TABLE, indexed=["color"])
    wait_for(partial(_has_table, c), 30, "the table on c")
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        partial(
            a.client().call,
            "Insert",
            pb.InsertRequest(
                database=DB,
                table=TABLE,
                records=[orjson.dumps(_record(1))],
                replicate_to=types_pb2.ReplicateTo(nodes=[a.name, c.name]),
            ),
        ),
        "replication.gossip false",
    )
    a.client().insert(DB, TABLE, [_record(2)])  # without residents: whole everywhere
    for node in cluster:
        wait_for(partial(_counts, node, 1), 30, f"{node.name} to hold the plain write")
        assert set(_states(node)) == {2}


def test_rebalance_typed_rpc_and_errors(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, config=RESIDENCY, services=("storage", "replicator", "admin"))
    cluster.wait_connected()
    cluster[0].client().create_table(DB, TABLE)
    cluster[0].client().create_table("plain", "t")
    admin = cluster[0].admin()
    reply = admin.call(
        "Rebalance", apb.RebalanceRequest(database=DB, dry_run=True, replicated=True)
    )
    assert reply.progress.dry_run and [r.ok for r in reply.replicated] == [True]
    status = admin.call("ClusterStatus", apb.ClusterStatusRequest())
    assert status.HasField("residency") and not status.residency_error
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        partial(admin.call, "Rebalance", apb.RebalanceRequest(database="plain")),
        "'plain' has no residency",
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        partial(admin.call, "Rebalance", apb.RebalanceRequest(database="nowhere")),
        "nowhere",
    )
