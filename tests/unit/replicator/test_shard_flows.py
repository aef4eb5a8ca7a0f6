"""Which sharded databases flow on a connection, from the two Hellos."""

from __future__ import annotations

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.replicator.session import flows, withheld_databases


def hello(shard: int | None, sharded: tuple[str, ...] = (), *, every: bool = True) -> rpb.Hello:
    return rpb.Hello(
        node_name="n",
        sends=True,
        receives=True,
        all_databases=every,
        databases=() if every else ("metrics", "dev", "system"),
        shard=shard,
        sharded_databases=sharded,
    )


def test_same_shard_shares_sharded_databases() -> None:
    assert withheld_databases(hello(1, ("metrics",)), hello(1, ("metrics",))) == frozenset()
    flow = flows(hello(1, ("metrics",)), hello(1, ("metrics",)))
    assert flow.covers("metrics") and flow.covers("dev")


def test_other_shard_or_no_shard_withholds_them_both_ways() -> None:
    for mine, theirs in [(1, 2), (1, None), (None, 1), (None, None)]:
        a, b = hello(mine, ("metrics",)), hello(theirs, ("metrics",))
        assert withheld_databases(a, b) == withheld_databases(b, a) == {"metrics"}
        flow = flows(a, b)
        assert not flow.covers("metrics")
        assert flow.covers("dev") and flow.covers("system")


def test_either_side_declaring_a_database_sharded_is_enough() -> None:
    a, b = hello(1, ("metrics",)), hello(2, ("logs",))
    assert withheld_databases(a, b) == withheld_databases(b, a) == {"metrics", "logs"}


def test_shard_zero_is_a_shard() -> None:
    assert withheld_databases(hello(0, ("metrics",)), hello(0)) == frozenset()
    assert withheld_databases(hello(0, ("metrics",)), hello(None)) == {"metrics"}


def test_system_is_never_withheld_and_lists_stay_lists() -> None:
    a = hello(1, ("metrics", "system"), every=False)
    b = hello(2, every=False)
    flow = flows(a, b)
    assert flow.withheld == {"metrics"}
    assert flow.covers("system") and flow.covers("dev")
    assert not flow.covers("metrics") and not flow.covers("other")
