"""The merge's key properties: the state of a record depends only on the SET of writes seen.

Any order, any duplicates, and merging whole states (snapshot rows) all give the same record
and the same tombstone. Writes are modelled as (kind, (version, origin), doc) with a unique
(version, origin) per write, as a transaction logs at most one write per record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.storage import commit, merge
from services.storage.merge import RecordState, Stamp

SETTINGS = settings(max_examples=200, deadline=None)

PUT = commit.PUT
PATCH = commit.PATCH
DELETE = commit.DELETE
ORIGINS = ("alpha", "beta", "gamma")
ATTRIBUTES = ("id", "a", "b", "c")


@dataclass(frozen=True)
class Write:
    kind: int
    stamp: Stamp
    doc: dict[str, Any]


values = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from(["x", "y", "é"])
    | st.lists(st.integers(0, 2), max_size=2)
    | st.dictionaries(st.sampled_from(["p", "q"]), st.integers(0, 2), max_size=2)
)
docs = st.dictionaries(st.sampled_from(ATTRIBUTES), values, max_size=len(ATTRIBUTES))
patch_docs = st.dictionaries(st.sampled_from(ATTRIBUTES), values, min_size=1, max_size=3)
stamps = st.tuples(st.integers(1, 8), st.sampled_from(ORIGINS))


@st.composite
def a_write(draw: st.DrawFn) -> Write:
    kind = draw(st.sampled_from([PUT, PATCH, DELETE]))
    stamp = draw(stamps)
    if kind == PUT:
        return Write(kind, stamp, draw(docs))
    if kind == PATCH:
        return Write(kind, stamp, draw(patch_docs))
    return Write(kind, stamp, {})


write_sets = st.lists(a_write(), min_size=1, max_size=10, unique_by=lambda w: w.stamp)


def fold(writes: list[Write], state: RecordState | None = None) -> RecordState | None:
    for w in writes:
        state = commit.apply_write(state, w.stamp, w.kind, w.doc)
    return state


def canonical(state: RecordState | None) -> bytes:
    """The stored form, independent of dict insertion order."""
    if state is None:
        return b"null"
    decoded = merge.decode_state(merge.encode_state(state))
    return orjson.dumps(
        [
            list(decoded.base),
            decoded.deleted,
            decoded.doc,
            {name: list(stamp) for name, stamp in decoded.versions.items()},
        ],
        option=orjson.OPT_SORT_KEYS,
    )


@st.composite
def shuffled_with_duplicates(draw: st.DrawFn, writes: list[Write]) -> list[Write]:
    out = list(draw(st.permutations(writes)))
    extra = draw(st.lists(st.sampled_from(writes), max_size=len(writes)))
    for w in extra:
        out.insert(draw(st.integers(0, len(out))), w)
    return out


# -- order and duplicates -----------------------------------------------------------------


@SETTINGS
@given(write_sets, st.data())
def test_any_order_with_duplicates_gives_the_same_state(
    writes: list[Write], data: st.DataObject
) -> None:
    originals = copy.deepcopy(writes)
    expected = canonical(fold(writes))
    for _ in range(3):
        order = data.draw(shuffled_with_duplicates(writes))
        assert canonical(fold(order)) == expected
    assert writes == originals, "merging must not mutate the written documents"


@SETTINGS
@given(write_sets, st.data())
def test_merge_functions_agree_with_apply_write(writes: list[Write], data: st.DataObject) -> None:
    order = data.draw(st.permutations(writes))
    state: RecordState | None = None
    for w in order:
        if w.kind == PUT:
            state = merge.put(state, w.stamp, w.doc)
        elif w.kind == PATCH:
            state = merge.patch(state, w.stamp, w.doc)
        else:
            state = merge.delete(state, w.stamp)
    assert canonical(state) == canonical(fold(writes))


@SETTINGS
@given(write_sets)
def test_state_matches_a_direct_model(writes: list[Write]) -> None:
    """The rules of merge.py's docstring, computed from the whole set at once."""
    state = fold(writes)
    assert state is not None
    whole = [w for w in writes if w.kind in (PUT, DELETE)]
    base_write = max(whole, key=lambda w: w.stamp, default=None)
    base = base_write.stamp if base_write else merge.ZERO
    assert state.base == base
    assert state.deleted == (base_write is not None and base_write.kind == DELETE)
    expected_doc = dict(base_write.doc) if base_write and base_write.kind == PUT else {}
    expected_versions: dict[str, Stamp] = {}
    for w in sorted(
        (w for w in writes if w.kind == PATCH and w.stamp > base), key=lambda w: w.stamp
    ):
        for name, value in w.doc.items():
            expected_doc[name] = value
            expected_versions[name] = w.stamp
    assert state.doc == expected_doc
    assert state.versions == expected_versions
    assert state.visible == bool(expected_doc)
    assert state.newest() == max(w.stamp for w in writes if w.stamp > base or w is base_write)


