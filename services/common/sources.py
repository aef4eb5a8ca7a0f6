"""Where a call comes from: the source address of its connection, and the address the
node's admin service vouches for when it forwards a caller's credentials to storage.

gRPC names a call's peer ``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5`` or ``unix:/path``. The admin
service calls storage from its own address, so it adds ``shoal-forwarded-for: <address>
<mac>``, the MAC an HMAC-SHA256 of the address under the node secret: storage believes the
address only with a valid MAC (only the node's own processes hold the secret), and
refuses a call whose header does not verify.

Sign-in throttling keys on ``source_key``: an IPv4 address, an IPv6 /64 (one host
usually has a whole /64), or the peer string itself for anything else.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import urllib.parse
from collections.abc import Sequence

from services.common.errors import Unauthenticated

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FORWARDED_FOR_HEADER = "shoal-forwarded-for"
IPV6_PREFIX = 64

# The peer of the RPC being served (``context.peer()``), set by the server edge.
current_peer: contextvars.ContextVar[str] = contextvars.ContextVar("shoal_peer", default="")
# The caller's address as the authenticator established it (the one the admin service
# vouched for, else the peer's); "" until then.
current_source: contextvars.ContextVar[str] = contextvars.ContextVar("shoal_source", default="")


def enter_call(peer: str) -> None:
    """Record the peer of the RPC being served (the server edge calls this first)."""
    current_peer.set(peer)
    current_source.set("")


def call_source() -> str:
    """The address of the RPC being served: the established one, else the peer's."""
    return current_source.get() or source_text(current_peer.get())


def source_address(peer: str) -> IPAddress | None:
    """The IP address of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def source_text(peer: str) -> str:
    """A peer as an address (``1.2.3.4``, ``::1``), or the peer string when it has none."""
    address = source_address(peer)
    return str(address) if address is not None else peer


def source_key(source: str) -> str:
    """What sign-in throttling counts by: the address, an IPv6 address's /64, or the
    text itself when it is not an address."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


def _mac(secret: str, source: str) -> str:
    message = f"{FORWARDED_FOR_HEADER}\x00{source}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def forwarded_for_metadata(secret: str, source: str) -> tuple[tuple[str, str], ...]:
    """Call metadata with which the node's admin service names its caller's address."""
    quoted = urllib.parse.quote(source, safe=":.[]/")
    return ((FORWARDED_FOR_HEADER, f"{quoted} {_mac(secret, source)}"),)


def forwarded_source(metadata: Sequence[tuple[str, str | bytes]], secret: str) -> str | None:
    """The address ``shoal-forwarded-for`` names (None without the header);
    Unauthenticated when its MAC does not verify."""
    for key, value in metadata:
        if key.lower() != FORWARDED_FOR_HEADER:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        quoted, _, mac = text.strip().rpartition(" ")
        source = urllib.parse.unquote(quoted)
        if not quoted or not hmac.compare_digest(mac.encode(), _mac(secret, source).encode()):
            raise Unauthenticated(
                f"{FORWARDED_FOR_HEADER} is only for this node's own services; leave it out"
            )
        return source
    return None
