"""Residency through the replicator-facing RPCs of one storage node: what Apply keeps
(whole or stub, by last-writer-wins on the residency choice), and what Subscribe sends to
a resident and to a non-resident (real node, no replicator)."""

from __future__ import annotations

from typing import Any

import orjson
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.harness.client import StorageClient
from tests.harness.copying import until_caught_up
from tests.harness.node import Node
from tests.storage.test_replication_api import (
    apply,
    now_version,
    patch,
    put,
    remote,
    sent,
    snapshot,
)

SCHEMA = types_pb2.TableSchema(
    name="items", primary_key="id", indexed_attributes=["color"], replicate=True
)


def placed(
    write: types_pb2.Write, residents: list[str], chosen: tuple[int, str], whole: bool = False
) -> types_pb2.Write:
    write.residents.extend(residents)
    write.residents_version, write.residents_origin = chosen
    write.whole = whole
    return write


def state_of(internal: StorageClient, key: Any) -> list[Any]:
    for message in snapshot(internal, "app"):
        for row in message.rows:
            if orjson.loads(row.id) == key:
                return list(orjson.loads(row.state))
    raise AssertionError(f"no row {key!r}")


def test_a_write_sent_before_a_rehoming_does_not_undo_it(node: Node) -> None:
    internal = node.internal_client()
    me = node.name
    t1, t2, t3 = now_version(), now_version() + 10, now_version() + 20
    doc = {"id": 1, "color": "red", "body": "first"}
    apply(
        internal,
        remote(
            t1,
            placed(put("items", 1, doc), [me, "y"], (t1, "x")),
            origin="x",
            database="app",
            tables=(SCHEMA,),
        ),
    )
    assert state_of(internal, 1)[3] == doc  # a resident: whole
    # z re-homes it to y and w; then x, which had not seen that yet, patches it.
    rehome = placed(patch("items", 1, {}), ["w", "y"], (t2, "z"), whole=True)
    rehome.value = orjson.dumps([t1, "x", False, doc, {}, [t2, "z", ["w", "y"], False]])
    late = placed(patch("items", 1, {"id": 1, "body": "late"}), [me, "y"], (t1, "x"))
    apply(
        internal,
        remote(t2, rehome, origin="z", database="app"),
        remote(t3, late, origin="x", database="app"),
    )
    state = state_of(internal, 1)
    assert state[5][:3] == [t2, "z", ["w", "y"]]  # the re-homing stands
    assert state[3] == {"id": 1, "color": "red"} and state[5][3] is True  # a stub here


def test_subscribe_sends_whole_writes_to_residents_and_stubs_to_others(node: Node) -> None:
    internal = node.internal_client()
    t1 = now_version()
    doc = {"id": 7, "color": "blue", "body": "payload"}
    apply(
        internal,
        remote(
            t1,
            placed(put("items", 7, doc), [node.name, "r2"], (t1, "x")),
            origin="x",
            database="app",
            tables=(SCHEMA,),
        ),
    )

    def for_subscriber(name: str) -> types_pb2.Write:
        request = pb.SubscribeRequest(databases=["app"], subscriber=name)
        [txn] = sent(until_caught_up(internal, request))
        [write] = txn.writes
        return write

    resident = for_subscriber("r2")
    assert orjson.loads(resident.value) == doc and not resident.stub
    other = for_subscriber("r3")
    assert orjson.loads(other.value) == {"id": 7, "color": "blue"}
    assert other.stub and not other.prior and list(other.residents) == [node.name, "r2"]
    # A copy for a non-resident carries the stub too.
    rows = [r for m in snapshot(internal, "app", subscriber="r3") for r in m.rows]
    assert orjson.loads(rows[0].state)[3] == {"id": 7, "color": "blue"}


def test_a_rehoming_overwrites_nothing_newer(node: Node) -> None:
    """A re-homing carries the state its node had; a write that node had not seen yet
    keeps its value here (attribute versions are kept, only the residency is new)."""
    internal = node.internal_client()
    me = node.name
    t1, t3, t4 = now_version(), now_version() + 30, now_version() + 40
    doc = {"id": 2, "color": "red", "body": "first"}
    apply(
        internal,
        remote(
            t1,
            placed(put("items", 2, doc), [me, "y"], (t1, "x")),
            origin="x",
            database="app",
            tables=(SCHEMA,),
        ),
        remote(
            t3,
            placed(patch("items", 2, {"id": 2, "body": "newer"}), [me, "y"], (t1, "x")),
            origin="x",
            database="app",
        ),
    )
    rehome = placed(patch("items", 2, {}), [me, "w"], (t4, "y"), whole=True)
    rehome.value = orjson.dumps([t1, "x", False, doc, {}, [t4, "y", [me, "w"], False]])
    apply(internal, remote(t4, rehome, origin="y", database="app"))
    state = state_of(internal, 2)
    assert state[3] == {"id": 2, "color": "red", "body": "newer"}
    assert state[5][:4] == [t4, "y", sorted([me, "w"]), False]
