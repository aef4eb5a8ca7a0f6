"""A node whose clock runs far ahead is refused, and status says why."""

from __future__ import annotations

import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster


def test_node_120s_ahead_is_refused_with_a_reason(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2, node_config={1: {"testing": {"clockOffsetMs": 120_000}}})
    good, fast = cluster[0], cluster[1]
    good.client().create_table("db", "from_good")
    good.client().insert("db", "from_good", [{"id": 1}])
    # Data from the good node still reaches the fast one (its versions are in the past).
    wait_for(
        lambda: fast.client().all_records("db", "from_good") == [{"id": 1}],
        30,
        "good's data on fast",
    )
    fast.client().create_table("db", "from_fast")
    fast.client().insert("db", "from_fast", [{"id": 2}])

    def refused() -> str:
        connection = good.connection(fast.name)
        error = str(connection.last_connection_error) if connection is not None else ""
        return error if "ahead" in error else ""

    reason = wait_for(refused, 30, "the refusal in status")
    assert "maxClockSkew" in reason and fast.name in reason
    described = good.client().call("DescribeAll", pb.DescribeAllRequest())
    tables = {t.name for d in described.databases for t in d.tables}
    assert "from_fast" not in tables
