"""Dialing a route: the loop that keeps one connection to a peer up, reconnecting with
jittered exponential backoff (``replication.reconnectDelay`` .. ``reconnectMaxDelay``).
It does not dial a peer that already has a live connection, except that the node with
the smaller name dials one the peer dialed: its connection wins the tie-break
(``Replicator._register``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.backoff import Backoff
from services.common.config import (
    DEFAULT_REPLICATION_PORT,
    DEFAULT_REPLICATION_SECURE_PORT,
    Route,
)
from services.replicator.handshake import Refused
from services.replicator.local import StorageUnavailable
from services.replicator.peer import ConnectionLost
from services.replicator.peercheck import CertificateRefused
from services.replicator.transport import dial

if TYPE_CHECKING:
    from services.replicator.replicator import Replicator

log = logging.getLogger("shoal.replicator")

HANDSHAKE_TIMEOUT_S = 10.0
STABLE_SESSION_S = 10.0


def route_address(replicator: Replicator, route: Route) -> tuple[str, bool]:
    """(host:port, secure) to dial for a route."""
    secure = route.secure if route.secure is not None else replicator.tls is not None
    if secure and replicator.tls is None:
        secure = False
    default = DEFAULT_REPLICATION_SECURE_PORT if secure else DEFAULT_REPLICATION_PORT
    host = f"[{route.hostname}]" if ":" in route.hostname else route.hostname
    return f"{host}:{route.port or default}", secure


async def dial_loop(replicator: Replicator, route: Route) -> None:
    """Keep one connection to ``route`` up while the replicator runs."""
    config = replicator.config.replication
    backoff = Backoff(config.reconnect_delay_s, config.reconnect_max_delay_s)
    state = replicator.peer_state(route.hostname)
    preferred = min(replicator.name, route.hostname) == replicator.name
    while not replicator._closing:
        existing = replicator.sessions.get(route.hostname)
        upgrade = existing is not None and preferred and existing.dialer != replicator.name
        if existing is not None and not upgrade:
            await existing.finished.wait()
            continue
        # With no connection, dial. With one the peer dialed, the node with the smaller
        # name still dials: its connection wins the tie-break, so the result does not
        # depend on who dialed first. A failed upgrade is not an error: we are connected.
        address, secure = route_address(replicator, route)
        started = time.monotonic()
        try:
            certificate = None
            if secure:
                certificate = await replicator.peercheck.server_certificate(
                    address, HANDSHAKE_TIMEOUT_S
                )
                replicator.check_certificate(route.hostname, certificate)
            stream = await dial(
                address,
                replicator.tls.current() if secure and replicator.tls is not None else None,
                HANDSHAKE_TIMEOUT_S,
                replicator.config.storage.max_message_bytes,
            )
            await replicator.run_dialed(stream, route, certificate)
        except CertificateRefused as exc:
            state.last_error = exc.reason
            log.warning(
                "not connecting to %s at %s%s: %s",
                route.hostname,
                address,
                f" ({certificate.describe()})" if certificate is not None else "",
                exc.reason,
            )
        except Refused as exc:
            if exc.code == rpb.GOODBYE_CODE_REMOVED:
                replicator.told_removed(route.hostname)
            if exc.code != rpb.GOODBYE_CODE_DUPLICATE and not upgrade:
                state.last_error = exc.reason
                log.warning("%s refused the connection: %s", route.hostname, exc.reason)
        except (ConnectionLost, StorageUnavailable, OSError) as exc:
            if not upgrade:
                state.last_error = f"{type(exc).__name__}: {exc}"
            log.debug("dial %s failed: %s", address, exc)
        if time.monotonic() - started > STABLE_SESSION_S:
            backoff.reset()
        if upgrade:
            await asyncio.sleep(backoff.next())
        else:
            await _sleep_or_session(replicator, route.hostname, backoff.next())


async def _sleep_or_session(replicator: Replicator, peer: str, delay: float) -> None:
    """Sleep before redialing, but stop early if the peer connects to us meanwhile."""
    deadline = time.monotonic() + delay
    while not replicator._closing and peer not in replicator.sessions:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        replicator._session_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replicator._session_changed.wait(), timeout=remaining)
