"""Residency's pure parts: placement by rendezvous hashing, stubs, and how residency
travels through the merge (services/storage/residency.py, merge.py)."""

from __future__ import annotations

import itertools
from collections import Counter

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from shoal.storage.v1 import types_pb2

from services.storage import keys, merge, residency
from services.storage.merge import RecordState
from services.storage.schema import Table

NODES = ("n1", "n2", "n3", "n4")
TABLE = Table("app", "items", 7, primary_key="id", indexed=("color",))


def test_rendezvous_is_deterministic_whatever_the_order_of_members() -> None:
    key = keys.encode_key(42)
    chosen = residency.rendezvous("app", "items", key, NODES, 2)
    assert len(chosen) == 2 and list(chosen) == sorted(chosen)
    for order in itertools.permutations(NODES):
        assert residency.rendezvous("app", "items", key, order, 2) == chosen


def test_rendezvous_spreads_evenly() -> None:
    counts = Counter(
        n
        for i in range(10_000)
        for n in residency.rendezvous("app", "items", keys.encode_key(i), NODES, 2)
    )
    for node in NODES:
        assert abs(counts[node] - 5_000) < 250, counts


def test_a_new_member_takes_only_its_share() -> None:
    """Adding a node moves only the residencies the new node wins (about 1/members)."""
    moved = 0
    for i in range(4_000):
        key = keys.encode_key(i)
        before = set(residency.rendezvous("app", "items", key, NODES[:3], 2))
        after = set(residency.rendezvous("app", "items", key, NODES, 2))
        assert after - before <= {"n4"}
        moved += len(after - before)
    assert 4_000 * 2 / 4 * 0.9 < moved < 4_000 * 2 / 4 * 1.1


def test_state_with_residency_round_trips() -> None:
    state = RecordState((5, "n1"), False, {"id": 1, "color": "red", "body": "x"}, {})
    state.residents, state.residents_stamp = ("n1", "n2"), (5, "n1")
    raw = merge.encode_state(state)
    assert raw.endswith(b'[5,"n1",["n1","n2"],false]]')
    assert merge.decode_state(raw) == state
    plain = RecordState((5, "n1"), False, {"id": 1}, {})
    assert len(orjson.loads(merge.encode_state(plain))) == 5


def test_stubs_keep_the_key_and_indexed_attributes() -> None:
    state = RecordState((5, "n1"), False, {"id": 1, "color": "red", "body": "x"}, {})
    state.residents = ("n1", "n2")
    stub = residency.to_stub(TABLE, state)
    assert stub.doc == {"id": 1, "color": "red"} and stub.stub and stub.residents == ("n1", "n2")
    assert not residency.holds_full(stub, "n1")
    assert residency.holds_full(state, "n1") and not residency.holds_full(state, "n3")

    write = types_pb2.Write(
        table="items",
        kind=types_pb2.WRITE_KIND_PUT,
        id=b"1",
        value=orjson.dumps(state.doc),
        prior=b'{"id":1}',
        residents=["n1", "n2"],
    )
    residency.stub_write(TABLE, write)
    assert orjson.loads(write.value) == {"id": 1, "color": "red"}
    assert write.stub and not write.prior


def test_settle_keeps_the_newest_residency_and_stubs_non_residents() -> None:
    old = RecordState((5, "n1"), False, {"id": 1, "color": "red", "body": "x"}, {})
    old.residents, old.residents_stamp = ("n1", "n2"), (5, "n1")
    # A later write naming other residents wins; n1 is no longer one: it keeps a stub.
    new = merge.patch(old, (9, "n3"), {"body": "y"})
    settled = residency.settle(TABLE, "n1", old, new, ("n3", "n4"), (9, "n3"), False)
    assert settled.residents == ("n3", "n4") and settled.stub
    assert settled.doc == {"id": 1, "color": "red"}
    # An older residency changes nothing.
    newer = merge.patch(old, (3, "n4"), {"other": 1})
    assert residency.settle(TABLE, "n1", old, newer, ("n4",), (3, "n4"), False).residents == (
        "n1",
        "n2",
    )


states = st.builds(
    lambda version, origin, residents, stub: (version, origin, residents, stub),
    st.integers(1, 50),
    st.sampled_from(NODES),
    st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True).map(
        lambda names: tuple(sorted(names))
    ),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(states, min_size=1, max_size=5, unique_by=lambda r: (r[0], r[1])))
def test_merged_residency_is_the_newest_in_any_order(
    rows: list[tuple[int, str, tuple[str, ...], bool]],
) -> None:
    def state(row: tuple[int, str, tuple[str, ...], bool]) -> RecordState:
        version, origin, residents, stub = row
        s = RecordState((version, origin), False, {"id": 1}, {})
        s.residents, s.residents_stamp, s.stub = residents, (version, origin), stub
        return s

    newest = max(rows, key=lambda r: (r[0], r[1]))
    for order in (rows, list(reversed(rows))):
        merged: RecordState | None = None
        for row in order:
            merged = merge.merge_states(merged, state(row))
        assert merged is not None
        assert merged.residents == newest[2]


def test_a_rehoming_makes_a_stub_whole_and_keeps_newer_writes() -> None:
    whole = RecordState((5, "n1"), False, {"id": 1, "color": "red", "body": "x"}, {})
    whole.residents, whole.residents_stamp = ("n3", "n4"), (9, "n2")
    stub = residency.to_stub(TABLE, whole)
    stub.residents, stub.residents_stamp = ("n1", "n2"), (5, "n1")
    stub = merge.patch(stub, (7, "n4"), {"color": "blue"})  # newer, seen here only
    merged = residency.merge_whole(stub, whole, "n3")
    assert merged.doc == {"id": 1, "color": "blue", "body": "x"}
    assert merged.residents == ("n3", "n4") and not merged.stub
    # A newer whole-record write known here only as a stub: the result is a stub.
    newer = merge.put(stub, (8, "n1"), {"id": 1, "color": "green"})
    assert residency.merge_whole(newer, whole, "n3").stub
