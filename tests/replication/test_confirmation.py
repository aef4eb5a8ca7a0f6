"""Write confirmation (`replicated_confirmation: N`): a write answers only once N peers
have durably committed it; with a peer down it fails at the deadline saying the write is
committed locally; an N no cluster member can satisfy is refused before anything is
written. Real nodes (storage, replicator, admin), TLS between replicators."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import grpc
import orjson
import pytest
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.storage import keys, residency
from tests.conftest import MakeCluster
from tests.harness.client import StorageClient, error_info, expect_error
from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

SERVICES = ("storage", "replicator", "admin")


def _ready(cluster: Cluster) -> None:
    cluster.wait_connected()
    cluster[0].client().create_table("conf", "t")
    cluster.wait_converged()


def _insert(client: StorageClient, record: dict[str, Any], n: int, timeout: float = 30) -> Any:
    return client.call(
        "Insert",
        pb.InsertRequest(
            database="conf",
            table="t",
            records=[orjson.dumps(record)],
            replicated_confirmation=n,
        ),
        timeout=timeout,
    )


def test_confirmed_writes_are_on_both_peers_when_acknowledged(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, services=SERVICES)
    _ready(cluster)
    a, b, c = cluster[0], cluster[1], cluster[2]
    writer = a.client()
    peers = [b.client(), c.client()]

    def on_both_peers(key: str) -> list[dict[str, Any]]:
        # Read right after the acknowledgement, from each peer's own storage: no waiting.
        found = [p.get("conf", "t", [key]) for p in peers]
        assert found[0] == found[1], f"{key}: the peers differ: {found}"
        return found[0]

    for i in range(10):
        reply = _insert(writer, {"id": f"k{i}", "n": i}, 2)
        assert reply.version and list(reply.inserted_ids) == [orjson.dumps(f"k{i}")]
        assert on_both_peers(f"k{i}") == [{"id": f"k{i}", "n": i}]

    writer.call(
        "Update",
        pb.UpdateRequest(
            database="conf",
            table="t",
            records=[orjson.dumps({"id": "k1", "n": 100})],
            replicated_confirmation=2,
        ),
    )
    assert on_both_peers("k1") == [{"id": "k1", "n": 100}]
    writer.call(
        "Upsert",
        pb.UpsertRequest(
            database="conf",
            table="t",
            records=[orjson.dumps({"id": "u1", "n": 7})],
            replicated_confirmation=2,
        ),
    )
    assert on_both_peers("u1") == [{"id": "u1", "n": 7}]
    writer.call(
        "Delete",
        pb.DeleteRequest(
            database="conf", table="t", ids=[orjson.dumps("k2")], replicated_confirmation=2
        ),
    )
    assert on_both_peers("k2") == []
    writer.call(
        "Transact",
        pb.TransactRequest(
            database="conf",
            operations=[
                pb.TransactOperation(
                    table="t",
                    operation=types_pb2.OPERATION_INSERT,
                    records=[orjson.dumps({"id": "x1"})],
                ),
                pb.TransactOperation(
                    table="t", operation=types_pb2.OPERATION_DELETE, ids=[orjson.dumps("k3")]
                ),
            ],
            replicated_confirmation=2,
        ),
    )
    assert on_both_peers("x1") == [{"id": "x1"}]
    assert on_both_peers("k3") == []

    # Harper's JSON operations, through the admin service.
    admin = a.admin()
    cases: list[tuple[str, dict[str, Any], str, list[dict[str, Any]]]] = [
        ("insert", {"records": [{"id": "h1", "v": 1}]}, "h1", [{"id": "h1", "v": 1}]),
        ("update", {"records": [{"id": "h1", "v": 2}]}, "h1", [{"id": "h1", "v": 2}]),
        ("upsert", {"records": [{"id": "h2", "v": 3}]}, "h2", [{"id": "h2", "v": 3}]),
        ("delete", {"ids": ["h1"]}, "h1", []),
    ]
    for operation, fields, key, expected in cases:
        admin.ok(
            {
                "operation": operation,
                "database": "conf",
                "table": "t",
                "replicated_confirmation": 2,
                **fields,
            }
        )
        assert on_both_peers(key) == expected, operation


def test_confirmation_times_out_with_a_peer_stopped(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3, services=SERVICES)
    _ready(cluster)
    a, b, c = cluster[0], cluster[1], cluster[2]
    c.stop()
    writer = a.client()

    # One confirmation still comes (from b).
    _insert(writer, {"id": "one"}, 1)
    assert b.client().get("conf", "t", ["one"]) == [{"id": "one"}]

    started = time.monotonic()
    try:
        _insert(writer, {"id": "late"}, 2, timeout=3)
    except grpc.RpcError as exc:
        error = exc
    else:
        raise AssertionError("a write confirmed by 2 peers with one of them stopped succeeded")
    elapsed = time.monotonic() - started
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    message = error.details() or ""
    for words in ("committed locally", "will still replicate", "1 of 2", b.name):
        assert words in message, f"{words!r} is not in {message!r}"
    info = error_info(error)
    assert info.reason == "REPLICATION_NOT_CONFIRMED"
    assert info.metadata["missing"] == "1" and info.metadata["confirmed"] == "1"
    assert 2.0 < elapsed < 3.0, f"answered after {elapsed:.2f}s with a 3 s deadline"
    # Committed locally, and on the peer that confirmed it.
    assert writer.get("conf", "t", ["late"]) == [{"id": "late"}]
    assert b.client().get("conf", "t", ["late"]) == [{"id": "late"}]

    # The same through Harper's JSON operations.
    result, code = a.admin().execute(
        {
            "operation": "insert",
            "table": "t",
            "database": "conf",
            "records": [{"id": "late-json"}],
            "replicated_confirmation": 2,
        },
        timeout=3,
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], result
    assert "committed locally" in result["error"] and "1 of 2" in result["error"]

    # ... and it does replicate once the peer is back.
    c.start("storage", "replicator", "admin")
    c_client = c.client()
    wait_for(
        lambda: len(c_client.get("conf", "t", ["late", "late-json"])) == 2,
        60,
        "the unconfirmed writes to reach the restarted peer",
    )


def test_confirmation_beyond_the_possible_recipients_is_refused_up_front(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(size=3, services=SERVICES)
    _ready(cluster)
    a = cluster[0]
    writer = a.client()
    writer.create_table("conf", "local", replicate=False)
    before = len(writer.transactions("conf"))

    for n, words in [
        (5, ("replicated_confirmation 5", "2 peers", "nothing was written")),
        (3, ("replicated_confirmation 3", "2 peers")),
        (-1, ("replicated_confirmation", "-1")),
    ]:
        writer.expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            "Insert",
            pb.InsertRequest(
                database="conf",
                table="t",
                records=[orjson.dumps({"id": f"refused{n}"})],
                replicated_confirmation=n,
            ),
            *words,
        )
    writer.expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "Insert",
        pb.InsertRequest(
            database="conf",
            table="local",
            records=[orjson.dumps({"id": "refused-local"})],
            replicated_confirmation=1,
        ),
        "does not replicate",
    )
    admin = a.admin()
    for value in (5, -1, 1.5, "2", True):
        result, code = admin.execute(
            {
                "operation": "insert",
                "database": "conf",
                "table": "t",
                "records": [{"id": "refused-json"}],
                "replicated_confirmation": value,
            }
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (value, result)
        assert "replicated_confirmation" in result["error"], result

    # Nothing was written: no record, no transaction in the log.
    assert writer.all_records("conf", "t") == []
    assert writer.all_records("conf", "local") == []
    assert len(writer.transactions("conf")) == before


# -- residency: only nodes holding the whole write confirm it -------------------------------

RESIDENT_DB = "app"
RESIDENT_TABLE = "t"
RESIDENCY = {"replication": {"databases": ["*", {"name": RESIDENT_DB, "replicateTo": 2}]}}


def _residents(names: list[str], key: str) -> tuple[str, ...]:
    """Where a record written first by a node knowing ``names`` is placed (the cluster's
    own rendezvous placement; the test checks the data against it)."""
    return residency.rendezvous(RESIDENT_DB, RESIDENT_TABLE, keys.encode_key(key), names, 2)


def _whole_on(nodes: list[Node], key: str) -> set[str]:
    """The nodes whose own storage holds the record whole right now (not a stub)."""
    holders = set()
    for node in nodes:
        reply = node.internal_client().stream(
            "Snapshot", pb.SnapshotRequest(database=RESIDENT_DB, tables=[RESIDENT_TABLE])
        )
        for chunk in reply:
            for row in chunk.rows:
                if orjson.loads(row.id) != key:
                    continue
                state = orjson.loads(row.state)
                residency_part = state[5] if len(state) == 6 else None
                whole = residency_part is None or (
                    node.name in residency_part[2] and not residency_part[3]
                )
                if whole and state[3].get("payload") == f"for {key}":
                    holders.add(node.name)
    return holders


def _resident_insert(client: StorageClient, key: str, n: int, timeout: float = 30) -> Any:
    return client.call(
        "Insert",
        pb.InsertRequest(
            database=RESIDENT_DB,
            table=RESIDENT_TABLE,
            records=[orjson.dumps({"id": key, "payload": f"for {key}"})],
            replicated_confirmation=n,
        ),
        timeout=timeout,
    )


def test_with_residents_an_acknowledged_write_is_whole_on_n_plus_one_nodes(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(size=4, services=SERVICES, config=RESIDENCY)
    cluster.wait_connected()
    cluster.wait_members()
    nodes = list(cluster)
    writer, stopped = nodes[0], nodes[3]
    names = sorted(n.name for n in nodes)
    client = writer.client()
    client.create_table(RESIDENT_DB, RESIDENT_TABLE)
    cluster.wait_converged()

    # Keys by where they are placed: with the writer among the residents or not, and
    # with the node stopped later among them or not.
    by_kind: dict[tuple[bool, bool], list[str]] = {}
    for i in range(400):
        key = f"k{i}"
        placed = _residents(names, key)
        by_kind.setdefault((writer.name in placed, stopped.name in placed), []).append(key)
    assert all(len(found) >= 4 for found in by_kind.values()), by_kind.keys()
    assert len(by_kind) == 4

    # All nodes up: acknowledged means whole on the writer and one peer when the writer
    # is a resident, and on both residents when it holds only a stub.
    for kind, keys_of_kind in sorted(by_kind.items()):
        for key in keys_of_kind[:2]:
            _resident_insert(client, key, 1)
            holders = _whole_on(nodes, key)
            assert holders == set(_residents(names, key)), (key, kind, holders)

    # Impossible with two residents: refused before anything is written.
    before = len(client.transactions(RESIDENT_DB))
    for key in (by_kind[(True, False)][2], by_kind[(False, False)][2]):
        error = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            partial(_resident_insert, client, key, 2),
            "whole on 3 nodes",
            "nothing was written",
        )
        assert error_info(error).reason == "CONFIRMATION_IMPOSSIBLE"
    assert len(client.transactions(RESIDENT_DB)) == before
    assert client.get(RESIDENT_DB, RESIDENT_TABLE, by_kind[(True, False)][2:3]) == []

    # One resident stopped: a write it would have to confirm times out (committed
    # locally), whatever the other peers acknowledged; the others are still whole on
    # two running nodes when acknowledged.
    stopped.stop()
    running = nodes[:3]
    for (here, on_stopped), keys_of_kind in sorted(by_kind.items()):
        key = keys_of_kind[3]
        if not on_stopped:
            _resident_insert(client, key, 1)
            assert _whole_on(running, key) == set(_residents(names, key)), key
            continue
        try:
            _resident_insert(client, key, 1, timeout=3)
        except grpc.RpcError as exc:
            error = exc
        else:
            raise AssertionError(
                f"{key} (residents {_residents(names, key)}) was acknowledged with its"
                f" resident {stopped.name} stopped; whole on {_whole_on(running, key)}"
            )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
        assert error_info(error).reason == "REPLICATION_NOT_CONFIRMED"
        message = error.details() or ""
        assert "committed locally" in message and stopped.name in message, message
        if not here:
            assert "holds only stubs" in message, message
        # Committed, and whole on the running resident at most.
        assert len(_whole_on(running, key)) <= 1
    # The stopped resident gets the unconfirmed writes when it is back.
    stopped.start(*SERVICES)
    late = [keys_of_kind[3] for (_, on_stopped), keys_of_kind in by_kind.items() if on_stopped]
    wait_for(
        lambda: all(stopped.name in _whole_on([stopped], key) for key in late),
        60,
        "the unconfirmed writes to reach the restarted resident",
    )