@SETTINGS
@given(write_sets)
def test_applying_everything_again_changes_nothing(writes: list[Write]) -> None:
    state = fold(writes)
    assert state is not None
    again = fold(writes, state)
    assert again is state or canonical(again) == canonical(state)
    for w in writes:
        assert commit.apply_write(state, w.stamp, w.kind, w.doc) is state


# -- merging whole states -----------------------------------------------------------------


@st.composite
def split_sets(draw: st.DrawFn) -> tuple[list[Write], list[Write]]:
    """Two overlapping subsets of one write set (mine may be empty, theirs may not)."""
    writes = draw(write_sets)
    mine: list[Write] = []
    theirs: list[Write] = []
    for w in writes:
        where = draw(st.sampled_from(["mine", "theirs", "both"]))
        if where != "theirs":
            mine.append(w)
        if where != "mine":
            theirs.append(w)
    if not theirs:
        theirs.append(writes[0])
    return mine, theirs


def union(a: list[Write], b: list[Write]) -> list[Write]:
    return a + [w for w in b if w not in a]


@SETTINGS
@given(split_sets())
def test_merge_states_equals_replaying_the_union(sets: tuple[list[Write], list[Write]]) -> None:
    mine_writes, their_writes = sets
    mine = fold(mine_writes)
    theirs = fold(their_writes)
    assert theirs is not None
    mine_before = canonical(mine)
    theirs_before = canonical(theirs)
    expected = canonical(fold(union(mine_writes, their_writes)))

    assert canonical(merge.merge_states(mine, theirs)) == expected
    # A snapshot row arrives encoded: merging the decoded row is the same.
    row = merge.decode_state(merge.encode_state(theirs))
    assert canonical(merge.merge_states(mine, row)) == expected
    # Merging is symmetric and idempotent.
    if mine is not None:
        assert canonical(merge.merge_states(theirs, mine)) == expected
    merged = merge.merge_states(mine, theirs)
    assert canonical(merge.merge_states(merged, theirs)) == expected
    # Neither input was changed.
    assert canonical(mine) == mine_before
    assert canonical(theirs) == theirs_before


@SETTINGS
@given(split_sets(), st.data())
def test_merge_state_then_more_writes(
    sets: tuple[list[Write], list[Write]], data: st.DataObject
) -> None:
    """A node that took a snapshot row and then replays writes still converges."""
    mine_writes, their_writes = sets
    merged = merge.merge_states(None, fold(their_writes) or RecordState())
    later = data.draw(shuffled_with_duplicates(mine_writes + their_writes))
    assert canonical(fold(later, merged)) == canonical(fold(union(mine_writes, their_writes)))


# -- unit cases ---------------------------------------------------------------------------


def both_orders(*writes: Write) -> RecordState:
    forward = fold(list(writes))
    backward = fold(list(reversed(writes)))
    assert forward is not None
    assert canonical(forward) == canonical(backward)
    return forward


