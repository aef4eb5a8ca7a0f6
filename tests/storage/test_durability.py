"""Acknowledged writes survive kill -9 of the storage process; the clock never goes back."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.client import StorageClient


class Writer(threading.Thread):
    """Single-record inserts, one after the other, remembering which were acknowledged."""

    def __init__(self, client: StorageClient, total: int, signal_after: int) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.total = total
        self.signal_after = signal_after
        self.reached = threading.Event()
        self.acked: list[int] = []
        self.versions: list[int] = []
        self.failure: grpc.RpcError | None = None

    def run(self) -> None:
        for i in range(self.total):
            try:
                reply = self.client.insert("dev", "item", [{"id": i, "group": i % 10}])
            except grpc.RpcError as exc:
                self.failure = exc
                return
            assert list(reply.inserted_ids) == [str(i).encode()]
            self.versions.append(reply.version)
            self.acked.append(i)
            if len(self.acked) >= self.signal_after:
                self.reached.set()


@pytest.mark.parametrize(
    ("config", "kill_after"),
    [({}, 800), ({"storage": {"syncWrites": True}}, 600)],
    ids=["default", "sync-writes"],
)
def test_acknowledged_writes_survive_kill_9(
    make_node: MakeNode, config: dict[str, Any], kill_after: int
) -> None:
    node = make_node(config=config)
    node.client().create_table("dev", "item", indexed=["group"])
    # The writer cannot finish before the kill: it stops at its first failed call.
    writer = Writer(node.client(), 50_000, kill_after)
    writer.start()
    assert writer.reached.wait(60), f"no {kill_after} acknowledged writes in time"
    node.kill("storage")
    writer.join(30)
    assert not writer.is_alive()
    acked = list(writer.acked)
    assert len(acked) >= kill_after
    assert writer.failure is not None, "the writer finished before the kill"
    assert writer.failure.code() == grpc.StatusCode.UNAVAILABLE

    node.start_service("storage")
    client = node.client()
    present = {r["id"] for r in client.all_records("dev", "item")}
    lost = set(acked) - present
    assert lost == set(), f"{len(lost)} acknowledged writes lost"
    # At most the one write in flight at the kill may be there without an acknowledgement.
    assert present - set(acked) <= {len(acked)}
    # Counters and indexes were written with the data.
    assert client.describe("dev", "item").record_count == len(present)
    by_group = [len(client.by_value("dev", "item", "group", g)) for g in range(10)]
    assert sum(by_group) == len(present)
    # The log holds every acknowledged transaction, and positions agree with it.
    logged = [t.version for t in client.transactions("dev", "item") if t.writes]
    assert set(writer.versions) <= set(logged)
    positions = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database="dev"))
    assert [(p.origin, p.version) for p in positions.positions] == [(node.name, logged[-1])]
    # The node carries on where it stopped.
    after = client.insert("dev", "item", [{"id": 100_000}])
    assert after.version > max(logged)
    assert list(after.inserted_ids) == [b"100000"]


def test_clock_never_goes_back_across_restarts(make_node: MakeNode) -> None:
    # The physical clock of the first run is two minutes ahead; after kill -9 the node
    # restarts with a correct clock, which is now far behind the versions it issued.
    node = make_node(config={"testing": {"clockOffsetMs": 120_000}})
    client = node.client()
    client.create_table("dev", "dog")
    before = [client.insert("dev", "dog", [{"id": i}]).version for i in range(20)]
    assert before == sorted(before)
    assert (before[-1] >> 16) > time.time_ns() // 1_000_000 + 100_000
    node.kill("storage")
    node.update_config({"testing": {"clockOffsetMs": 0}})
    node.start_service("storage")
    client = node.client()
    after = client.insert("dev", "dog", [{"id": 100}]).version
    assert after > before[-1]
    status = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database="dev"))
    assert status.node_time >= after

    # The same after a version observed from another node (Apply), then kill -9.
    ahead = (time.time_ns() // 1_000_000 + 600_000) << 16
    applied = node.internal_client().call(
        "Apply",
        pb.ApplyRequest(
            transactions=[
                types_pb2.Transaction(
                    origin="far-ahead",
                    version=ahead,
                    database="dev",
                    writes=[
                        types_pb2.Write(
                            table="dog",
                            kind=types_pb2.WRITE_KIND_PUT,
                            id=b"200",
                            value=b'{"id": 200}',
                        )
                    ],
                )
            ]
        ),
    )
    assert applied.applied == 1
    node.kill("storage")
    node.start_service("storage")
    client = node.client()
    assert client.get("dev", "dog", [200]) == [{"id": 200}]
    last = client.insert("dev", "dog", [{"id": 300}]).version
    assert last > ahead
    # A clean restart keeps it too.
    node.restart("storage")
    assert node.client().insert("dev", "dog", [{"id": 301}]).version > last
    versions = [t.version for t in node.client().transactions("dev") if t.origin == node.name]
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
