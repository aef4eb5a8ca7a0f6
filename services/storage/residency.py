"""Residency: which nodes hold a record in full, in databases with a replication count.

A database with ``replicateTo: N`` (its ``replication.databases`` entry, or a write's
``replicate_to``) keeps each record in full on N nodes, its *residents*, and a *stub* (the
primary key and the indexed attributes) everywhere else, so indexed searches and counts
work on every node while the data takes about N/members of the space.

* The node that first writes a record chooses its residents: rendezvous hashing of the
  record's (database, table, key) over the members it knows (the live rows of
  ``system.hdb_nodes``, itself included), the N highest scores. Deterministic (any node
  with the same members picks the same residents) and even (each node wins a key with
  the same probability).
* The residents travel with every write (``Write.residents``) and are kept in the record
  state with the stamp of the write that set them (last-writer-wins, so concurrent first
  writes converge, and a later re-homing wins).
* Senders decide per recipient (``log.py``, ``snapshot.py``): the full write to a resident,
  a stub to the others. A stub is never sent to a resident; a node holding only a stub of
  a write stops relaying that origin to that resident (it receives it from the origin).
* A node that is not a resident, or whose state is marked ``stub``, reads the record
  from a resident through its replicator (``FetchRecords``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from shoal.storage.v1 import types_pb2

from services.common import members
from services.common.errors import FailedPrecondition, InvalidArgument
from services.storage import keys, merge
from services.storage.merge import RecordState, Stamp
from services.storage.schema import Table

if TYPE_CHECKING:
    from services.storage.engine import Engine

MAX_RESIDENTS = 1000


def score(database: str, table: str, encoded_pk: bytes, node: str) -> bytes:
    """A node's rendezvous score for a record (higher wins)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(node.encode())
    h.update(b"\x00" + database.encode() + b"\x00" + table.encode() + b"\x00" + encoded_pk)
    return h.digest()


def rendezvous(
    database: str, table: str, encoded_pk: bytes, nodes: Iterable[str], count: int
) -> tuple[str, ...]:
    """The ``count`` nodes with the highest scores for a record, sorted by name."""
    ranked = sorted(set(nodes), key=lambda n: score(database, table, encoded_pk, n), reverse=True)
    return tuple(sorted(ranked[:count]))


def member_names(engine: Engine) -> list[str]:
    """This node and every live member of ``system.hdb_nodes`` (tombstones are removed)."""
    names = {engine.node_name}
    table = engine.catalog.find_table(members.DATABASE, members.TABLE)
    if table is not None:
        prefix = table.prefix
        for _, value in engine.store.scan("data", prefix, keys.prefix_end(prefix)):
            state = merge.decode_state(value)
            name = state.doc.get(members.PRIMARY_KEY)
            if state.visible and isinstance(name, str):
                names.add(name)
    return sorted(names)


def stub_doc(table: Table, doc: dict[str, Any]) -> dict[str, Any]:
    """The stub of a document: its primary key and indexed attributes."""
    return {k: v for k, v in doc.items() if k == table.primary_key or k in table.indexed}


def to_stub(table: Table, state: RecordState) -> RecordState:
    """A state reduced to its stub (versions of dropped attributes go with them)."""
    doc = stub_doc(table, state.doc)
    versions = {k: v for k, v in state.versions.items() if k in doc}
    return RecordState(
        state.base, state.deleted, doc, versions, state.residents, state.residents_stamp, True
    )


def holds_full(state: RecordState, node: str) -> bool:
    """True when a state on ``node`` is the whole record (not a stub)."""
    return not state.stub and (not state.residents or node in state.residents)


def settle(
    table: Table,
    node: str,
    old: RecordState | None,
    new: RecordState,
    residents: tuple[str, ...],
    stamp: Stamp,
    stub_write: bool,
    write_stamp: Stamp | None = None,
) -> RecordState:
    """The state to store after merging a write that carried ``residents``: residency by
    last-writer-wins on ``stamp``, and the stub form unless ``node`` is a resident. On a
    resident, a write that arrived as a stub (``write_stamp``) is noted pending, and so is
    everything a node held only as a stub when it becomes a resident."""
    was_stub_here = old is not None and old.residents and not holds_full(old, node)
    if new is old:
        if not residents or stamp <= new.residents_stamp:
            if stub_write and node in new.residents:
                new = merge.copy_state(new)
                _note_pending(new, write_stamp)
            return new
        new = merge.copy_state(new)
    if residents and stamp > new.residents_stamp:
        new.residents, new.residents_stamp = residents, stamp
    if new.residents and node not in new.residents:
        return to_stub(table, new)
    if old is not None and was_stub_here and old.stub and not old.pending:
        # Becoming a resident of a record held here only as a stub: every write of it
        # seen here so far is missing its other attributes until they are handed over.
        new.stub, new.pending = True, tuple(sorted(set(stamps(old))))
    if stub_write:
        _note_pending(new, write_stamp)
    return new