def test_later_put_replaces_all_attributes_of_an_older_put() -> None:
    state = both_orders(
        Write(PUT, (1, "alpha"), {"id": 1, "a": 1, "b": 1}),
        Write(PUT, (2, "beta"), {"id": 1, "c": 3}),
    )
    assert state.doc == {"id": 1, "c": 3}
    assert state.base == (2, "beta")
    assert state.versions == {}
    assert not state.deleted


def test_concurrent_patches_to_different_attributes_both_survive() -> None:
    state = both_orders(
        Write(PUT, (1, "alpha"), {"id": 1, "a": 0, "b": 0}),
        Write(PATCH, (2, "alpha"), {"a": 1}),
        Write(PATCH, (2, "beta"), {"b": 2}),
    )
    assert state.doc == {"id": 1, "a": 1, "b": 2}
    assert state.versions == {"a": (2, "alpha"), "b": (2, "beta")}
    assert state.stamp_of("a") == (2, "alpha")
    assert state.stamp_of("id") == (1, "alpha")
    assert state.newest() == (2, "beta")


def test_concurrent_patches_to_the_same_attribute_newest_wins() -> None:
    state = both_orders(
        Write(PATCH, (3, "alpha"), {"a": "old", "b": "kept"}),
        Write(PATCH, (4, "alpha"), {"a": "new"}),
    )
    assert state.doc == {"a": "new", "b": "kept"}


def test_patch_newer_than_a_put_survives_it() -> None:
    state = both_orders(
        Write(PATCH, (5, "alpha"), {"a": "patched"}),
        Write(PUT, (4, "beta"), {"id": 1, "a": "put", "b": "put"}),
    )
    assert state.doc == {"id": 1, "a": "patched", "b": "put"}
    assert state.base == (4, "beta")


def test_patch_older_than_a_put_is_superseded() -> None:
    state = both_orders(
        Write(PATCH, (3, "alpha"), {"a": "patched", "z": 1}),
        Write(PUT, (4, "beta"), {"id": 1, "a": "put"}),
    )
    assert state.doc == {"id": 1, "a": "put"}
    assert state.versions == {}


def test_delete_supersedes_an_older_patch() -> None:
    state = both_orders(
        Write(PUT, (1, "alpha"), {"id": 1, "a": 0}),
        Write(PATCH, (2, "beta"), {"a": 1}),
        Write(DELETE, (3, "gamma"), {}),
    )
    assert state.doc == {}
    assert state.deleted
    assert state.base == (3, "gamma")
    assert not state.visible


def test_a_newer_patch_survives_a_delete() -> None:
    state = both_orders(
        Write(PUT, (1, "alpha"), {"id": 1, "a": 0, "b": 0}),
        Write(DELETE, (3, "gamma"), {}),
        Write(PATCH, (4, "beta"), {"a": 1}),
    )
    assert state.doc == {"a": 1}
    assert state.deleted
    assert state.visible
    assert state.versions == {"a": (4, "beta")}


def test_delete_alone_leaves_a_tombstone() -> None:
    state = merge.delete(None, (7, "alpha"))
    assert state == RecordState((7, "alpha"), True, {}, {})
    assert not state.visible
    assert state.newest() == (7, "alpha")
    # An older PUT arriving later does not resurrect it.
    assert merge.put(state, (6, "beta"), {"id": 1}) is state


def test_put_after_delete_resurrects() -> None:
    state = both_orders(Write(DELETE, (3, "alpha"), {}), Write(PUT, (4, "alpha"), {"id": 1}))
    assert state.doc == {"id": 1}
    assert not state.deleted


@pytest.mark.parametrize("kinds", [(PUT, PUT), (PUT, DELETE), (DELETE, PUT), (PATCH, PUT)])
def test_equal_versions_break_ties_by_origin(kinds: tuple[int, int]) -> None:
    first = Write(kinds[0], (5, "alpha"), {"id": 1, "a": "alpha"})
    second = Write(kinds[1], (5, "beta"), {"id": 1, "a": "beta"})
    state = both_orders(first, second)
    assert state.base == (5, "beta")
    assert state.deleted == (kinds[1] == DELETE)
    assert state.doc == ({} if kinds[1] == DELETE else {"id": 1, "a": "beta"})


