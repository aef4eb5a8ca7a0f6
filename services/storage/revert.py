"""Reverting a logged transaction: find it, work out what sets each record it wrote back
to its state just before it, and commit that as a new local transaction.

The prior state comes from the log itself. Every logged write carries ``prior``, the
visible record just before the write on the node that logged it (``commit.py`` for
local transactions, ``Engine.apply`` for applied ones), so nothing more is recorded and
the cost stays within the log's retention. A transaction purged from the log can no
longer be reverted.

Per record (``undo_write``, a pure function):

* no prior (the transaction created the record): delete it;
* a prior and the transaction deleted or replaced the record: write the prior back whole;
* a prior and the transaction patched attributes: set those attributes back with a
  PATCH, so concurrent changes to other attributes survive; when the patch added
  attributes the record did not have, write the record back whole without them.

"Changed later" is read from the record's merge state, which holds the newest
``(version, origin)`` of its base and of each patched attribute: a stamp above the
transaction's means a newer write reached the record, whatever order writes arrived in.
Older writes that arrived after the transaction either lost to it or changed attributes
it did not write, and setting back only the transaction's attributes keeps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
from shoal.storage.v1 import storage_pb2, types_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.hlc import version_as_ms, version_from_ms
from services.storage import keys, residency
from services.storage.commit import DELETE, PATCH, PUT
from services.storage.engine import Engine
from services.storage.log import logged_origins
from services.storage.merge import RecordState, Stamp
from services.storage.permissions import DELETE as DELETE_ACTION
from services.storage.permissions import INSERT, UPDATE
from services.storage.schema import Table
from services.storage.transaction import LocalTransaction

MAX_NAMED = 10  # records named in a refusal
MAX_TIMESTAMP = float(1 << 48)  # versions hold 48 bits of milliseconds
_OPERATIONS = {
    INSERT: types_pb2.OPERATION_INSERT,
    UPDATE: types_pb2.OPERATION_UPDATE,
    DELETE_ACTION: types_pb2.OPERATION_DELETE,
}


@dataclass(frozen=True)
class Undo:
    """What reverting one write does to its record."""

    table: str
    pk: Any
    kind: int | None  # PUT, PATCH or DELETE; None: the record already holds its prior state
    doc: dict[str, Any]  # the whole record (PUT) or the attributes to set back (PATCH)
    action: str | None  # the permission the write needs: insert, update or delete
    later: tuple[Stamp, ...]  # writes newer than the transaction that the record holds


def _same(a: Any, b: Any) -> bool:
    """JSON equality (1 and 1.0 and true differ, key order does not matter)."""
    option = orjson.OPT_SORT_KEYS
    return orjson.dumps(a, option=option) == orjson.dumps(b, option=option)


def later_stamps(state: RecordState | None, stamp: Stamp) -> tuple[Stamp, ...]:
    """The writes newer than ``stamp`` that a record's state reflects, oldest first."""
    if state is None:
        return ()
    return tuple(sorted({s for s in (state.base, *state.versions.values()) if s > stamp}))


def undo_write(
    table: str,
    pk: Any,
    primary_key: str,
    kind: int,
    value: dict[str, Any],
    prior: dict[str, Any] | None,
    state: RecordState | None,
    stamp: Stamp,
) -> Undo:
    """The write that sets a record back to ``prior``, given what it holds now (``state``)
    and the reverted write (``kind``, ``value``, at ``stamp``)."""
    current = state.doc if state is not None and state.visible else None
    later = later_stamps(state, stamp)
    if prior is None:
        if current is None:
            return Undo(table, pk, None, {}, None, later)
        return Undo(table, pk, DELETE, {}, DELETE_ACTION, later)
    doc = prior
    if kind == PATCH and current is not None:
        written = [a for a in value if a != primary_key]
        if all(a in prior for a in written):
            changes = {
                a: prior[a] for a in written if not (a in current and _same(current[a], prior[a]))
            }
            if not changes:
                return Undo(table, pk, None, {}, None, later)
            return Undo(table, pk, PATCH, {primary_key: pk, **changes}, UPDATE, later)
        # The patch added attributes: only a whole-record write removes them.
        doc = {k: v for k, v in current.items() if k == primary_key or k not in value}
        doc.update({a: prior[a] for a in written if a in prior})
    if current is not None and _same(current, doc):
        return Undo(table, pk, None, {}, None, later)
    return Undo(table, pk, PUT, doc, UPDATE if current is not None else INSERT, later)


def describe(origin: str, version: int) -> str:
    """How messages name a transaction."""
    return f"version {version} of {origin}"


def find(
    engine: Engine, database: str, origin: str, version: int, timestamp: float
) -> types_pb2.Transaction:
    """The logged transaction named by (origin, version) or (origin, Harper timestamp);
    the origin may be left out when only one origin matches."""
    if version == 0 and timestamp == 0:
        raise InvalidArgument(
            "name the transaction to revert by its version (or its timestamp) and origin,"
            " as the transaction and audit logs show them"
        )
    if version == 0 and not (math.isfinite(timestamp) and 0 < timestamp < MAX_TIMESTAMP):
        raise InvalidArgument("timestamp must be a time in Unix milliseconds")
    origins = [origin] if origin else logged_origins(engine, database)
    found: list[tuple[str, int, bytes]] = []  # (origin, version, local time)
    for name in origins:
        prefix = database.encode() + b"\x00" + name.encode() + b"\x00"
        if version:
            local_time = engine.store.logidx.get(prefix + keys.u64(version))
            if local_time is not None:
                found.append((name, version, local_time))
            continue
        ms = math.floor(timestamp)
        start = prefix + keys.u64(version_from_ms(ms))
        end = prefix + keys.u64(version_from_ms(ms + 1))
        for key, local_time in engine.store.scan("logidx", start, end):
            candidate = keys.read_u64(key, len(prefix))
            if version_as_ms(candidate) == timestamp:
                found.append((name, candidate, local_time))
    asked = f"version {version}" if version else f"timestamp {timestamp!r}"
    if not found:
        raise _not_found(
            engine, database, origin, version or version_from_ms(math.floor(timestamp)), asked
        )
    if len(found) > 1:
        matches = ", ".join(describe(o, v) for o, v, _ in found)
        raise InvalidArgument(
            f"{len(found)} transactions of database {database!r} match {asked} ({matches});"
            " name the one to revert by its version and origin"
        )
    name, found_version, local_time = found[0]
    raw = engine.store.log.get(local_time)
    if raw is None:
        raise _not_found(engine, database, name, found_version, asked)
    txn = types_pb2.Transaction.FromString(raw)
    if not txn.writes:
        raise InvalidArgument(
            f"transaction {describe(name, found_version)} wrote no records (it changed the"
            " schema); only record writes can be reverted"
        )
    return txn