def _note_pending(state: RecordState, write_stamp: Stamp | None) -> None:
    """A write reached a resident as a stub: reads of the record go to another resident
    until the write's attributes arrive (a handover, or healing). Without the write's
    stamp (or when this node already does not know which writes it lacks), it is not
    known which: healing from a resident that holds it whole clears it."""
    if write_stamp is None or (state.stub and not state.pending):
        state.stub, state.pending = True, ()
        return
    state.stub = True
    state.pending = tuple(sorted({*state.pending, write_stamp}))


def stamps(state: RecordState) -> list[Stamp]:
    """The stamps of the writes a state reflects (its base write and patched attributes)."""
    found = list(state.versions.values())
    if state.base != merge.ZERO:
        found.append(state.base)
    return found


def uncovered(pending: tuple[Stamp, ...], theirs: RecordState) -> tuple[Stamp, ...]:
    """The pending writes a whole state ``theirs`` does not account for. A write is
    accounted for when its stamp is in the state, when a newer whole-record write of the
    state supersedes it, or when the state reflects a later write of the same origin
    (origins' transactions are applied in order, so the holder applied this one too)."""
    present = stamps(theirs)
    newest: dict[str, int] = {}
    for version, origin in present:
        newest[origin] = max(newest.get(origin, 0), version)
    return tuple(
        p
        for p in pending
        if p not in present
        and not (theirs.base != merge.ZERO and p < theirs.base)
        and newest.get(p[1], 0) < p[0]
    )


def merge_whole(old: RecordState | None, theirs: RecordState, node: str) -> RecordState:
    """Merge a whole state (a re-homing, a handover, a healing fetch) into what this node
    holds. A stub here has the same versions as the whole record with fewer attributes,
    so the whole state is the base and the stub's writes merge into it. The writes known
    here only as stubs stay pending unless the whole state accounts for them
    (``uncovered``); without a record of them, what the stub saw newer than the whole
    state (a newer whole-record write) is known here only as a stub: marked so."""
    if old is None or holds_full(old, node):
        return merge.merge_states(old, theirs)
    new = merge.merge_states(merge.copy_state(theirs), old)
    if new is theirs:
        new = merge.copy_state(new)
    if theirs.residents_stamp >= old.residents_stamp:
        new.residents, new.residents_stamp = theirs.residents, theirs.residents_stamp
    if old.pending:
        new.pending = uncovered(old.pending, theirs)
        new.stub = bool(new.pending)
    else:
        new.pending = ()
        new.stub = old.base > theirs.base
    return new


def covers(theirs: RecordState, mine: RecordState) -> bool:
    """True when ``theirs`` already reflects every write ``mine`` does (merging ``mine``
    into it changes nothing): a re-homing that brings all a leaving resident holds."""
    merged = merge.merge_states(merge.copy_state(theirs), mine)
    return (merged.base, merged.deleted, merged.doc, merged.versions) == (
        theirs.base,
        theirs.deleted,
        theirs.doc,
        theirs.versions,
    )


def write_state(write_kind: int, stamp: Stamp, doc: dict[str, Any]) -> RecordState:
    """Exactly one write, as a state: merging it is applying the write."""
    if write_kind == types_pb2.WRITE_KIND_DELETE:
        return RecordState(stamp, True, {}, {})
    if write_kind == types_pb2.WRITE_KIND_PUT:
        return RecordState(stamp, False, dict(doc), {})
    return RecordState(merge.ZERO, False, dict(doc), dict.fromkeys(doc, stamp))


