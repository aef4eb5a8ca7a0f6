"""Typed attributes and record timestamps across nodes, through the storage API: the
schema (types, timestamps) travels with the log; a write is checked on the node that
accepts it and never again where it is applied."""

from __future__ import annotations

import grpc
import orjson
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.copying import logged

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_types_and_timestamps_replicate_and_applied_writes_are_not_checked(
    make_node: MakeNode,
) -> None:
    a, b = make_node(services=("storage",)), make_node(services=("storage",))
    client_a, client_b = a.client(), b.client()
    client_a.call(
        "CreateTable",
        pb.CreateTableRequest(
            database="data",
            table="score",
            attributes=[pb.AttributeDefinition(name="score", type="Number")],
            schema_defined=True,
            record_timestamps=True,
        ),
    )
    client_a.insert("data", "score", [{"id": 1, "score": 2}])
    (record,) = client_a.get("data", "score", [1])
    assert record["__createdtime__"] == record["__updatedtime__"] > 0

    txns = logged(a.internal_client(), "data")
    b.internal_client().call("Apply", pb.ApplyRequest(transactions=txns))
    info = client_b.describe("data", "score")
    assert info.schema_defined and info.record_timestamps
    assert {x.name: x.type for x in info.attributes}["score"] == "Number"
    assert client_b.get("data", "score", [1]) == [record]  # the origin's timestamps

    # A write of a wrong type committed elsewhere (a peer whose schema differed) is
    # applied: replication is never refused.
    wrong = types_pb2.Transaction(
        origin=a.name,
        database="data",
        version=max(t.version for t in txns) + 1,
        user="admin",
        writes=[
            types_pb2.Write(
                table="score",
                kind=types_pb2.WRITE_KIND_PUT,
                operation=types_pb2.OPERATION_INSERT,
                id=b"2",
                value=orjson.dumps({"id": 2, "score": "high"}),
            )
        ],
    )
    b.internal_client().call("Apply", pb.ApplyRequest(transactions=[wrong]))
    assert client_b.get("data", "score", [2]) == [{"id": 2, "score": "high"}]
    # A client's write to B is checked against the replicated types.
    client_b.expect(
        INVALID,
        "Insert",
        pb.InsertRequest(database="data", table="score", records=[b'{"id": 3, "score": "x"}']),
        'Value "x" in property score must be a number',
    )