def _not_found(engine: Engine, database: str, origin: str, version: int, asked: str) -> NotFound:
    of = f" of {origin}" if origin else ""
    purged = [
        horizon
        for (d, o), horizon in engine.horizons.items()
        if d == database and (not origin or o == origin) and version <= horizon
    ]
    why = (
        "; the log no longer holds it (entries that old were purged), so it cannot be reverted"
        if purged
        else ""
    )
    return NotFound(f"no transaction{of} with {asked} in the log of database {database!r}{why}")


@dataclass
class Plan:
    """The writes that revert one transaction, worked out before anything is written."""

    target: types_pb2.Transaction
    undos: list[Undo]
    tables: dict[str, Table]

    def actions(self) -> list[tuple[str, str]]:
        """(table, permission) pairs the revert needs."""
        return sorted({(u.table, u.action) for u in self.undos if u.action is not None})

    def refuse_later_changes(self) -> None:
        """FAILED_PRECONDITION when a record to write changed after the transaction."""
        changed = [u for u in self.undos if u.kind is not None and u.later]
        if not changed:
            return
        named = "; ".join(
            f"{u.table} {orjson.dumps(u.pk).decode()} (changed by "
            + ", ".join(describe(o, v) for v, o in u.later)
            + ")"
            for u in changed[:MAX_NAMED]
        )
        more = f"; and {len(changed) - MAX_NAMED} more" if len(changed) > MAX_NAMED else ""
        target = self.target
        raise FailedPrecondition(
            f"transaction {describe(target.origin, target.version)} cannot be reverted"
            f" safely: {len(changed)} of its records changed after it: {named}{more}."
            " Revert with force to overwrite those later changes",
            reason="CHANGED_LATER",
            metadata={
                "database": target.database,
                "origin": target.origin,
                "version": str(target.version),
                "records": str(len(changed)),
            },
        )

    def commit(self, local: LocalTransaction) -> int:
        """Write the revert as one transaction; its version (0 when nothing changed)."""
        local.reverts = types_pb2.TransactionRef(
            origin=self.target.origin, version=self.target.version
        )
        for u in self.undos:
            if u.kind is not None and u.action is not None:
                table = self.tables[u.table]
                local.restore(table, u.pk, u.kind, _OPERATIONS[u.action], u.doc)
        return local.commit()

    def response(self, origin: str, version: int) -> storage_pb2.RevertTransactionResponse:
        target = self.target
        return storage_pb2.RevertTransactionResponse(
            reverted=types_pb2.TransactionRef(origin=target.origin, version=target.version),
            revert=types_pb2.TransactionRef(origin=origin, version=version),
            records=[
                storage_pb2.RevertedRecord(
                    table=u.table,
                    id=orjson.dumps(u.pk),
                    operation=_OPERATIONS[u.action]
                    if u.action is not None
                    else types_pb2.OPERATION_UNSPECIFIED,
                    unchanged=u.kind is None,
                    later_writes=[
                        types_pb2.TransactionRef(origin=o, version=v) for v, o in u.later
                    ],
                )
                for u in self.undos
            ],
        )


def plan(engine: Engine, local: LocalTransaction, target: types_pb2.Transaction) -> Plan:
    """What reverting ``target`` writes, from the records as they are now."""
    stamp: Stamp = (target.version, target.origin)
    tables: dict[str, Table] = {}
    undos: list[Undo] = []
    for write in target.writes:
        if write.whole:
            continue  # a re-homing (residency) changed no attribute: nothing to undo
        table = tables.get(write.table) or engine.catalog.find_table(target.database, write.table)
        if table is None:
            raise NotFound(
                f"table {target.database}.{write.table}, written by transaction"
                f" {describe(target.origin, target.version)}, no longer exists"
            )
        tables[write.table] = table
        pk = orjson.loads(write.id)
        state = local.writer.load(table, [keys.encode_key(pk)])[0]
        if write.residents and (
            write.stub or state is None or not residency.holds_full(state, engine.node_name)
        ):
            residents = ", ".join(state.residents if state and state.residents else write.residents)
            raise FailedPrecondition(
                f"{engine.node_name} holds only a stub of {table.name} {pk!r}, so its log does"
                f" not know the record as it was; revert the transaction on one of its"
                f" residents ({residents})",
                reason="NOT_RESIDENT",
                metadata={"residents": residents},
            )
        undos.append(
            undo_write(
                table.name,
                pk,
                table.primary_key,
                write.kind,
                orjson.loads(write.value) if write.value else {},
                orjson.loads(write.prior) if write.prior else None,
                state,
                stamp,
            )
        )
    return Plan(target, undos, tables)
