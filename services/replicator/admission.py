"""Who may replicate with this node: the admission policy of an incoming Replicate stream.

Checked by the listener after the Hello, on both replication ports:

* **Source address (plain port only).** Without TLS nothing vouches for a name, so the
  connection's source address must be an address of the node it claims to be (a route
  or a live member of ``system.hdb_nodes``, its name resolved with the system resolver
  and cached for ``RESOLVE_TTL_S``), or fall in ``replication.allowedSources``, the
  explicit list of addresses and networks that may speak for any name. Nothing is
  trusted implicitly, this machine's own addresses included: nodes on one machine all
  dial from 127.0.0.1 (a connection to 127.0.0.x leaves from 127.0.0.1), so a same-host
  development cluster lists 127.0.0.1 there (``shoal local up --insecure`` does), and
  then any process of that machine may speak for any of them.
* **Known identity.** The dialer's node name (on the TLS port, already one of its
  certificate's names) must be a configured route or a live member (a row of
  ``system.hdb_nodes``).
* **Join.** A dialer the listener does not know is admitted when its Hello carries a
  ``join``: Shoal dials only peers its own routes or membership list, so ``add_node`` run
  on one member reaches the others this way. The credential is the transport's: a
  certificate from a trusted CA naming the dialer (TLS port), or a source address in
  ``replication.allowedSources`` (plain port). The listener then records the dialer in
  its ``system.hdb_nodes``.

A removed node (a tombstone) is refused before this, join or not (replicator.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Collection

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common import members
from services.common.config import ConfigError, IPNetwork
from services.common.sources import IPAddress, source_address
from services.replicator.handshake import Refused

log = logging.getLogger("shoal.replicator")


RESOLVE_TTL_S = 30.0  # how long a resolved host (or this machine's addresses) is trusted
FAILED_TTL_S = 5.0  # how long a host that did not resolve stays unresolved
RESOLVE_TIMEOUT_S = 2.0  # one resolution, at most
REFRESH_AFTER_S = 1.0  # an unknown source re-resolves entries older than this, once


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class KnownAddresses:
    """Resolves host names to addresses, with a cache and a deadline per resolution."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, frozenset[IPAddress]]] = {}

    async def resolve(self, host: str, max_age_s: float = RESOLVE_TTL_S) -> frozenset[IPAddress]:
        literal = _literal(host)
        if literal is not None:
            return frozenset({literal})
        cached = self._cache.get(host)
        if cached is not None and time.monotonic() - cached[0] <= max_age_s:
            return cached[1]
        addresses: frozenset[IPAddress] = frozenset()
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
                timeout=RESOLVE_TIMEOUT_S,
            )
            addresses = frozenset(
                a for a in (_literal(str(info[4][0]).split("%", 1)[0]) for info in infos) if a
            )
        except (OSError, TimeoutError) as exc:
            log.debug("cannot resolve %s: %s", host, exc)
        # A failure is remembered for a short while only: DNS may come back.
        stamp = time.monotonic() - (0 if addresses else RESOLVE_TTL_S - FAILED_TTL_S)
        self._cache[host] = (stamp, addresses)
        for stale in [h for h, (at, _) in self._cache.items() if time.monotonic() - at > 600]:
            del self._cache[stale]
        return addresses


class Admission:
    """The admission checks of one node (see the module comment)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses = KnownAddresses()

    async def check_address(
        self,
        peer: str,
        claimed: str,
        known: Collection[str],
        allowed: Collection[IPNetwork],
    ) -> None:
        """Plain port: Refused (UNAUTHORIZED, naming the address) unless ``peer``'s source
        address is in ``allowed`` or, for a known name, is an address of that name."""
        source = source_address(peer)
        if source is not None:
            if any(source in network for network in allowed):
                return
            if claimed in known and claimed != self.name:
                if source in await self.addresses.resolve(claimed):
                    return
                # Maybe the host moved: resolve again what is older than a second, once.
                if source in await self.addresses.resolve(claimed, REFRESH_AFTER_S):
                    return
        shown = str(source) if source is not None else peer
        who = f" saying it is {claimed}" if claimed else ""
        if claimed in known:
            why = f"{shown} is not an address of {claimed}"
        else:
            why = f"{claimed or 'it'} is not a route or member of {self.name}"
        raise Refused(
            rpb.GOODBYE_CODE_UNAUTHORIZED,
            f"refusing the plain-port connection from {shown}{who}: {why}, and {shown} is not"
            " in replication.allowedSources. Without TLS a node must dial from an address"
            " its name resolves to, or from an allowed source; or use mutual TLS",
        )

    def check_identity(self, hello: rpb.Hello, known: Collection[str], secure: bool) -> bool:
        """Refused unless the dialer is a route or a member, or joins; True when it joined
        without being known (the caller records it in system.hdb_nodes)."""
        name = hello.node_name
        if name in known:
            return False
        if not hello.HasField("join"):
            raise Refused(
                rpb.GOODBYE_CODE_UNAUTHORIZED,
                f"{name} is not a member of this cluster: {self.name} has no route to it"
                " and no row for it in system.hdb_nodes; add it with add_node on any member"
                f' ({{"operation": "add_node", "hostname": "{name}"}}) or list it in'
                " replication.routes",
            )
        url = hello.join.url
        if url:
            try:
                members.to_route({members.PRIMARY_KEY: name, "url": url}, self.name)
            except ConfigError as exc:
                raise Refused(
                    rpb.GOODBYE_CODE_PROTOCOL_ERROR,
                    f"the join of {name} carries an unusable url {url!r}: "
                    + "; ".join(exc.problems),
                ) from exc
        credential = "a certificate from a trusted CA naming it" if secure else "a known address"
        log.info("admitting %s, which joins with %s", name, credential)
        return True


def joined_row(hello: rpb.Hello) -> dict[str, str]:
    """The hdb_nodes attributes a listener writes for a dialer that joined."""
    row = {members.PRIMARY_KEY: hello.node_name}
    if hello.join.url:
        row["url"] = hello.join.url
    return row
