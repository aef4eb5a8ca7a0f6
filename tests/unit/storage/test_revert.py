"""Reverting one write (``revert.undo_write``, pure): applying the undo at a newer
version gives back exactly the record as it was before the write, and writes newer than
the reverted one are reported as later changes."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.storage import commit, merge, revert
from services.storage.merge import RecordState, Stamp

PUT, PATCH, DELETE = commit.PUT, commit.PATCH, commit.DELETE
SETTINGS = settings(max_examples=300, deadline=None)
REVERTED: Stamp = (10, "beta")
REVERT: Stamp = (20, "alpha")

values = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=2)
attributes = st.dictionaries(st.sampled_from(("a", "b", "c")), values, max_size=3)


def canonical(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def undone(state: RecordState | None, undo: revert.Undo) -> dict[str, Any]:
    """The visible record once the undo is applied (as a later local write)."""
    if undo.kind is None:
        return state.doc if state is not None else {}
    return commit.apply_write(state, REVERT, undo.kind, undo.doc).doc


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, Any] | None, RecordState | None, int, Any]:
    """(prior record or None, state before the write, write kind, write value)."""
    prior = draw(st.none() | attributes.map(lambda a: {"id": 1, **a}))
    if prior is None:
        before = draw(st.sampled_from((None, merge.delete(None, (1, "gamma")))))
        kind = draw(st.sampled_from((PUT, PATCH)))
    else:
        before = merge.put(None, (1, "gamma"), prior)
        kind = draw(st.sampled_from((PUT, PATCH, DELETE)))
    value = {} if kind == DELETE else {"id": 1, **draw(attributes)}
    return prior, before, kind, value


@SETTINGS
@given(scenarios())
def test_undo_restores_exactly_the_prior_record(scenario: Any) -> None:
    prior, before, kind, value = scenario
    after = commit.apply_write(before, REVERTED, kind, value)
    undo = revert.undo_write("dog", 1, "id", kind, value, prior, after, REVERTED)
    assert undo.later == ()
    assert canonical(undone(after, undo)) == canonical(prior or {})
    if undo.kind is None:
        assert undo.action is None
    elif prior is None:
        assert (undo.kind, undo.action) == (DELETE, "delete")
    else:
        assert undo.action == ("update" if after.visible else "insert")


def test_an_update_sets_back_only_its_attributes() -> None:
    prior = {"id": 1, "a": 1, "b": 1}
    state = merge.put(None, (1, "gamma"), prior)
    state = commit.apply_write(state, REVERTED, PATCH, {"id": 1, "a": 2})
    # An older concurrent write to another attribute arrives after the reverted one.
    state = commit.apply_write(state, (5, "gamma"), PATCH, {"id": 1, "b": 9})
    undo = revert.undo_write("dog", 1, "id", PATCH, {"id": 1, "a": 2}, prior, state, REVERTED)
    assert (undo.kind, undo.doc, undo.later) == (PATCH, {"id": 1, "a": 1}, ())
    assert undone(state, undo) == {"id": 1, "a": 1, "b": 9}


def test_an_update_that_added_attributes_writes_the_record_back_without_them() -> None:
    prior = {"id": 1, "a": 1}
    state = commit.apply_write(
        merge.put(None, (1, "gamma"), prior), REVERTED, PATCH, {"id": 1, "a": 2, "new": True}
    )
    undo = revert.undo_write(
        "dog", 1, "id", PATCH, {"id": 1, "a": 2, "new": True}, prior, state, REVERTED
    )
    assert (undo.kind, undo.doc, undo.action) == (PUT, prior, "update")


def test_newer_writes_are_later_changes_and_older_ones_are_not() -> None:
    prior = {"id": 1, "a": 1}
    state = commit.apply_write(merge.put(None, (1, "gamma"), prior), REVERTED, PATCH, {"a": 2})
    older = commit.apply_write(state, (9, "zeta"), PATCH, {"b": 1})
    assert revert.later_stamps(older, REVERTED) == ()
    newer = commit.apply_write(older, (10, "gamma"), PATCH, {"c": 1})  # same version, origin after
    newest = commit.apply_write(newer, (12, "alpha"), PATCH, {"a": 3})
    assert revert.later_stamps(newest, REVERTED) == ((10, "gamma"), (12, "alpha"))
    deleted = commit.apply_write(state, (11, "alpha"), DELETE, {})
    undo = revert.undo_write("dog", 1, "id", PATCH, {"a": 2}, prior, deleted, REVERTED)
    # With force, a record deleted since is written back whole.
    assert (undo.later, undo.kind, undo.doc, undo.action) == (
        ((11, "alpha"),),
        PUT,
        prior,
        "insert",
    )


def test_a_record_already_holding_its_prior_state_is_left_alone() -> None:
    state = merge.delete(None, (3, "gamma"))
    undo = revert.undo_write("dog", 1, "id", PUT, {"id": 1}, None, state, REVERTED)
    assert (undo.kind, undo.action) == (None, None)
    prior = {"id": 1, "a": 1}
    same = commit.apply_write(merge.put(None, (1, "gamma"), prior), REVERTED, PATCH, {"a": 1})
    undo = revert.undo_write("dog", 1, "id", PATCH, {"id": 1, "a": 1}, prior, same, REVERTED)
    assert undo.kind is None
    # 1 and 1.0 are different JSON values: setting back is needed.
    changed = commit.apply_write(merge.put(None, (1, "gamma"), prior), REVERTED, PATCH, {"a": 1.0})
    undo = revert.undo_write("dog", 1, "id", PATCH, {"id": 1, "a": 1.0}, prior, changed, REVERTED)
    assert undo.kind == PATCH and type(undo.doc["a"]) is int
