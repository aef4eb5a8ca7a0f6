"""The merge: how a record's state absorbs a write. Pure functions, no I/O.

A record's state is::

    base      (version, origin) of the newest whole-record write (PUT or DELETE),
              (0, "") when only PATCH writes were seen
    deleted   whether that whole-record write was a DELETE
    doc       the visible attributes
    versions  {attribute: (version, origin)} for attributes written by PATCH after base

Every write carries a version that is unique cluster-wide when paired with its origin,
and (version, origin) pairs are compared as tuples: ties between equal versions break by
origin name. The rules:

    PUT(w, doc)    if w > base: base = w; doc = doc + attributes patched after w
    DELETE(w)      if w > base: base = w, deleted; doc = attributes patched after w
    PATCH(w, a)    if w > base: each attribute of a whose current version is older than w
                   takes a's value and version w
    (a write at or below base is superseded and changes nothing)

The resulting state depends only on the set of writes seen, not their order, and seeing
a write twice changes nothing; ``tests/unit/storage/test_merge.py`` checks both with
hypothesis. A record is visible when ``doc`` is not empty (a PUT always carries the
primary key). A DELETE with no later PATCH leaves a tombstone: empty doc, base kept.

Stored encoding (also the Snapshot row format): the JSON array
``[base_version, base_origin, deleted, doc, {attribute: [version, origin]}]``, with a
sixth element ``[residents_version, residents_origin, [node, ...], stub]`` for a record
with residents (databases with a replication count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common import jsonbytes, jsoninput

Stamp = tuple[int, str]
ZERO: Stamp = (0, "")


@dataclass(slots=True)
class RecordState:
    """The mergeable state of one record (see the module docstring)."""

    base: Stamp = ZERO
    deleted: bool = False
    doc: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Stamp] = field(default_factory=dict)
    # Residency (databases with a replication count): the record's resident nodes, the
    # write that set them (last-writer-wins), and whether this node holds only a stub
    # (the primary key and indexed attributes). See services/storage/residency.py.
    residents: tuple[str, ...] = ()
    residents_stamp: Stamp = ZERO
    stub: bool = False
    # On a resident holding it as a stub: the writes that reached it only as stubs, which
    # it still lacks (empty with ``stub``: not known which; see residency.py, "Healing").
    pending: tuple[Stamp, ...] = ()

    @property
    def visible(self) -> bool:
        """True when the record exists for readers."""
        return bool(self.doc)

    def stamp_of(self, attribute: str) -> Stamp:
        """The version that last wrote ``attribute`` (or deleted it)."""
        return self.versions.get(attribute, self.base)

    def newest(self) -> Stamp:
        """The newest write this state reflects."""
        return max([self.base, *self.versions.values()])


def encode_state(state: RecordState) -> bytes:
    """Stored form of a state."""
    parts: list[Any] = [
        state.base[0],
        state.base[1],
        state.deleted,
        state.doc,
        {k: [v[0], v[1]] for k, v in state.versions.items()},
    ]
    if state.residents:
        stamp = state.residents_stamp
        residency: list[Any] = [stamp[0], stamp[1], list(state.residents), state.stub]
        if state.pending:
            residency.append([[v, o] for v, o in state.pending])
        parts.append(residency)
    return orjson.dumps(parts)


def _residency(raw: Any) -> tuple[tuple[str, ...], Stamp, bool, tuple[Stamp, ...]]:
    if not (
        type(raw) is list
        and len(raw) in (4, 5)
        and type(raw[0]) is int
        and type(raw[1]) is str
        and type(raw[2]) is list
        and all(type(n) is str for n in raw[2])
        and type(raw[3]) is bool
    ):
        raise ValueError("residency must be [version, origin, [node, ...], stub, [pending]]")
    pending: tuple[Stamp, ...] = ()
    if len(raw) == 5:
        items = raw[4]
        if not (
            type(items) is list
            and all(
                type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is str
                for p in items
            )
        ):
            raise ValueError("residency's pending writes must be [[version, origin], ...]")
        pending = tuple((p[0], p[1]) for p in items)
    return tuple(raw[2]), (raw[0], raw[1]), raw[3], pending


def encode_put_state(version: int, origin_json: bytes, doc_json: bytes) -> bytes:
    """Stored form of a fresh PUT state, built around the writer's own JSON document.

    ``origin_json`` is the JSON string of the origin (node names need no escaping, but
    it is passed pre-encoded so callers encode it once). Equal, after decoding, to
    ``encode_state(RecordState((version, origin), False, doc, {}))``.
    """
    return b"[%d,%s,false,%s,{}]" % (version, origin_json, doc_json)


def doc_json(doc: dict[str, Any]) -> bytes:
    """A record's visible attributes as JSON (a log entry's ``prior``, a resident's
    answer); empty when they cannot be serialized: a record nested deeper than JSON
    output allows, stored before the nesting limit existed, can then still be deleted or
    overwritten (that write cannot be reverted)."""
    try:
        return jsonbytes.dumps(doc)
    except orjson.JSONEncodeError:
        return b""


def decode_state(data: bytes) -> RecordState:
    """Parse a stored state; raises ValueError when malformed."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"record state is not JSON: {exc}") from exc
    return state_of(raw)