def test_equal_version_patches_break_ties_by_origin() -> None:
    state = both_orders(
        Write(PATCH, (5, "beta"), {"a": "beta"}), Write(PATCH, (5, "alpha"), {"a": "alpha"})
    )
    assert state.doc == {"a": "beta"}
    assert state.versions == {"a": (5, "beta")}


def test_superseded_writes_return_the_same_state() -> None:
    state = merge.put(None, (5, "alpha"), {"id": 1, "a": 1})
    assert merge.put(state, (5, "alpha"), {"id": 1, "a": 2}) is state
    assert merge.put(state, (4, "gamma"), {"id": 1}) is state
    assert merge.delete(state, (5, "alpha")) is state
    assert merge.patch(state, (5, "alpha"), {"a": 3}) is state
    patched = merge.patch(state, (6, "alpha"), {"a": 3})
    assert merge.patch(patched, (6, "alpha"), {"a": 4}) is patched


def test_put_copies_its_document() -> None:
    doc: dict[str, Any] = {"id": 1, "a": 1}
    state = merge.put(None, (1, "alpha"), doc)
    doc["a"] = 2
    assert state.doc == {"id": 1, "a": 1}
    patched = merge.patch(state, (2, "alpha"), {"b": 1})
    assert state.doc == {"id": 1, "a": 1}
    assert patched.doc == {"id": 1, "a": 1, "b": 1}


# -- encoding -----------------------------------------------------------------------------


@SETTINGS
@given(write_sets)
def test_encode_decode_round_trip(writes: list[Write]) -> None:
    state = fold(writes)
    assert state is not None
    assert merge.decode_state(merge.encode_state(state)) == state


@SETTINGS
@given(
    st.integers(0, 2**64 - 1),
    st.sampled_from(ORIGINS) | st.text(min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=5), values | st.text(max_size=5), max_size=5),
)
def test_encode_put_state_equals_encode_state(
    version: int, origin: str, doc: dict[str, Any]
) -> None:
    fast = merge.encode_put_state(version, orjson.dumps(origin), orjson.dumps(doc))
    slow = merge.encode_state(RecordState((version, origin), False, doc, {}))
    assert merge.decode_state(fast) == merge.decode_state(slow)
    assert orjson.loads(fast) == orjson.loads(slow)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1,",
        b"{}",
        b"null",
        b"[]",
        b'[1,"a",false,{}]',
        b'[1,"a",false,{},{},1]',
        b'["1","a",false,{},{}]',
        b'[true,"a",false,{},{}]',
        b'[1.5,"a",false,{},{}]',
        b"[1,2,false,{},{}]",
        b'[1,"a",0,{},{}]',
        b'[1,"a",null,{},{}]',
        b'[1,"a",false,[],{}]',
        b'[1,"a",false,{},[]]',
        b'[1,"a",false,{"x":1},{"x":1}]',
        b'[1,"a",false,{"x":1},{"x":[1]}]',
        b'[1,"a",false,{"x":1},{"x":[1,"b",2]}]',
        b'[1,"a",false,{"x":1},{"x":["1","b"]}]',
        b'[1,"a",false,{"x":1},{"x":[1,2]}]',
        b'[1,"a",false,{"x":1},{"x":[true,"b"]}]',
        b'[1,"a",false,{},{"x":[1,"b"]}]',
    ],
)
def test_decode_state_rejects_malformed_input(raw: bytes) -> None:
    with pytest.raises(ValueError):
        merge.decode_state(raw)


def test_decode_state_accepts_the_documented_form() -> None:
    state = merge.decode_state(b'[3,"beta",true,{"a":1},{"a":[4,"alpha"]}]')
    assert state == RecordState((3, "beta"), True, {"a": 1}, {"a": (4, "alpha")})
    assert merge.decode_state(b'[0,"",false,{},{}]') == RecordState()
