"""Subscribe's ``exclude_databases``: the sharded databases a subscriber of another shard
must never receive."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.harness.client import StorageClient
from tests.harness.copying import until_caught_up
from tests.harness.node import Node
from tests.harness.wait import wait_for
from tests.storage.test_replication_api import PRECONDITION, sent


def test_excluded_databases_are_never_sent_nor_checked(node: Node, client: StorageClient) -> None:
    internal = node.internal_client()
    client.create_table("metrics", "m")
    client.create_table("dev", "dog")
    client.insert("metrics", "m", [{"id": 1}])
    kept = client.insert("dev", "dog", [{"id": 1}]).version

    for request in [
        pb.SubscribeRequest(exclude_databases=["metrics"]),
        pb.SubscribeRequest(databases=["metrics", "dev"], exclude_databases=["metrics"]),
    ]:
        txns = sent(until_caught_up(internal, request))
        assert {t.database for t in txns} <= {"dev", "system"}
        assert kept in [t.version for t in txns if t.database == "dev"]

    # The log of an excluded database is not checked: no LOG_TRUNCATED for it.
    last = client.insert("metrics", "m", [{"id": 2}]).version
    cutoff = wait_for(
        lambda: (ms := time.time_ns() // 1_000_000) > (last >> 16) and ms,
        5,
        "the clock to pass the last write",
    )
    ts = Timestamp()
    ts.FromMilliseconds(cutoff)
    client.call("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=ts, database="metrics"))
    stale = [types_pb2.Position(database="metrics", origin=node.name, version=1)]
    internal.expect(
        PRECONDITION,
        "Subscribe",
        pb.SubscribeRequest(databases=["metrics", "dev"], positions=stale),
        "copy",
    )
    txns = sent(
        until_caught_up(
            internal,
            pb.SubscribeRequest(
                databases=["metrics", "dev"], positions=stale, exclude_databases=["metrics"]
            ),
        )
    )
    assert [t.database for t in txns] and all(t.database == "dev" for t in txns)