def decode_incoming_state(data: bytes, max_depth: int) -> RecordState:
    """Parse a state that comes from outside this node (a copied or restored row, a
    re-homing): as ``decode_state``, and held to the JSON limits, its record to at most
    ``max_depth`` levels (``jsoninput``). Raises ValueError (jsoninput.Refused included)."""
    try:
        raw = jsoninput.loads(data, jsoninput.MAX_NESTING_DEPTH + 1)
    except jsoninput.Refused as exc:
        raise jsoninput.Refused(f"record state: {exc}") from None
    state = state_of(raw)
    jsoninput.check_depth(state.doc, max_depth)
    return state


def state_of(raw: Any) -> RecordState:
    """The state a parsed JSON value describes; raises ValueError when malformed."""
    # Exact type checks (type(x) is int also rules out bool), cheapest first.
    if type(raw) is list and len(raw) == 6:
        residents, residents_stamp, stub, pending = _residency(raw.pop())
        state = state_of(raw)
        state.residents, state.residents_stamp, state.stub = residents, residents_stamp, stub
        state.pending = pending
        return state
    if not (
        type(raw) is list
        and len(raw) == 5
        and type(raw[0]) is int
        and type(raw[1]) is str
        and type(raw[2]) is bool
        and type(raw[3]) is dict
        and type(raw[4]) is dict
    ):
        raise ValueError("record state must be [version, origin, deleted, doc, versions]")
    if not raw[4]:
        return RecordState((raw[0], raw[1]), raw[2], raw[3], {})
    versions: dict[str, Stamp] = {}
    for name, stamp in raw[4].items():
        if not (
            isinstance(stamp, list)
            and len(stamp) == 2
            and isinstance(stamp[0], int)
            and not isinstance(stamp[0], bool)
            and isinstance(stamp[1], str)
        ):
            raise ValueError(f"attribute version of {name!r} must be [version, origin]")
        if name not in raw[3]:
            raise ValueError(f"attribute version given for {name!r}, which has no value")
        versions[name] = (stamp[0], stamp[1])
    return RecordState((raw[0], raw[1]), raw[2], raw[3], versions)


def put(state: RecordState | None, stamp: Stamp, doc: dict[str, Any]) -> RecordState:
    """Merge a whole-record write."""
    if state is None:
        return RecordState(stamp, False, dict(doc), {})
    if stamp <= state.base:
        return state
    new_doc = dict(doc)
    newer = {k: v for k, v in state.versions.items() if v > stamp}
    for name in newer:
        new_doc[name] = state.doc[name]
    return _keep(state, RecordState(stamp, False, new_doc, newer))


def delete(state: RecordState | None, stamp: Stamp) -> RecordState:
    """Merge a delete."""
    if state is None:
        return RecordState(stamp, True, {}, {})
    if stamp <= state.base:
        return state
    newer = {k: v for k, v in state.versions.items() if v > stamp}
    return _keep(state, RecordState(stamp, True, {k: state.doc[k] for k in newer}, newer))


def patch(state: RecordState | None, stamp: Stamp, attributes: dict[str, Any]) -> RecordState:
    """Merge a partial write."""
    if state is None:
        return RecordState(ZERO, False, dict(attributes), dict.fromkeys(attributes, stamp))
    if stamp <= state.base:
        return state
    doc = state.doc
    versions = state.versions
    changed = False
    for name, value in attributes.items():
        if versions.get(name, state.base) < stamp:
            if not changed:
                doc = dict(doc)
                versions = dict(versions)
                changed = True
            doc[name] = value
            versions[name] = stamp
    if not changed:
        return state
    return _keep(state, RecordState(state.base, state.deleted, doc, versions))


def _keep(old: RecordState, new: RecordState) -> RecordState:
    """``new`` with ``old``'s residency (writes change residency separately)."""
    if old.residents:
        new.residents, new.residents_stamp, new.stub = old.residents, old.residents_stamp, old.stub
        new.pending = old.pending
    return new


def merge_states(mine: RecordState | None, theirs: RecordState) -> RecordState:
    """Merge a whole state from another node (a Snapshot row) into ours.

    Equivalent to replaying every write ``theirs`` reflects: its base write, then each
    patched attribute as a PATCH at its own version.
    """
    if theirs.base != ZERO:
        state = (
            delete(mine, theirs.base)
            if theirs.deleted
            else put(
                mine, theirs.base, {k: v for k, v in theirs.doc.items() if k not in theirs.versions}
            )
        )
    else:
        state = mine if mine is not None else RecordState()
    for name, stamp in theirs.versions.items():
        state = patch(state, stamp, {name: theirs.doc[name]})
    if theirs.residents and theirs.residents_stamp > state.residents_stamp:
        if state is mine:
            state = copy_state(state)
        state.residents, state.residents_stamp = theirs.residents, theirs.residents_stamp
    if theirs.stub and not state.stub and state is not mine:
        state.stub = True  # some of what it brought is only a stub
    return state


def copy_state(state: RecordState) -> RecordState:
    """A shallow copy (to change residency without touching a state read elsewhere)."""
    return RecordState(
        state.base,
        state.deleted,
        state.doc,
        state.versions,
        state.residents,
        state.residents_stamp,
        state.stub,
        state.pending,
    )