def handover_payload(
    node: str,
    old: RecordState | None,
    settled: RecordState,
    sent_whole_to_me: RecordState | None,
    brought: RecordState | None,
) -> RecordState | None:
    """What this node must hand over to a record's residents after a merge left it out of
    them, or None (see "Handovers" in services/storage/DESIGN.md):

    * it held the record whole, and what arrived is not a whole state that accounts for
      it (a write under another residency choice, a re-homing that missed a write here):
      its whole state, with what arrived whole to it;
    * or a write arrived whole because its sender still counted this node a resident
      (``sent_whole_to_me``): the residents may have received it only as a stub, so that
      write (and nothing this node holds only as a stub).
    """
    if not settled.residents or node in settled.residents:
        return None
    payload: RecordState | None = None
    if old is not None and holds_full(old, node):
        if brought is None or not covers(brought, old):
            payload = merge.copy_state(old)
            if sent_whole_to_me is not None:
                payload = merge.merge_states(payload, sent_whole_to_me)
    elif sent_whole_to_me is not None:
        payload = merge.copy_state(sent_whole_to_me)
    if payload is None or (not payload.doc and not payload.deleted):
        return None
    payload.residents, payload.residents_stamp = settled.residents, settled.residents_stamp
    payload.stub, payload.pending = False, ()
    return payload


def stub_write(table: Table, write: types_pb2.Write) -> None:
    """Turn a logged write into its stub (in place); a re-homing (``whole``) carries the
    stub of the record's state."""
    if write.whole:
        write.value = merge.encode_state(to_stub(table, merge.decode_state(write.value)))
    elif write.kind != types_pb2.WRITE_KIND_DELETE and write.value:
        write.value = orjson.dumps(stub_doc(table, orjson.loads(write.value)))
    write.prior = b""
    write.stub = True


def stub_row(table: Table, raw_state: bytes, subscriber: str) -> bytes:
    """A snapshot row's state for ``subscriber``: rows without residents as stored, a
    full row whole to a resident, a stub (marked so) to anyone else and in place of a
    row this node holds only as a stub."""
    if not raw_state.endswith(b"]]"):
        return raw_state  # no residency element (see merge.encode_state)
    state = merge.decode_state(raw_state)
    if not state.residents or (subscriber in state.residents and not state.stub):
        return raw_state
    if state.stub:
        return raw_state
    return merge.encode_state(to_stub(table, state))


@dataclass
class RepairProgress:
    """What a residency repair or rebalance pass did (the current or last one)."""

    running: bool = False
    passes: int = 0
    scanned: int = 0
    needing: int = 0  # records with a resident that is no longer a member
    rehomed: int = 0  # re-homed by this node in the pass
    unrecoverable: int = 0  # no remaining resident holds them whole
    deferred: int = 0  # to re-home here once this node holds them whole
    dry_run: bool = False  # a rebalance that only counts
    started_ms: int = 0
    finished_ms: int = 0


class Placement:
    """Chooses the residents of the records a local transaction writes first."""

    def __init__(self, engine: Engine, database: str) -> None:
        self.engine = engine
        self.database = database
        self.default = engine.config.replication.replicate_to(database)
        self.count: int | None = None
        self.nodes: tuple[str, ...] = ()
        self._members: list[str] | None = None

    @property
    def active(self) -> bool:
        """True when written records get residents."""
        return bool(self.default or self.count or self.nodes)

    def members(self) -> list[str]:
        if self._members is None:
            self._members = member_names(self.engine)
        return self._members

    def request(self, replicate_to: types_pb2.ReplicateTo | None) -> None:
        """A write's ``replicate_to``, validated against the members and the topology."""
        if replicate_to is None:
            return
        if not self.engine.config.replication.gossip:
            raise FailedPrecondition(
                "replicate_to needs every node to dial every member (a relay never passes a"
                " record whole to its residents), and this node has replication.gossip false;"
                " nothing was written",
                reason="RESIDENCY_NEEDS_MESH",
            )
        known = self.members()
        if replicate_to.nodes:
            nodes = tuple(sorted(set(replicate_to.nodes)))
            unknown = [n for n in nodes if n not in known]
            if unknown:
                raise InvalidArgument(
                    f"replicate_to names {', '.join(unknown)}, which "
                    f"{'is not a member' if len(unknown) == 1 else 'are not members'} of the"
                    f" cluster (members: {', '.join(known)}); nothing was written"
                )
            self.nodes = nodes
        elif replicate_to.count:
            if replicate_to.count > len(known):
                raise InvalidArgument(
                    f"replicate_to {replicate_to.count} is more than the {len(known)} members"
                    f" of the cluster ({', '.join(known)}); nothing was written"
                )
            self.count = replicate_to.count

    def residents(
        self, table: Table, encoded_pk: bytes, old: RecordState | None
    ) -> tuple[str, ...]:
        """A record's residents: those it has, else a new choice."""
        if old is not None and old.residents:
            return old.residents
        if self.nodes:
            return self.nodes
        count = self.count or self.default or 0
        known = self.members()
        return rendezvous(self.database, table.name, encoded_pk, known, min(count, len(known)))
