"""Credentials on the wire, the authenticated identity, and the node-internal secret.

Clients send ``authorization: Basic base64(user:password)`` metadata. A node's own
replicator and admin processes send ``authorization: Bearer <node secret>``, where the
secret is 32 random bytes the storage process writes to ``<rootPath>/keys/node.secret``
(mode 0600) at first start; ``SHOAL_NODE_SECRET`` overrides the file (containers that do
not share the data volume).

A node's admin process acts for a caller its port authenticated by a client certificate
(``operationsApi.mtls``, no password to forward) with the node secret plus
``shoal-acting-for: <user>`` (percent-encoded UTF-8): storage then authenticates the call
as that user (it must exist and be active) and applies the user's role. Storage honours
the header only with the node secret; from anyone else it refuses the call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import os
import secrets
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import Unauthenticated

NODE_SECRET_ENV = "SHOAL_NODE_SECRET"
NODE_SECRET_FILE = "node.secret"
INTERNAL_USER_PREFIX = "node:"
ACTING_FOR_HEADER = "shoal-acting-for"


@dataclass(frozen=True)
class Identity:
    """Who is calling."""

    name: str
    super_user: bool = False
    internal: bool = False


@dataclass(frozen=True)
class BasicCredentials:
    """A user name and password from Basic authorization."""

    username: str
    password: str


@dataclass(frozen=True)
class BearerToken:
    """A bearer token (the node secret)."""

    token: str


Credentials = BasicCredentials | BearerToken

# The identity of the RPC being served, set by the server edge for the handler's task.
current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("shoal_identity")


def identity() -> Identity:
    """The caller of the RPC being served (raises LookupError outside an RPC)."""
    return current_identity.get()


def parse_authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> Credentials:
    """Credentials from call metadata; Unauthenticated when absent or malformed."""
    header = None
    for key, value in metadata or ():
        if key.lower() == "authorization":
            header = value.decode() if isinstance(value, bytes) else value
            break
    if header is None:
        raise Unauthenticated("Must login")  # Harper's text
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise Unauthenticated("malformed Basic credentials") from exc
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise Unauthenticated("malformed Basic credentials")
        return BasicCredentials(username, password)
    if scheme.lower() == "bearer" and rest.strip():
        return BearerToken(rest.strip())
    raise Unauthenticated("unsupported authorization scheme (use Basic)")


def basic_metadata(username: str, password: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying Basic credentials."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return (("authorization", f"Basic {token}"),)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


def acting_for(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The user named by ``shoal-acting-for`` metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == ACTING_FOR_HEADER:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            return urllib.parse.unquote(text)
    return None


def acting_for_metadata(secret: str, username: str) -> tuple[tuple[str, str], ...]:
    """Call metadata with which a node's own service acts for ``username``."""
    return (*bearer_metadata(secret), (ACTING_FOR_HEADER, urllib.parse.quote(username, safe="")))


def has_authorization(metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
    """Whether the call carries an ``authorization`` header."""
    return any(key.lower() == "authorization" for key, _ in metadata or ())


def _write_private(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_node_secret(keys_path: Path) -> str:
    """The node secret, created on first call (storage does this at start-up)."""
    if NODE_SECRET_ENV in os.environ:
        return os.environ[NODE_SECRET_ENV]
    path = keys_path / NODE_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(32)
    _write_private(path, secret)
    return secret


async def read_node_secret(keys_path: Path, timeout_s: float = 30.0) -> str:
    """The node secret, waiting (bounded) for storage to create it on a first start."""
    if NODE_SECRET_ENV in os.environ:
        return os.environ[NODE_SECRET_ENV]
    path = keys_path / NODE_SECRET_FILE
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        if path.exists():
            text = path.read_text().strip()
            if text:
                return text
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no node secret at {path} after {timeout_s:.0f}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def write_private_file(path: Path, data: str) -> None:
    """Write a file only its owner can read (0600), atomically."""
    _write_private(path, data)
