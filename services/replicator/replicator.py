"""The replicator of one node: its peers, the connections to them, and what flows where.

* For every configured route a dial loop (dialing.py) keeps one connection up,
  reconnecting with jittered exponential backoff (``replication.reconnectDelay`` ..
  ``reconnectMaxDelay``). It does not dial a peer that already has a live connection (in
  either direction).
* Peers that dial in are accepted after the same handshake checks.
* Between two nodes there is at most one connection: when both dial, the connection
  dialed by the node with the smaller name is kept and the other is closed with
  DUPLICATE. Both sides apply the same rule, so they agree.
* Exclusions: a node receiving an origin's data directly asks every other peer not to
  relay that origin's transactions. When a direct connection comes or goes, every
  session re-subscribes with the new exclusions.
* Membership (gossip): the peers dialed are the configured routes plus, with
  ``replication.gossip``, every member of ``system.hdb_nodes`` (membership.py watches the
  table, which replicates like any other). A configured route wins over the member row
  of the same node. A node removed from the table (a tombstone) is neither dialed nor
  accepted, and its connections close; a node that sees itself removed stops dialing
  members until one adds it back.
* Revocation (peercheck.py): a TLS peer whose certificate serial is revoked (routes,
  system.hdb_nodes) or listed in a CRL is refused at the handshake, on both sides; when a
  live session's serial becomes revoked, it stops applying and closes with UNAUTHORIZED.
* Admission (admission.py): on the plain port only known source addresses may replicate;
  on both ports a dialer must be a route or a member, or join (every dial this node makes
  joins). A dialer admitted by its join is recorded in this node's system.hdb_nodes.
* TLS material comes from a ``TlsSource``: certificate files changed on disk are used by
  the next dial (and served to the next connection) without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import types_pb2

from services.common import members
from services.common.config import (
    Route,
    ShoalConfig,
)
from services.common.errors import InvalidArgument
from services.common.tls_source import TlsSource
from services.replicator.admission import Admission, joined_row
from services.replicator.confirmation import Confirmations
from services.replicator.copies import CopyGate
from services.replicator.dialing import HANDSHAKE_TIMEOUT_S, dial_loop
from services.replicator.fetch import Fetches
from services.replicator.handover import PositionQueries
from services.replicator.handshake import (
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    NotHello,
    Refused,
    check_dialer,
    choose_version,
    goodbye,
    receive_hello,
)
from services.replicator.local import LocalStorage, StorageUnavailable
from services.replicator.membership import MembershipWatcher
from services.replicator.peer import Peer
from services.replicator.peercheck import (
    PeerCertificate,
    PeerCheck,
    revoked_serials,
)
from services.replicator.session import Session, published_tables
from services.replicator.status import PeerState

log = logging.getLogger("shoal.replicator")

RECORD_TIMEOUT_S = 10.0  # writing a joined node's row in system.hdb_nodes
MAX_STRANGERS = 32  # refused peers that are neither routes nor members, kept in status


class Replicator:
    """All peer connections of one node."""

    def __init__(self, config: ShoalConfig, storage: LocalStorage, tls: TlsSource | None) -> None:
        self.config = config
        self.name = config.node_name
        self.storage = storage
        self.tls = tls
        self.configured: dict[str, Route] = {r.hostname: r for r in config.replication.routes}
        self.membership = members.Membership()
        self.routes: dict[str, Route] = dict(self.configured)
        self.sessions: dict[str, Session] = {}
        self.fetches = Fetches(self)
        self.position_queries = PositionQueries()
        self.copies = CopyGate()
        self.peers: dict[str, PeerState] = {
            r.hostname: PeerState(r.hostname) for r in config.replication.routes
        }
        self._dialers: dict[str, asyncio.Task[Any]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._joining: set[str] = set()  # joined nodes whose row is being written
        self._strangers: dict[str, None] = {}  # refused unknown peers, oldest first
        self._closing = False
        self._session_changed = asyncio.Event()
        self._refused_as_removed: set[str] = set()  # members that refused us as removed
        self.peercheck = PeerCheck.from_config(config, tls)
        self.admission = Admission(self.name)
        self.watcher = MembershipWatcher(config, storage, tls is not None, self.set_membership)
        self.confirmations = Confirmations(self.name)
        self._watch_task: asyncio.Task[None] | None = None
        # This node's databases as last read from storage, sent in every heartbeat.
        self.known_databases: list[str] = []

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        sharded = self.config.replication.sharded_databases
        if sharded and self.config.replication.shard is None:
            log.warning(
                "%s %s sharded but replication.shard is not set: this node keeps them to"
                " itself (a node with no shard shares no sharded database)",
                ", ".join(sharded),
                "is" if len(sharded) == 1 else "are",
            )
        for route in self.routes.values():
            self._start_dialing(route)
        self._watch_task = asyncio.create_task(self.watcher.run(), name="membership")
        task = asyncio.create_task(self._watch_databases(), name="databases")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_databases(self) -> None:
        """Keep ``known_databases`` fresh, and notice restores (storage's positions epoch
        changed): every session subscribes again from the positions storage has now.
        Both are read once per heartbeat interval."""
        epoch = 0
        while True:
            try:
                self.known_databases = await self.storage.databases()
                current = (await self.storage.positions()).epoch
                if epoch and current != epoch:
                    log.info("positions changed (a restore): subscribing again to every peer")
                    for session in self.sessions.values():
                        session.inbound.resubscribe.set()
                epoch = current
            except StorageUnavailable as exc:
                log.debug("cannot list this node's databases: %s", exc)
            await asyncio.sleep(self.config.replication.heartbeat_interval_s)

    def _start_dialing(self, route: Route) -> None:
        self._dialers[route.hostname] = asyncio.create_task(
            dial_loop(self, route), name=f"dial:{route.hostname}"
        )

    @property
    def removed(self) -> bool:
        """True when this node's own entry in system.hdb_nodes was deleted, or a member
        refused it as removed (the deletion may not have reached this node: members close
        their connections with a removed node at once)."""
        return self.name in self.membership.removed or bool(self._refused_as_removed)

    def told_removed(self, peer: str) -> None:
        if not self._refused_as_removed:
            log.warning("%s says this node was removed from the cluster", peer)
        self._refused_as_removed.add(peer)
        self._reconcile()

    def set_routes(self, routes: list[Route]) -> None:
        """Apply a new list of configured routes at once (see the SetRoutes contract)."""
        self.configured = {r.hostname: r for r in routes}
        self._enforce_revocations()
        self._reconcile()

    def set_membership(self, membership: members.Membership) -> None:
        """Apply what system.hdb_nodes says (called by the membership watcher)."""
        self.membership = membership
        for name in membership.removed:
            session = self.sessions.get(name)
            if session is not None:
                session.close(rpb.GOODBYE_CODE_REMOVED, f"{name} was removed from the cluster")
        self._enforce_revocations()
        self._reconcile()

    def revoked(self) -> dict[str, str]:
        """Revoked certificate serials (configured routes and system.hdb_nodes rows)."""
        return revoked_serials(self.configured.values(), self.membership.rows)

    def _enforce_revocations(self) -> None:
        """Cut every live session whose peer certificate is now revoked."""
        revoked = self.revoked()
        for session in list(self.sessions.values()):
            if session.certificate is None or session.revoked or session.finished.is_set():
                continue
            reason = self.peercheck.revoked_reason(session.peer, session.certificate, revoked)
            if reason:
                session.revoke(reason)

    def check_certificate(self, peer: str, certificate: PeerCertificate) -> None:
        """CertificateRefused when ``certificate`` may not replicate with this node."""
        self.peercheck.check(peer, certificate, self.revoked())

    def _effective_routes(self) -> dict[str, Route]:
        """Configured routes, plus members when gossiping; never a removed node."""
        routes: dict[str, Route] = {}
        if self.config.replication.gossip and not self.removed:
            routes.update(self.membership.members)
        routes.update(self.configured)
        return {n: r for n, r in routes.items() if n not in self.membership.removed}

    def _reconcile(self) -> None:
        new = self._effective_routes()
        for name, old in list(self.routes.items()):
            if new.get(name) == old:
                continue
            task = self._dialers.pop(name, None)
            if task is not None:
                task.cancel()
            session = self.sessions.get(name)
            if session is not None and (session.dialed or name in new):
                # Removed: drop what we dialed. Changed: reconnect with the new settings.
                session.close(rpb.GOODBYE_CODE_SHUTDOWN, f"route to {name} changed")
            if name not in new and (session is None or session.dialed):
                self.peers.pop(name, None)
        self.routes = new
        for name, route in new.items():
            self.peer_state(name)
            if name not in self._dialers:
                self._start_dialing(route)

    async def close(self) -> None:
        self._closing = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        for task in [*self._dialers.values(), *self._background]:
            task.cancel()
        for session in list(self.sessions.values()):
            session.close(rpb.GOODBYE_CODE_SHUTDOWN, f"{self.name} is shutting down")
        waits = [s.finished.wait() for s in list(self.sessions.values())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), timeout=5)
        await asyncio.gather(*self._dialers.values(), return_exceptions=True)

    def peer_state(self, peer: str) -> PeerState:
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = PeerState(peer)
        return state

    # -- hellos ------------------------------------------------------------------------------

    async def hello(
        self, route: Route | None, expected_name: str = "", join: bool = False
    ) -> rpb.Hello:
        """This node's Hello; a dialer's joins (see the Join message)."""
        databases = self.replicated_databases()
        sends = route.replicates.sends if route is not None else True
        receives = route.replicates.receives if route is not None else True
        if route is not None and route.subscriptions:
            sends = sends and any(s.publish for s in route.subscriptions)
            receives = receives and any(s.subscribe for s in route.subscriptions)
        return rpb.Hello(
            protocol_min=PROTOCOL_MIN,
            protocol_max=PROTOCOL_MAX,
            node_name=self.name,
            expected_name=expected_name,
            all_databases=databases is None,
            databases=databases or (),
            known_databases=await self._databases(),
            sends=sends,
            receives=receives,
            join=rpb.Join(url=self.watcher.url) if join else None,
            shard=self.config.replication.shard,
            sharded_databases=self.config.replication.sharded_databases,
            published_tables=[
                types_pb2.TableRef(database=d, table=t)
                for d, t in sorted(published_tables(route) or ())
            ],
        )

    async def _databases(self) -> list[str]:
        self.known_databases = await self.storage.databases()
        return self.known_databases

    def replicated_databases(self) -> tuple[str, ...] | None:
        """``replication.databases`` (None: every database); `system` always replicates."""
        databases = self.config.replication.database_names
        if databases is None or members.DATABASE in databases:
            return databases
        return (*databases, members.DATABASE)

    # -- dialing ------------------------------------------------------------------------------

    async def run_dialed(
        self, stream: Peer, route: Route, certificate: PeerCertificate | None = None
    ) -> None:
        """Say Hello on a connection this node dialed to ``route`` and, once the peer
        answers Hello, run the session until it ends."""
        address = stream.address
        try:
            mine = await self.hello(route, expected_name=route.hostname, join=True)
            await stream.send(rpb.PeerMessage(hello=mine))
            theirs = await receive_hello(stream, HANDSHAKE_TIMEOUT_S)
            if theirs.node_name != route.hostname:
                raise Refused(
                    rpb.GOODBYE_CODE_NAME_MISMATCH,
                    f"dialed {route.hostname!r} at {address} but reached {theirs.node_name!r}",
                )
            session = Session(
                self,
                stream,
                mine,
                theirs,
                True,
                route,
                self.peer_state(theirs.node_name),
                certificate,
            )
            if not self._register(session):
                raise Refused(
                    rpb.GOODBYE_CODE_DUPLICATE, "a connection with this peer already exists"
                )
        except BaseException:
            await stream.close()
            raise
        await self._run_session(session)

    # -- accepting ------------------------------------------------------------------------------

    async def accept(
        self,
        stream: Peer,
        transport_names: set[str] | None,
        certificate: PeerCertificate | None = None,
    ) -> None:
        """Serve a peer's incoming Replicate stream until the session ends."""
        address = stream.address
        if self._closing:
            await stream.send(goodbye(rpb.GOODBYE_CODE_SHUTDOWN, f"{self.name} is shutting down"))
            return
        try:
            theirs = await receive_hello(stream, HANDSHAKE_TIMEOUT_S)
        except NotHello as exc:
            raise InvalidArgument(
                f"the first message of a Replicate stream must be a Hello ({exc.reason})"
            ) from None
        except Refused as exc:  # the dialer said Goodbye first: nothing to answer
            log.info("%s said goodbye before its Hello: %s", address, exc.reason)
            return
        try:
            version = await self._admit(theirs, address, transport_names, certificate)
            route = self.routes.get(theirs.node_name)
            mine = await self.hello(route)
            mine.protocol_version = version
            session = Session(
                self,
                stream,
                mine,
                theirs,
                False,
                route,
                self.peer_state(theirs.node_name),
                certificate,
            )
            if not self._register(session):
                raise Refused(
                    rpb.GOODBYE_CODE_DUPLICATE,
                    f"{self.name} already has a connection with {theirs.node_name}"
                    " that wins the tie-break",
                )
        except Refused as exc:
            if exc.code != rpb.GOODBYE_CODE_DUPLICATE:
                self._note_refusal(theirs.node_name or address, exc.reason)
                log.warning(
                    "refused %s from %s (%s): %s",
                    theirs.node_name or "a dialer",
                    address,
                    certificate.describe() if certificate is not None else "no certificate",
                    exc.reason,
                )
            await stream.send(goodbye(exc.code, exc.reason))
            return
        try:
            await stream.send(rpb.PeerMessage(hello=mine))
        except BaseException:
            # The peer went away (or the call was cancelled) before the session ran: it
            # must not stay registered, or every later connection of the peer would be
            # refused as a duplicate of it.
            if self.sessions.get(session.peer) is session:
                del self.sessions[session.peer]
            raise
        await self._run_session(session)

    async def _admit(
        self,
        theirs: rpb.Hello,
        address: str,
        transport_names: set[str] | None,
        certificate: PeerCertificate | None,
    ) -> int:
        """The handshake checks of a dialer's Hello; the protocol version chosen, or
        Refused."""
        secure = transport_names is not None
        if not secure:
            await self.admission.check_address(
                address,
                theirs.node_name,
                self.known(),
                self.config.replication.allowed_sources,
            )
        version = choose_version(theirs)
        check_dialer(self.name, theirs, transport_names)
        if certificate is not None:
            self.check_certificate(theirs.node_name, certificate)
        if theirs.node_name in self.membership.removed:
            raise Refused(
                rpb.GOODBYE_CODE_REMOVED,
                f"{theirs.node_name} was removed from the cluster (system.hdb_nodes);"
                " a member's add_node adds it back",
            )
        if self.admission.check_identity(theirs, self.known(), secure):
            self._record_joined(theirs)
        return version

    def known(self) -> set[str]:
        """Names admitted without a join: configured routes and live members."""
        return {*self.configured, *self.routes, *self.membership.rows} - {self.name}

    def _note_refusal(self, peer: str, reason: str) -> None:
        """Show a refusal as the peer's last error; refused strangers (neither routes nor
        members) are kept in status too, at most MAX_STRANGERS of them (the oldest go)."""
        if peer not in self.known() and peer not in self.sessions:
            self._strangers.pop(peer, None)
            self._strangers[peer] = None
            while len(self._strangers) > MAX_STRANGERS:
                oldest = next(iter(self._strangers))
                del self._strangers[oldest]
                if oldest not in self.known() and oldest not in self.sessions:
                    self.peers.pop(oldest, None)
        self.peer_state(peer).last_error = reason

    def _record_joined(self, hello: rpb.Hello) -> None:
        """Write a dialer admitted by its join into system.hdb_nodes (in the background;
        the row replicates, so every member learns of it)."""
        name = hello.node_name
        if name in self._joining:
            return
        self._joining.add(name)
        task = asyncio.create_task(self._write_joined(hello), name=f"join:{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_joined(self, hello: rpb.Hello) -> None:
        name = hello.node_name
        try:
            row = orjson.dumps(joined_row(hello))
            await asyncio.wait_for(
                self.storage.upsert(members.DATABASE, members.TABLE, [row]), RECORD_TIMEOUT_S
            )
            log.info("recorded %s in system.hdb_nodes: it joined", name)
        except (StorageUnavailable, TimeoutError) as exc:
            log.warning("could not record %s (it joined) in system.hdb_nodes: %s", name, exc)
        finally:
            self._joining.discard(name)

    # -- the registry -------------------------------------------------------------------

    def _register(self, session: Session) -> bool:
        """Admit a session unless an existing one with the same peer wins the tie-break."""
        existing = self.sessions.get(session.peer)
        if existing is not None and not existing.finished.is_set():
            preferred = min(self.name, session.peer)
            if session.dialer != preferred or existing.dialer == preferred:
                return False
            existing.close(
                rpb.GOODBYE_CODE_DUPLICATE, "replaced by the connection dialed by " + preferred
            )
        self.sessions[session.peer] = session
        return True

    async def _run_session(self, session: Session) -> None:
        if self._refused_as_removed:
            # A member connects with us again: we were added back.
            self._refused_as_removed.clear()
            self._reconcile()
        self._changed()
        try:
            reason = await session.run()
        finally:
            if self.sessions.get(session.peer) is session:
                del self.sessions[session.peer]
            self._changed()
        state = session.state
        quiet = "shutting down" in reason or "replaced by the connection" in reason
        if reason and not quiet and not state.last_error:
            state.last_error = reason

    def _changed(self) -> None:
        """A session came or went: wake redial waits and re-subscribe with new exclusions."""
        self._session_changed.set()
        for session in self.sessions.values():
            if session.inbound.excluded != self.exclusions_for(session.peer):
                session.inbound.resubscribe.set()

    def exclusions_for(self, peer: str) -> list[str]:
        """Origins not to receive from ``peer``: ourselves and peers we receive from directly."""
        direct = {
            name
            for name, s in self.sessions.items()
            if name != peer and s.flows.receives and not s.finished.is_set()
        }
        return sorted({self.name, *direct})

    # -- write confirmation ------------------------------------------------------------------

    def recipients(self, database: str, tables: Iterable[str]) -> list[str]:
        """Distinct peers that can receive a write to ``tables`` of ``database`` from this
        node, connected or not (see the ListRecipients contract)."""
        mine = self.replicated_databases()
        if mine is not None and database not in mine:
            return []
        written = {(database, t) for t in tables}
        sharded = database in self.config.replication.sharded_databases
        peers = []
        for name in sorted({*self.routes, *self.sessions} - {self.name}):
            session = self.sessions.get(name)
            if session is not None and not session.finished.is_set():
                # Connected: what both Hellos agreed on.
                if not (session.flows.sends and session.flows.covers(database)):
                    continue
                published = session.published_tables()
            else:
                route = self.routes.get(name)
                if route is None or not route.replicates.sends:
                    continue
                if sharded and not self._same_shard(name):
                    continue
                published = published_tables(route)
            if published is None or written <= published:
                peers.append(name)
        return peers

    def shard_members(self) -> list[str]:
        """Other members whose system.hdb_nodes row names this node's shard."""
        return sorted(n for n in self.membership.rows if n != self.name and self._same_shard(n))

    def _same_shard(self, peer: str) -> bool:
        """True when ``peer``'s row in system.hdb_nodes names this node's shard."""
        row = self.membership.rows.get(peer)
        shard = row.get("shard") if row is not None else None
        mine = self.config.replication.shard
        return mine is not None and isinstance(shard, int) and shard == mine

    # -- status ------------------------------------------------------------------------------

    def status(self) -> rpb.StatusResponse:
        return rpb.StatusResponse(
            node_name=self.name,
            connections=[
                state.to_proto(self.config.logging.audit_retention_s)
                for _, state in sorted(self.peers.items())
            ],
            removed=self.removed,
            shard=self.config.replication.shard,
        )
