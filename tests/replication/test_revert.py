"""A revert is a new transaction that replicates like any write (real processes, TLS)."""

from __future__ import annotations

import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster

pytestmark = pytest.mark.cluster


def test_a_revert_replicates_to_the_peer(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, services=("storage", "replicator", "admin"))
    a, b = cluster[0], cluster[1]
    original = [{"id": 1, "name": "Penny", "age": 5}, {"id": 2, "name": "Kato"}]
    a.client().create_table("app", "dog")
    a.client().insert("app", "dog", original)
    cluster.wait_converged(["app"])

    # A bad change made on b, found and reverted on a: a reverts it from the prior values
    # it logged when it applied b's transaction.
    bad = b.client().update("app", "dog", [{"id": 1, "age": 99, "owner": "mallory"}]).version
    cluster.wait_converged(["app"])
    assert a.client().get("app", "dog", [1]) == [{**original[0], "age": 99, "owner": "mallory"}]
    reverted = a.admin().ok(
        {"operation": "revert_transaction", "database": "app", "origin": b.name, "version": bad}
    )
    assert reverted["origin"] == a.name and reverted["reverted"]["origin"] == b.name
    cluster.wait_converged(["app"])
    assert b.client().all_records("app", "dog") == original
    entry = b.client().transactions("app")[-1]
    assert (entry.origin, entry.version) == (a.name, reverted["version"])
    assert (entry.reverts.origin, entry.reverts.version) == (b.name, bad)

    # The typed path: storage's RevertTransaction, here undoing a delete made on b.
    deleted = b.client().delete("app", "dog", [2]).version
    cluster.wait_converged(["app"])
    reply = a.client().call(
        "RevertTransaction",
        pb.RevertTransactionRequest(database="app", origin=b.name, version=deleted),
    )
    assert [(r.table, r.id, r.unchanged) for r in reply.records] == [("dog", b"2", False)]
    cluster.wait_converged(["app"])
    for node in cluster:
        assert node.client().all_records("app", "dog") == original
