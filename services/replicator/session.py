"""One established connection with a peer, after the handshake.

A session is a handful of tasks around one connection, a ``Peer`` (peer.py: the gRPC
stream in production, an in-memory pair of ends in the unit tests):

    reader     receives messages, dispatches them to the two roles (below), answers
               heartbeats; the only task that calls ``connection.recv``
    writer     drains the bounded outgoing queue; the only task that calls
               ``connection.send``
    heartbeat  probes the peer, measures latency, ends the session when the peer is silent
    inbound    the receiver role: copy, subscribe, apply batches, acknowledge (inbound.py)
    outbound   the sender role: serve copies, stream the log within a window (outbound.py)

The first task to end (or fail) ends the session; the rest are cancelled. Nothing a
session holds needs to survive it: positions live in storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common import members
from services.common.config import Route
from services.replicator import fetch, handover
from services.replicator.inbound import Inbound
from services.replicator.outbound import Outbound
from services.replicator.peer import ConnectionLost, Peer
from services.replicator.peercheck import PeerCertificate
from services.replicator.status import PeerState, now_ms

if TYPE_CHECKING:
    from services.replicator.replicator import Replicator

MEMBERSHIP_TABLE = (members.DATABASE, members.TABLE)
log = logging.getLogger("shoal.replicator.session")

OUTGOING_QUEUE = 64
MAX_FETCHES = 16  # a peer's fetches answered at once on one connection
MAX_POSITION_QUERIES = 4  # a peer's PositionsRequests answered at once
GOODBYE_TIMEOUT_S = 2.0


class SessionEnded(Exception):
    """The session is over; the message says why."""


@dataclass(frozen=True)
class Flows:
    """Which data flows on this connection, and for which databases."""

    sends: bool
    receives: bool
    all_databases: bool
    databases: frozenset[str]  # the flow's databases when not all
    # Sharded databases that flow neither way: the two nodes are not of the same shard.
    withheld: frozenset[str] = frozenset()

    def covers(self, database: str) -> bool:
        if database in self.withheld:
            return False
        return self.all_databases or database in self.databases


def published_tables(route: Route | None) -> set[tuple[str, str]] | None:
    """Tables this node sends on a route; None for every table (membership always)."""
    if route is None or not route.subscriptions:
        return None
    chosen = {(s.database, s.table) for s in route.subscriptions if s.publish}
    return chosen | {MEMBERSHIP_TABLE}


def flows(mine: rpb.Hello, theirs: rpb.Hello) -> Flows:
    """Agree on directions and databases from both Hellos (both sides compute the same)."""
    if mine.all_databases and theirs.all_databases:
        all_dbs, dbs = True, frozenset[str]()
    elif mine.all_databases:
        all_dbs, dbs = False, frozenset(theirs.databases)
    elif theirs.all_databases:
        all_dbs, dbs = False, frozenset(mine.databases)
    else:
        all_dbs, dbs = False, frozenset(mine.databases) & frozenset(theirs.databases)
    return Flows(
        sends=mine.sends and theirs.receives,
        receives=mine.receives and theirs.sends,
        all_databases=all_dbs,
        databases=dbs,
        withheld=withheld_databases(mine, theirs),
    )


def shard_of(hello: rpb.Hello) -> int | None:
    """The shard a Hello announces (None: the node has none)."""
    return hello.shard if hello.HasField("shard") else None


def withheld_databases(mine: rpb.Hello, theirs: rpb.Hello) -> frozenset[str]:
    """Sharded databases that must not flow between the two nodes of these Hellos.

    A database either side declares sharded flows only when both nodes have a shard and it
    is the same one; a node with no shard shares no sharded database with anyone. The
    rule is symmetric, so both sides compute the same set; ``system`` is never withheld.
    """
    mine_shard, their_shard = shard_of(mine), shard_of(theirs)
    if mine_shard is not None and mine_shard == their_shard:
        return frozenset()
    sharded = {*mine.sharded_databases, *theirs.sharded_databases}
    return frozenset(sharded - {members.DATABASE})


class Session:
    """A live connection with one peer."""

    def __init__(
        self,
        replicator: Replicator,
        connection: Peer,
        mine: rpb.Hello,
        theirs: rpb.Hello,
        dialed: bool,
        route: Route | None,
        state: PeerState,
        certificate: PeerCertificate | None = None,
    ) -> None:
        self.replicator = replicator
        self.config = replicator.config.replication
        self.connection = connection
        self.peer = theirs.node_name
        self.mine = mine
        self.theirs = theirs
        self.dialed = dialed
        self.dialer = replicator.name if dialed else self.peer
        self.address = connection.address
        self.route = route
        self.state = state
        self.certificate = certificate  # the peer's TLS certificate when established
        self.revoked = False  # once set, nothing more the peer sends is applied
        self.flows = flows(mine, theirs)
        self.out: asyncio.Queue[rpb.PeerMessage] = asyncio.Queue(maxsize=OUTGOING_QUEUE)
        self.finished = asyncio.Event()
        self.end_reason = ""
        self.last_heard = time.monotonic()
        self.reader_busy = False
        self._heartbeats: dict[int, float] = {}
        self._next_heartbeat = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fetches = 0
        self._position_queries = 0
        self._failure: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.inbound = Inbound(self)
        self.outbound = Outbound(self)

    @property
    def storage(self) -> Any:
        return self.replicator.storage

    def subscribed_tables(self) -> set[tuple[str, str]] | None:
        """Tables this node receives from the peer; None for every table. Explicit
        subscriptions always include membership (system.hdb_nodes)."""
        if self.route is None or not self.route.subscriptions:
            return None
        chosen = {(s.database, s.table) for s in self.route.subscriptions if s.subscribe}
        return chosen | {MEMBERSHIP_TABLE}

    def received_tables(self) -> set[tuple[str, str]] | None:
        """Tables that flow from the peer to this node: those this node subscribes to,
        within those the peer's Hello published; None for every table."""
        mine = self.subscribed_tables()
        theirs = {(t.database, t.table) for t in self.theirs.published_tables} or None
        if mine is None or theirs is None:
            return theirs if mine is None else mine
        return mine & theirs

    def published_tables(self) -> set[tuple[str, str]] | None:
        """Tables this node sends to the peer; None for every table (membership always)."""
        return published_tables(self.route)

    # -- plumbing ------------------------------------------------------------------------

    async def send(self, message: rpb.PeerMessage) -> None:
        """Queue a message for the writer (waits while the queue is full)."""
        await self.out.put(message)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a task whose failure ends the session."""
        task = asyncio.create_task(coro, name=f"{self.peer}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # always retrieved, so asyncio never reports it as lost
        if exc is not None and not self._failure.done():
            self._failure.set_result(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            )

    def end(self, reason: str) -> None:
        """End the session (from any task)."""
        if not self._failure.done():
            self._failure.set_result(reason)

    # -- life ----------------------------------------------------------------------------

    async def run(self) -> str:
        """Run until the session ends; returns why."""
        self.state.connected = True
        self.state.connected_since_ms = now_ms()
        # An error from before (a dial that failed while the peer was starting) no longer
        # describes the connection: only errors of this session show from now on.
        self.state.last_error = ""
        self.state.address = self.address
        self.state.dialed = self.dialed
        self.state.sends = self.flows.sends
        self.state.receives = self.flows.receives
        self.state.shard = shard_of(self.theirs)
        self.state.withheld = sorted(self.flows.withheld)
        self.state.received_tables = sorted(self.received_tables() or ())
        self.state.sent_tables = sorted(self.published_tables() or ())
        log.info(
            "connected to %s (%s, %s; sends=%s receives=%s%s)",
            self.peer,
            self.address,
            "dialed" if self.dialed else "accepted",
            self.flows.sends,
            self.flows.receives,
            f"; withheld by shard: {', '.join(self.state.withheld)}" if self.flows.withheld else "",
        )
        self.spawn(self._reader(), "reader")
        self.spawn(self._writer(), "writer")
        self.spawn(self._heartbeat(), "heartbeat")
        if self.flows.receives:
            self.spawn(self.inbound.run(), "inbound")
        try:
            self.end_reason = await self._failure
        finally:
            await self._shutdown()
        return self.end_reason

    def close(self, code: rpb.GoodbyeCode.ValueType, reason: str) -> None:
        """Say goodbye (best effort) and end the session."""
        with contextlib.suppress(asyncio.QueueFull):
            self.out.put_nowait(rpb.PeerMessage(goodbye=rpb.Goodbye(code=code, reason=reason)))
        self.end(reason)

    def revoke(self, reason: str) -> None:
        """The peer's certificate was revoked: apply nothing more, drop what was queued
        for it, and close with UNAUTHORIZED."""
        self.revoked = True
        self.state.last_error = reason
        while not self.out.empty():
            self.out.get_nowait()
        log.warning(
            "closing the connection with %s at %s (%s): %s",
            self.peer,
            self.address,
            self.certificate.describe() if self.certificate is not None else "no certificate",
            reason,
        )
        self.close(rpb.GOODBYE_CODE_UNAUTHORIZED, reason)

    @property
    def certificate_serial(self) -> str | None:
        """The serial of the certificate the peer connected with (None without TLS)."""
        return self.certificate.serial if self.certificate is not None else None

    async def _shutdown(self) -> None:
        try:
            # Give the writer a moment to flush a queued Goodbye.
            loop = asyncio.get_running_loop()
            writer_done = loop.time() + GOODBYE_TIMEOUT_S
            while not self.out.empty() and loop.time() < writer_done:
                if not any(t.get_name().endswith(":writer") for t in self._tasks):
                    break
                await asyncio.sleep(0.01)
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.connection.close()
        finally:
            # Always, even when the call itself is cancelled meanwhile (gRPC cancels an
            # accepted call's handler when the dialer goes away, as a peer that revoked
            # this node's certificate does): otherwise the status would show the peer
            # connected for as long as the process runs.
            for task in self._tasks:
                task.cancel()
            self._mark_disconnected()

    def _mark_disconnected(self) -> None:
        if self.finished.is_set():
            return
        if self.replicator.sessions.get(self.peer) in (None, self):
            # Only the peer's current session speaks for it (a replaced one must not).
            self.state.connected = False
            self.state.last_connected_ms = now_ms()
            self.state.back_pressure_percent = 0.0
        self.finished.set()
        log.info("disconnected from %s: %s", self.peer, self.end_reason or "the call ended")

    async def _writer(self) -> None:
        while True:
            message = await self.out.get()
            await self.connection.send(message)
            if message.WhichOneof("body") == "goodbye":
                self.end(f"closed: {message.goodbye.reason}")
                return

    async def _reader(self) -> None:
        while True:
            message = await self.connection.recv()
            if message is None:
                raise SessionEnded("the peer closed the stream")
            self.last_heard = time.monotonic()
            self.reader_busy = True
            try:
                await self._dispatch(message)
            finally:
                self.reader_busy = False

    async def _dispatch(self, message: rpb.PeerMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            if message.heartbeat.known_databases:
                self.inbound.on_peer_databases(message.heartbeat.known_databases)
            await self.send(
                rpb.PeerMessage(heartbeat_reply=rpb.HeartbeatReply(id=message.heartbeat.id))
            )
        elif kind == "heartbeat_reply":
            sent = self._heartbeats.pop(message.heartbeat_reply.id, None)
            if sent is not None:
                self.state.latency_ms = round((time.monotonic() - sent) * 1000, 3)
        elif kind in ("batch", "copy_chunk", "subscribe_error"):
            await self.inbound.deliver(message)
        elif kind == "subscribe":
            await self.outbound.on_subscribe(message.subscribe)
        elif kind == "unsubscribe":
            await self.outbound.on_unsubscribe(message.unsubscribe)
        elif kind == "ack":
            await self.outbound.on_ack(message.ack)
        elif kind == "copy_request":
            self.outbound.on_copy_request(message.copy_request)
        elif kind == "fetch_request":
            self._on_fetch(message.fetch_request)
        elif kind == "fetch_reply":
            self.replicator.fetches.resolve(message.fetch_reply)
        elif kind == "positions_request":
            self._on_positions(message.positions_request)
        elif kind == "positions_reply":
            self.replicator.position_queries.resolve(message.positions_reply)
        elif kind == "goodbye":
            reason = message.goodbye.reason or "the peer said goodbye"
            if message.goodbye.code not in (rpb.GOODBYE_CODE_SHUTDOWN, rpb.GOODBYE_CODE_DUPLICATE):
                self.state.last_error = reason
            if message.goodbye.code == rpb.GOODBYE_CODE_REMOVED:
                self.replicator.told_removed(self.peer)
            raise SessionEnded(f"goodbye from {self.peer}: {reason}")
        else:
            raise SessionEnded(f"unexpected {kind} message from {self.peer}")

    def _on_fetch(self, request: rpb.FetchRequest) -> None:
        """A peer reads records this node is a resident of: answered in a task of its
        own (the reader goes on), only with data this node sends the peer anyway."""
        refusal = ""
        if not self.flows.sends or not self.flows.covers(request.database):
            refusal = f"{self.replicator.name} does not send {request.database!r} to {self.peer}"
        elif self._fetches >= MAX_FETCHES:
            refusal = f"{self.replicator.name} is busy answering {MAX_FETCHES} reads"
        if refusal:
            reply = rpb.FetchReply(id=request.id, error=refusal)
            with contextlib.suppress(asyncio.QueueFull):
                self.out.put_nowait(rpb.PeerMessage(fetch_reply=reply))
            return
        self._fetches += 1

        async def answer() -> None:
            try:
                await fetch.serve(self, request)
            finally:
                self._fetches -= 1

        self.spawn(answer(), "fetch")

    def _on_positions(self, request: rpb.PositionsRequest) -> None:
        """A peer asks which positions of a database this node holds (a hand-over):
        answered in a task of its own, at most MAX_POSITION_QUERIES at once."""
        if self._position_queries >= MAX_POSITION_QUERIES:
            reply = rpb.PositionsReply(
                id=request.id, error=f"{self.replicator.name} is busy answering"
            )
            with contextlib.suppress(asyncio.QueueFull):
                self.out.put_nowait(rpb.PeerMessage(positions_reply=reply))
            return
        self._position_queries += 1

        async def answer() -> None:
            try:
                await handover.serve(self, request)
            finally:
                self._position_queries -= 1

        self.spawn(answer(), "positions")

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_interval_s
        timeout = self.config.peer_timeout_s
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - self.last_heard
            if silent > timeout and not self.reader_busy:
                raise ConnectionLost(f"no message from {self.peer} for {silent:.1f}s")
            self._next_heartbeat += 1
            self._heartbeats[self._next_heartbeat] = time.monotonic()
            for old in [i for i in self._heartbeats if i < self._next_heartbeat - 16]:
                del self._heartbeats[old]
            # Never block here: a peer that stopped reading must still be detected.
            with contextlib.suppress(asyncio.QueueFull):
                self.out.put_nowait(
                    rpb.PeerMessage(
                        heartbeat=rpb.Heartbeat(
                            id=self._next_heartbeat,
                            known_databases=self.replicator.known_databases,
                        )
                    )
                )
            self.state.back_pressure_percent = self.outbound.window.used_percent
