"""The receiver role of a session: the peer's data, applied to this node's storage.

The loop:
  1. copy each database of the flow that this node holds no position for (it never
     wrote or received it), or whose copy was interrupted (it resumes after the last
     merged key), unless the route has a startTime;
  2. subscribe with the durable positions from storage and the current exclusions;
  3. apply each Batch through storage Apply (data and positions in one atomic write),
     then Ack it;
  4. start over when exclusions change (a new generation), when the sender reports its
     log truncated (copy that database first), or after refusing a transaction whose
     clock is too far ahead (after a backoff, with the reason in status).

Batches arrive through a small bounded queue filled by the session's reader, so a slow
apply pushes back on the peer through gRPC flow control.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.common import members
from services.common.backoff import Backoff
from services.common.errors import error_reason
from services.common.hlc import version_from_ms, version_ms
from services.replicator.copying import PeerRevoked, run_copy
from services.replicator.local import StorageUnavailable
from services.replicator.status import now_ms

if TYPE_CHECKING:
    from services.replicator.session import Session

log = logging.getLogger("shoal.replicator.inbound")

QUEUE_SIZE = 8
APPLY_BYTES = 4 * 1024 * 1024  # at most this much in one storage Apply


@dataclass(frozen=True)
class _Resubscribe:
    """Exclusions changed: subscribe again."""


@dataclass(frozen=True)
class _Truncated:
    """The sender no longer has the log we need for a database: copy it."""

    database: str


@dataclass(frozen=True)
class _Refused:
    """We refused a transaction (clock skew): pause, then subscribe again."""

    reason: str


def spb_table(database: str, table: str) -> types_pb2.TableRef:
    return types_pb2.TableRef(database=database, table=table)


class ProtocolViolation(Exception):
    """The peer sent something the protocol does not allow here."""


class Inbound:
    """Receives the peer's data for this node."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.queue: asyncio.Queue[rpb.PeerMessage] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.generation = 0
        self.resubscribe = asyncio.Event()
        self._appeared: set[str] = set()  # the peer's new databases, to check
        self._checking: asyncio.Task[None] | None = None
        self._held: rpb.PeerMessage | None = None
        self.excluded: list[str] = []
        self._copy_id = 0
        self._copies_seen: dict[str, int] = {}  # the copy gate's counts at the subscription
        # The subscription covers some tables only, or starts at a time: positions the
        # transactions bring do not stand for every write (ApplyRequest.partial).
        self.partial = False
        # Storage's positions epoch the subscription started from (ApplyRequest.epoch).
        self.epoch = 0
        # The tables the subscription carries when not all (ApplyRequest.tables).
        self.tables: list[types_pb2.TableRef] = []
        # Databases copied in this session because the subscription carries more tables
        # than this node's positions stand for (at most once each: a peer behind this
        # node for some origin cannot bring more).
        self._widened: set[str] = set()
        self._copy_failed = False  # a copy failed: pause before the next attempt
        config = session.config
        self._skew_ms = int(config.max_clock_skew_s * 1000)
        self._pause = Backoff(
            max(1.0, config.reconnect_delay_s), max(5.0, config.reconnect_max_delay_s)
        )

    async def deliver(self, message: rpb.PeerMessage) -> None:
        await self.queue.put(message)

    def _start_version(self) -> int:
        """Where a subscription starts for what this node holds no position of: the
        route's startTime, else this node's own row's start_time (add_node / update_node
        on a member: the node joins from that time on instead of copying); 0: from the
        start, copying what it never held."""
        route = self.session.route
        start = route.start_time if route is not None else None
        if start is None:
            replicator = self.session.replicator
            start = members.start_time(replicator.watcher.current.rows.get(replicator.name))
        if start is None:
            return 0
        return version_from_ms(int(start.timestamp() * 1000))

    async def _membership_first(self, positions: spb.GetPositionsResponse) -> bool:
        """A node that never received membership from anyone (a new node) copies
        `system` first: its own row, written by the member that added it, may say to
        start at a time instead of copying. True when it does."""
        session = self.session
        me = session.replicator.name
        if members.DATABASE not in self._flow_databases() or any(
            p.database == members.DATABASE and p.origin != me for p in positions.positions
        ):
            return False
        gate = session.replicator.copies
        # Copied here, or meanwhile from another peer: either way the row is read again.
        await self._copy(members.DATABASE, None, gate.completed(members.DATABASE))
        await session.replicator.watcher.refresh()
        return self._start_version() != 0

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        session = self.session
        while True:
            if self._copy_failed:
                self._copy_failed = False
                await asyncio.sleep(self._pause.next())
            await self._copy_unsynced()
            self.generation += 1
            self.resubscribe.clear()
            positions = await session.storage.positions()
            self.epoch = positions.epoch
            self.excluded = session.replicator.exclusions_for(session.peer)
            flows = session.flows
            tables = session.received_tables()
            self.tables = [spb_table(d, t) for d, t in sorted(tables or ())]
            if tables is not None:
                tables = {(d, t) for d, t in tables if flows.covers(d)}
                databases = sorted({d for d, _ in tables})
            else:
                databases = (
                    [] if flows.all_databases else sorted(filter(flows.covers, flows.databases))
                )
            subscribe = rpb.Subscribe(
                generation=self.generation,
                databases=databases,
                tables=[spb_table(d, t) for d, t in sorted(tables or ())],
                positions=positions.positions,
                exclude_origins=self.excluded,
                default_version=self._start_version(),
            )
            self._copies_seen = session.replicator.copies.snapshot()
            self.partial = tables is not None or subscribe.default_version != 0
            await session.send(rpb.PeerMessage(subscribe=subscribe))
            outcome = await self._consume(self.generation)
            if isinstance(outcome, _Truncated):
                log.info(
                    "%s: log truncated for %s; copying",
                    session.peer,
                    outcome.database or "a database",
                )
                databases = [outcome.database] if outcome.database else self._flow_databases()
                for database in databases:
                    await self._copy(database, None, self._copies_seen.get(database, 0))
            elif isinstance(outcome, _Refused):
                session.state.last_error = outcome.reason
                await session.send(
                    rpb.PeerMessage(
                        unsubscribe=rpb.Unsubscribe(
                            generation=self.generation, reason=outcome.reason
                        )
                    )
                )
                delay = self._pause.next()
                log.warning(
                    "refusing data from %s for %.1fs: %s", session.peer, delay, outcome.reason
                )
                await asyncio.sleep(delay)

    async def _next(self) -> rpb.PeerMessage | None:
        """The next message, or None when a resubscription was requested."""
        if self._held is not None:
            message, self._held = self._held, None
            return message
        if self.resubscribe.is_set():
            return None
        get = asyncio.ensure_future(self.queue.get())
        wake = asyncio.ensure_future(self.resubscribe.wait())
        try:
            await asyncio.wait({get, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        return None

    def _more_batches(self, first: rpb.Batch) -> list[rpb.Batch]:
        """``first`` plus the batches of its generation already waiting, bounded in bytes.

        Under load several batches queue up while one is applied; applying them with one
        storage Apply and one cumulative Ack costs a fraction of doing it per batch.
        """
        batches = [first]
        size = first.ByteSize()
        while size < APPLY_BYTES and not self.queue.empty():
            message = self.queue.get_nowait()
            if (
                message.WhichOneof("body") != "batch"
                or message.batch.generation != first.generation
            ):
                self._held = message  # handled next, in order
                break
            batches.append(message.batch)
            size += message.batch.ByteSize()
        state = self.session.state
        state.received_bytes += size
        state.received_transactions += sum(len(b.transactions) for b in batches)
        return batches

    async def _consume(self, generation: int) -> _Resubscribe | _Truncated | _Refused:
        session = self.session
        while True:
            message = await self._next()
            if message is None:
                return _Resubscribe()
            kind = message.WhichOneof("body")
            if kind == "subscribe_error":
                error = message.subscribe_error
                if error.generation != generation:
                    continue
                if error.reason == "LOG_TRUNCATED":
                    return _Truncated(error.database)
                raise ProtocolViolation(
                    f"{session.peer} cannot serve the subscription: {error.message}"
                )
            if kind != "batch" or message.batch.generation != generation:
                continue  # data of an older generation or a stale copy chunk
            outcome = await self._apply(self._more_batches(message.batch))
            if outcome is not None:
                return outcome
            self._pause.reset()

    async def _apply(self, batches: list[rpb.Batch]) -> _Refused | _Resubscribe | None:
        session = self.session
        last = batches[-1]
        received = [t for b in batches for t in b.transactions]
        transactions = self._admitted(received)
        if received and not transactions:
            # Every one refused: acknowledge anyway, so the sender's window moves on.
            sequence = max(b.sequence for b in batches)
            ack = rpb.Ack(generation=last.generation, sequence=sequence)
            await session.send(rpb.PeerMessage(ack=ack))
        if transactions:
            if session.revoked:
                raise PeerRevoked(f"the certificate of {session.peer} was revoked")
            try:
                reply = await session.storage.apply(
                    transactions, self._skew_ms, self.partial, self.epoch, self.tables
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    reason = error_reason(exc)
                    if reason == "CLOCK_SKEW":
                        return _Refused(exc.details() or "clock skew")
                    if reason == "POSITIONS_CHANGED":
                        log.info(
                            "%s: positions changed (a restore); subscribing again", session.peer
                        )
                        return _Resubscribe()
                raise StorageUnavailable(f"storage Apply failed: {exc.details()}") from exc
            sequence = max(b.sequence for b in batches)
            if sequence:
                ack = rpb.Ack(
                    generation=last.generation, sequence=sequence, positions=reply.positions
                )
                await session.send(rpb.PeerMessage(ack=ack))
            if reply.fenced_databases:
                # This node is handing them over (a shard change): what was left unapplied
                # comes again from the positions at the next subscription, after a pause.
                return _Refused(
                    f"not applying {', '.join(reply.fenced_databases)} from {session.peer} now:"
                    " this node is handing it over (shard change)"
                )
            arrived = now_ms()
            for txn in transactions:
                db = session.state.database(txn.database)
                db.last_received_version = max(db.last_received_version, txn.version)
                db.last_received_at_ms = arrived
            if session.state.last_error.startswith("transaction"):
                session.state.last_error = ""  # a refused transaction has now been applied
        for db in session.state.databases.values():
            if last.caught_up:
                db.backlog_seconds = 0.0
            elif db.last_received_version:
                lag_ms = version_ms(last.sender_time) - version_ms(db.last_received_version)
                db.backlog_seconds = max(0.0, lag_ms / 1000)
        return None

    def _admitted(self, transactions: list[types_pb2.Transaction]) -> list[types_pb2.Transaction]:
        """``transactions`` without those no peer may send: a database withheld by shard
        (the peer is not of this node's shard), or this node's own transactions (this
        node is where they come from; one arriving from a peer is forged or replayed).
        They are refused and logged, never applied. Positions are per (database, origin),
        so leaving them out skips nothing else."""
        me = self.session.replicator.name
        own = [t for t in transactions if t.origin == me]
        if own:
            reason = (
                f"refused {len(own)} transactions from {self.session.peer} that claim to come"
                f" from this node ({me}), first {own[0].database} version {own[0].version}"
            )
            log.warning("%s", reason)
            self.session.state.last_error = reason
            transactions = [t for t in transactions if t.origin != me]
        withheld = self.session.flows.withheld
        refused = [t for t in transactions if t.database in withheld]
        if not refused:
            return transactions
        databases = ", ".join(sorted({t.database for t in refused}))
        reason = (
            f"refused {len(refused)} transactions of {databases} from {self.session.peer}:"
            " sharded, and the peer is not of this node's shard"
        )
        log.warning("%s", reason)
        self.session.state.last_error = reason
        return [t for t in transactions if t.database not in withheld]

    # -- copies ----------------------------------------------------------------------------

    def on_peer_databases(self, names: Sequence[str]) -> None:
        """A heartbeat listed the peer's databases. One it did not have at the Hello (it
        got it by a copy, or created it since) is copied from it unless its log reaches
        this node first (checked after two heartbeat intervals)."""
        session = self.session
        known = session.theirs.known_databases
        new = [n for n in names if n not in known]
        if not new:
            return
        known.extend(new)
        if not session.flows.receives:
            return
        self._appeared.update(n for n in new if session.flows.covers(n))
        if self._appeared and (self._checking is None or self._checking.done()):
            self._checking = session.spawn(self._check_appeared(), "new-databases")

    async def _check_appeared(self) -> None:
        await asyncio.sleep(2 * self.session.config.heartbeat_interval_s)
        positions = await self.session.storage.positions()
        synced = {p.database for p in positions.positions}
        unsynced = sorted(self._appeared - synced)
        self._appeared.clear()
        if unsynced:
            log.info(
                "%s has %s, which no log brought here: copying",
                self.session.peer,
                ", ".join(unsynced),
            )
            self.resubscribe.set()

    def _flow_databases(self) -> list[str]:
        flows = self.session.flows
        known = [d for d in self.session.theirs.known_databases if flows.covers(d)]
        tables = self.session.received_tables()
        if tables is not None:
            known = [d for d in known if any(db == d for db, _ in tables)]
        return sorted(known)

    def _narrower(self, positions: spb.GetPositionsResponse, database: str) -> bool:
        """True when a position of ``database`` that this subscription continues stands
        for fewer tables than the subscription carries (GetPositionsResponse.limited): an
        earlier subscription to some tables only passed over the origin's writes to the
        others. Origins this node receives directly on another connection are that
        connection's to bring."""
        session = self.session
        tables = session.received_tables()
        wanted = None if tables is None else {t for d, t in tables if d == database}
        skipped = {session.replicator.name, *session.replicator.exclusions_for(session.peer)}
        for limit in positions.limited:
            if limit.database != database or limit.origin in skipped:
                continue
            if wanted is None or not wanted <= set(limit.tables):
                return True
        return False

    async def _widen(self, positions: spb.GetPositionsResponse) -> None:
        """Copy each database whose subscription now carries tables this node's positions
        do not stand for: the writes it was not subscribed to come with the copy (a
        widened subscription catches up), then the log brings the rest."""
        gate = self.session.replicator.copies
        for database in self._flow_databases():
            if database in self._widened or not self._narrower(positions, database):
                continue
            log.info(
                "the subscription to %s from %s carries tables this node was not subscribed"
                " to: copying them",
                database,
                self.session.peer,
            )
            if await self._copy(database, None, gate.completed(database)):
                self._widened.add(database)

    async def _copy_unsynced(self) -> None:
        if self._start_version():
            return
        session = self.session
        seen = session.replicator.copies.snapshot()
        positions = await session.storage.positions()
        if await self._membership_first(positions):
            return
        # A database this node holds any position for (its own commits included) is
        # subscribed to, not copied: the peer's log brings what is missing, and a
        # LOG_TRUNCATED answer leads to a copy then. An unfinished copy from this peer
        # is resumed; one from another peer is that peer's to resume.
        synced = {p.database for p in positions.positions}
        mine = {c.database: c for c in positions.copies if c.source == session.peer}
        others = {c.database for c in positions.copies if c.source != session.peer}
        # A database restored from a backup older than this node's own last write to it
        # (catching_up), or one the peer holds more of this node's writes of than this
        # node does (it was restored, or rebuilt): those writes are only on peers, and no
        # log brings a node its own transactions, so it copies the database.
        me = session.replicator.name
        own = {p.database: p.version for p in positions.positions if p.origin == me}
        reported = session.replicator.confirmations.reported
        behind = {
            d
            for d in self._flow_databases()
            if d in positions.catching_up or reported(session.peer, d) > own.get(d, 0)
        }
        await self._widen(positions)
        for database in self._flow_databases():
            if database in behind and database not in mine:
                log.info(
                    "%s holds writes of this node to %s that it lacks (a restore): copying",
                    session.peer,
                    database,
                )
            if database in mine or database not in synced or database in behind:
                if database not in mine and database in others:
                    # Another peer's copy of it stopped half-way: give that peer's session
                    # a moment to take the gate and resume it, rather than start afresh.
                    await asyncio.sleep(2 * session.config.heartbeat_interval_s)
                await self._copy(database, mine.get(database), seen.get(database, 0))

    async def _take(self, lock: asyncio.Lock, database: str) -> None:
        """Acquire the database's copy gate. Meanwhile, what arrives is of the
        subscription that ended (the copy comes first): it is read and dropped, so the
        session's reader never blocks on a full queue."""
        if lock.locked():
            log.info(
                "waiting for the copy of %s from another peer before copying it from %s",
                database,
                self.session.peer,
            )
        self._held = None
        acquire = asyncio.ensure_future(lock.acquire())
        try:
            while not acquire.done():
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({acquire, get}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                lock.release()
            else:
                acquire.cancel()
            raise

    async def _copy(self, database: str, progress: spb.CopyProgress | None, since: int) -> bool:
        """Copy ``database`` from the peer (resuming ``progress``), unless a copy of it
        completed since the gate's count was ``since``. True when this copy completed."""
        session = self.session
        if database in session.flows.withheld:
            return False  # sharded, and the peer is not of this node's shard
        gate = session.replicator.copies
        lock = gate.lock(database)
        await self._take(lock, database)
        try:
            if gate.completed(database) > since:
                log.info(
                    "%s was copied from another peer meanwhile; not copying it from %s",
                    database,
                    session.peer,
                )
                return False
            if await self._run_copy(database, progress):
                gate.finished(database)
                return True
            self._copy_failed = True
            return False
        finally:
            lock.release()

    async def _run_copy(self, database: str, progress: spb.CopyProgress | None) -> bool:
        """One part of a copy: request it, merge every chunk (``copying.py``). True when
        it completed."""
        self._copy_id += 1
        return await run_copy(
            self.session, database, self._copy_id, progress, self._copy_message, self._pause
        )

    async def _copy_message(self) -> rpb.PeerMessage:
        """The next message during a copy: one held back, else the next in the queue."""
        if self._held is not None:
            message, self._held = self._held, None
            return message
        return await self.queue.get()
