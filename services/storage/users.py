"""Users of one node: stored in the meta column family, never replicated.

A user is ``user/<name>`` -> JSON ``{"role": "super_user", "active": true,
"password": "scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>"}``. Passwords are hashed
with scrypt (from ``cryptography``). Verifying scrypt costs tens of milliseconds, so a
successful verification is remembered for a short time under a keyed digest of the
credentials (never the password itself); any change to a user clears it.

Authentication failures say the same thing whether or not the user exists, and an
unknown user costs the same scrypt work as a wrong password.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from services.common.auth import (
    INTERNAL_USER_PREFIX,
    BasicCredentials,
    BearerToken,
    Identity,
    parse_authorization,
    write_private_file,
)
from services.common.errors import Unauthenticated
from services.storage.db import Store

log = logging.getLogger("shoal.storage.users")

USER_PREFIX = b"user/"
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
CACHE_TTL_S = 300.0
CACHE_SIZE = 4096
INITIAL_PASSWORD_FILE = "initial-admin-password"
_FAILED = "invalid username or password"


def hash_password(password: str) -> str:
    """A salted scrypt hash in Shoal's stored format."""
    salt = os.urandom(16)
    kdf = Scrypt(salt=salt, length=32, n=2**SCRYPT_LOG2_N, r=SCRYPT_R, p=SCRYPT_P)
    digest = kdf.derive(password.encode())
    return "$".join(
        [
            "scrypt",
            str(SCRYPT_LOG2_N),
            str(SCRYPT_R),
            str(SCRYPT_P),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a stored hash."""
    try:
        scheme, log_n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    kdf = Scrypt(salt=base64.b64decode(salt), length=32, n=2 ** int(log_n), r=int(r), p=int(p))
    try:
        kdf.verify(password.encode(), base64.b64decode(digest))
    except InvalidKey:
        return False
    return True


_DUMMY_HASH = hash_password(secrets.token_hex(8))


@dataclass(frozen=True)
class User:
    """A stored user."""

    name: str
    role: str
    active: bool
    password_hash: str

    @property
    def super_user(self) -> bool:
        return self.role == "super_user"


class UserStore:
    """Users of this node and the authenticator every storage RPC goes through."""

    def __init__(self, store: Store, node_name: str, node_secret: str) -> None:
        self._store = store
        self._node_identity = Identity(
            name=INTERNAL_USER_PREFIX + node_name, super_user=True, internal=True
        )
        self._node_secret = node_secret
        self._cache_key = os.urandom(32)
        self._cache: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()

    def get(self, name: str) -> User | None:
        raw = self._store.meta.get(USER_PREFIX + name.encode())
        if raw is None:
            return None
        data = orjson.loads(raw)
        return User(name, data["role"], data["active"], data["password"])

    def put(self, name: str, password: str, role: str = "super_user", active: bool = True) -> None:
        value = orjson.dumps({"role": role, "active": active, "password": hash_password(password)})
        self._store.meta.put(USER_PREFIX + name.encode(), value, self._store.write_options)
        self._cache.clear()

    def any_user(self) -> bool:
        return any(True for _ in self._store.scan("meta", USER_PREFIX, USER_PREFIX[:-1] + b"0"))

    def bootstrap(self, username: str, password: str | None, keys_path: Path) -> None:
        """Create the first super user when the node has none."""
        if self.any_user():
            return
        password = password or os.environ.get("SHOAL_ADMIN_PASSWORD")
        username = os.environ.get("SHOAL_ADMIN_USERNAME", username)
        if not password:
            password = secrets.token_urlsafe(18)
            path = keys_path / INITIAL_PASSWORD_FILE
            write_private_file(path, password + "\n")
            log.warning(
                "created super user %r with a generated password, stored in %s", username, path
            )
        else:
            log.info("created super user %r", username)
        self.put(username, password)

    def _digest(self, username: str, password: str) -> bytes:
        return hmac.new(
            self._cache_key, f"{username}\x00{password}".encode(), hashlib.sha256
        ).digest()

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        credentials = parse_authorization(metadata)
        if isinstance(credentials, BearerToken):
            if hmac.compare_digest(credentials.token.encode(), self._node_secret.encode()):
                return self._node_identity
            raise Unauthenticated(_FAILED)
        assert isinstance(credentials, BasicCredentials)
        digest = self._digest(credentials.username, credentials.password)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(digest)
            return cached[1]
        user = self.get(credentials.username)
        stored = user.password_hash if user is not None else _DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, credentials.password, stored)
        if user is None or not ok or not user.active:
            raise Unauthenticated(_FAILED)
        ident = Identity(name=user.name, super_user=user.super_user)
        self._cache[digest] = (now + CACHE_TTL_S, ident)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return ident
