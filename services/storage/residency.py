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
from services.common.errors import InvalidArgument
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
) -> RecordState:
    """The state to store after merging a write that carried ``residents``: residency by
    last-writer-wins on ``stamp``, and the stub form unless ``node`` is a resident."""
    if new is old:
        if not residents or stamp <= new.residents_stamp:
            return new
        new = merge.copy_state(new)
    if residents and stamp > new.residents_stamp:
        new.residents, new.residents_stamp = residents, stamp
    if new.residents and node not in new.residents:
        return to_stub(table, new)
    if stub_write:
        new.stub = True  # a stub reached a resident: reads of it go to another resident
    return new


def merge_whole(old: RecordState | None, theirs: RecordState, node: str) -> RecordState:
    """Merge a re-homing's whole state into what this node holds. A stub here has the
    same versions as the whole record with fewer attributes, so the whole state is the
    base and the stub's writes merge into it; what the stub saw newer than the whole
    state (a newer whole-record write) is known here only as a stub: marked so."""
    if old is None or holds_full(old, node):
        return merge.merge_states(old, theirs)
    new = merge.merge_states(merge.copy_state(theirs), old)
    if new is theirs:
        new = merge.copy_state(new)
    if theirs.residents_stamp >= old.residents_stamp:
        new.residents, new.residents_stamp = theirs.residents, theirs.residents_stamp
    new.stub = old.base > theirs.base
    return new


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
        """A write's ``replicate_to``, validated against the members."""
        if replicate_to is None:
            return
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
