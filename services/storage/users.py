"""Users and roles of one node: stored in the meta column family, never replicated.

A user is ``user/<name>`` -> JSON ``{"role": "super_user", "active": true,
"password": "scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>"}``. Passwords are hashed
with scrypt (from ``cryptography``). Verifying scrypt costs tens of milliseconds, so a
successful verification is remembered for a short time under a keyed digest of the
credentials (never the password itself); any change to a user or a role clears it.
Concurrent sign-ins with the same credentials share one verification.

A role is ``role/<name>`` -> its normalized permission JSON (see ``permissions.py``).
Roles are kept in memory (they are few and read on every sign-in); the built-in roles
``super_user`` and ``cluster_user`` (Harper's) are not stored and can be neither altered
nor dropped.

Authentication failures say the same thing whether or not the user exists, and an
unknown user costs the same scrypt work as a wrong password. Failed sign-ins slow down
further sign-ins of the same user name *from the same source address* (and, past a
higher count, of any name from that address) with exponential backoff
(``throttle.py``): a throttled sign-in is refused with RESOURCE_EXHAUSTED saying when to
retry, before any scrypt work, cached credentials included. The source is the call's
peer address, or the address the node's admin service vouches for
(``services.common.sources``). At most ``authentication.maxConcurrentVerifications``
scrypt checks run at once. Counters live in memory (a restart forgets them).

Without an ``authorization`` header, a call over a connection whose verified client
certificate names a user (``storage.mtls`` with ``user: Common Name``) is that user, and
the node's admin process may act for such a user (``shoal-acting-for`` with the node
secret, see ``services.common.auth``): ``named_user`` checks that the user exists, is
active and has a role; no password is involved, so no lockout either.
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
    ACTING_FOR_HEADER,
    INTERNAL_USER_PREFIX,
    BasicCredentials,
    BearerToken,
    Identity,
    acting_for,
    has_authorization,
    parse_authorization,
    write_private_file,
)
from services.common.config.model import AuthenticationConfig
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from services.common.sources import (
    current_peer,
    current_source,
    forwarded_source,
    source_key,
    source_text,
)
from services.common.tokens import (
    INVALID,
    OPERATION,
    REFRESH,
    TokenLifetimes,
    TokenSigner,
    looks_like_token,
)
from services.storage import keys
from services.storage.db import Store
from services.storage.permissions import (
    CLUSTER_USER_PERMISSION,
    SUPER_USER_PERMISSION,
    Permission,
    UserIdentity,
    parse_permission,
)
from services.storage.schema import check_name
from services.storage.throttle import Attempt, SignInThrottle, ThrottleSettings, VerificationSlots

log = logging.getLogger("shoal.storage.users")

USER_PREFIX = b"user/"
ROLE_PREFIX = b"role/"
SUPER_USER_ROLE = "super_user"
CLUSTER_USER_ROLE = "cluster_user"
BUILT_IN_ROLES = {
    SUPER_USER_ROLE: SUPER_USER_PERMISSION,
    CLUSTER_USER_ROLE: CLUSTER_USER_PERMISSION,
}
SCRYPT_LOG2_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
CACHE_TTL_S = 300.0
CACHE_SIZE = 4096
VERIFY_QUEUE_PER_SLOT = 32  # sign-ins that may wait for a scrypt check, per slot
VERIFY_WAIT_S = 10.0  # the longest one waits
INITIAL_PASSWORD_FILE = "initial-admin-password"
_FAILED = "Login failed"  # Harper's text


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

    def encode(self) -> bytes:
        return orjson.dumps(
            {"role": self.role, "active": self.active, "password": self.password_hash}
        )


def _check_password(password: str) -> None:
    if not password:
        raise InvalidArgument("password must not be empty")


class UserStore:
    """Users and roles of this node, and the authenticator every storage RPC goes through."""

    def __init__(
        self,
        store: Store,
        node_name: str,
        node_secret: str,
        throttle: ThrottleSettings | None = None,
        verifications: int = 2,
        token_lifetimes: TokenLifetimes | None = None,
    ) -> None:
        self._store = store
        self.tokens = TokenSigner(
            node_secret, node_name, token_lifetimes or TokenLifetimes.of(AuthenticationConfig())
        )
        self._node_identity = Identity(
            name=INTERNAL_USER_PREFIX + node_name, super_user=True, internal=True
        )
        self._node_secret = node_secret
        self.throttle = SignInThrottle(throttle or ThrottleSettings())
        self._slots = VerificationSlots(
            verifications, VERIFY_QUEUE_PER_SLOT * verifications, VERIFY_WAIT_S
        )
        self._cache_key = os.urandom(32)
        self._cache: OrderedDict[bytes, tuple[float, Identity]] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[Identity]] = {}
        self._generation = 0
        self._roles: dict[str, Permission] = {}
        for key, value in store.scan("meta", ROLE_PREFIX, keys.prefix_end(ROLE_PREFIX)):
            self._roles[key[len(ROLE_PREFIX) :].decode()] = parse_permission(value)

    # -- reading -----------------------------------------------------------------------

    @staticmethod
    def _decode(name: str, raw: bytes) -> User:
        data = orjson.loads(raw)
        return User(name, data["role"], data["active"], data["password"])

    def get(self, name: str) -> User | None:
        raw = self._store.meta.get(USER_PREFIX + name.encode())
        return None if raw is None else self._decode(name, raw)

    def users(self) -> list[User]:
        """Every user, by name."""
        return [
            self._decode(key[len(USER_PREFIX) :].decode(), raw)
            for key, raw in self._store.scan("meta", USER_PREFIX, keys.prefix_end(USER_PREFIX))
        ]

    def any_user(self) -> bool:
        return any(
            True for _ in self._store.scan("meta", USER_PREFIX, keys.prefix_end(USER_PREFIX))
        )

    def role(self, name: str) -> Permission | None:
        """A role's permission (None when the role does not exist)."""
        if name in BUILT_IN_ROLES:
            return BUILT_IN_ROLES[name]
        return self._roles.get(name)

    def roles(self) -> list[tuple[str, Permission]]:
        """Every role, by name, the built-in ones included."""
        custom = [(n, p) for n, p in self._roles.items() if n not in BUILT_IN_ROLES]
        return sorted([*BUILT_IN_ROLES.items(), *custom])

    def _is_super_user(self, user: User, roles: dict[str, Permission] | None = None) -> bool:
        if not user.active:
            return False
        if roles is not None and user.role in roles:
            return roles[user.role].super_user
        permission = self.role(user.role)
        return permission is not None and permission.super_user

    def _keep_a_super_user(
        self, after: list[User], what: str, roles: dict[str, Permission] | None = None
    ) -> None:
        """FAILED_PRECONDITION when a change leaves no active super user (and one was)."""
        before = self.users()
        if any(self._is_super_user(u) for u in before) and not any(
            self._is_super_user(u, roles) for u in after
        ):
            raise FailedPrecondition(
                f"{what} would leave this node without an active super user",
                reason="LAST_SUPER_USER",
            )

    def _existing_role(self, name: str) -> Permission:
        check_name("role", name)
        permission = self.role(name)
        if permission is None:
            raise NotFound(f"role {name!r} does not exist")
        return permission

    # -- changing users ----------------------------------------------------------------

    def _changed(self) -> None:
        """Forget every cached sign-in: users or roles changed."""
        self._generation += 1
        self._cache.clear()
        self._pending.clear()

    def _write_user(self, user: User) -> None:
        self._store.meta.put(
            USER_PREFIX + user.name.encode(), user.encode(), self._store.write_options
        )
        self._changed()

    def _check_new_user(self, name: str, password: str, role: str) -> None:
        check_name("user", name)
        _check_password(password)
        if not role:
            raise InvalidArgument("role is required")
        check_name("role", role)
        if self.get(name) is not None:
            raise AlreadyExists(f"User {name} already exists")
        self._existing_role(role)

    async def add_user(self, name: str, password: str, role: str, active: bool) -> User:
        """Create a user (see the AddUser contract)."""
        self._check_new_user(name, password, role)
        hashed = await asyncio.to_thread(hash_password, password)
        self._check_new_user(name, password, role)  # again: things may have changed meanwhile
        user = User(name, role, active, hashed)
        self._write_user(user)
        log.info("added user %r with role %r", name, role)
        return user

    def _existing_user(self, name: str) -> User:
        check_name("user", name)
        user = self.get(name)
        if user is None:
            raise NotFound(f"user {name!r} does not exist")
        return user

    def _altered(
        self, name: str, password_hash: str | None, role: str | None, active: bool | None
    ) -> User:
        user = self._existing_user(name)
        if role is not None:
            self._existing_role(role)
        return User(
            name,
            user.role if role is None else role,
            user.active if active is None else active,
            user.password_hash if password_hash is None else password_hash,
        )

    async def alter_user(
        self, name: str, password: str | None, role: str | None, active: bool | None
    ) -> User:
        """Change a user (see the AlterUser contract)."""
        check_name("user", name)
        if password is None and role is None and active is None:
            raise InvalidArgument("nothing to change: give a password, a role or active")
        if password is not None:
            _check_password(password)
        if role is not None and not role:
            raise InvalidArgument("role must not be empty")
        self._altered(name, None, role, active)
        hashed = None
        if password is not None:
            hashed = await asyncio.to_thread(hash_password, password)
        after = self._altered(name, hashed, role, active)  # the state may have changed
        self._keep_a_super_user(
            [after if u.name == name else u for u in self.users()], f"changing user {name!r}"
        )
        self._write_user(after)
        self.throttle.forget_name(name)
        log.info("altered user %r (role %r, active %s)", name, after.role, after.active)
        return after

    def drop_user(self, name: str) -> None:
        """Delete a user (see the DropUser contract)."""
        self._existing_user(name)
        self._keep_a_super_user(
            [u for u in self.users() if u.name != name], f"dropping user {name!r}"
        )
        self._store.meta.delete(USER_PREFIX + name.encode(), self._store.write_options)
        self._changed()
        self.throttle.forget_name(name)
        log.info("dropped user %r", name)

    def bootstrap(self, username: str, password: str | None, keys_path: Path) -> None:
        """Create the first super user when the node has none."""
        if self.any_user():
            return
        password = password or os.environ.get("SHOAL_ADMIN_PASSWORD")
        username = os.environ.get("SHOAL_ADMIN_USERNAME") or username
        if not password:
            password = secrets.token_urlsafe(18)
            path = keys_path / INITIAL_PASSWORD_FILE
            write_private_file(path, password + "\n")
            log.warning(
                "created super user %r with a generated password, stored in %s", username, path
            )
        else:
            log.info("created super user %r", username)
        self._write_user(User(username, SUPER_USER_ROLE, True, hash_password(password)))

    # -- changing roles ----------------------------------------------------------------

    def _write_role(self, name: str, permission: Permission) -> None:
        self._store.meta.put(
            ROLE_PREFIX + name.encode(), permission.json, self._store.write_options
        )
        self._roles[name] = permission
        self._changed()

    def add_role(self, name: str, raw_permission: bytes) -> Permission:
        """Create a role (see the AddRole contract)."""
        check_name("role", name)
        permission = parse_permission(raw_permission)
        if self.role(name) is not None:
            raise AlreadyExists(f"role {name!r} already exists")
        self._write_role(name, permission)
        log.info("added role %r", name)
        return permission

    def _custom_role(self, name: str, doing: str) -> None:
        check_name("role", name)
        if name in BUILT_IN_ROLES:
            raise InvalidArgument(f"the built-in role {name!r} cannot be {doing}")
        self._existing_role(name)

    def alter_role(self, name: str, raw_permission: bytes) -> Permission:
        """Replace a role's permission (see the AlterRole contract)."""
        self._custom_role(name, "altered")
        permission = parse_permission(raw_permission)
        self._keep_a_super_user(
            self.users(), f"changing role {name!r}", {**self._roles, name: permission}
        )
        self._write_role(name, permission)
        log.info("altered role %r", name)
        return permission

    def drop_role(self, name: str) -> None:
        """Delete a role no user has (see the DropRole contract)."""
        self._custom_role(name, "dropped")
        holders = [u.name for u in self.users() if u.role == name]
        if holders:
            raise FailedPrecondition(
                f"role {name!r} is still the role of {', '.join(map(repr, holders))}",
                reason="ROLE_IN_USE",
            )
        self._store.meta.delete(ROLE_PREFIX + name.encode(), self._store.write_options)
        del self._roles[name]
        self._changed()
        log.info("dropped role %r", name)

    # -- authentication ----------------------------------------------------------------

    def _digest(self, username: str, password: str) -> bytes:
        return hmac.new(
            self._cache_key, f"{username}\x00{password}".encode(), hashlib.sha256
        ).digest()

    async def authenticate(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        certificate_user: str | None = None,
    ) -> Identity:
        """Who is calling: the ``authorization`` header's user (or the node-internal
        identity, or the user it acts for), else the user the call's client certificate
        names (``storage.mtls``); Unauthenticated otherwise."""
        if certificate_user is not None and not has_authorization(metadata):
            return self.named_user(certificate_user, "the client certificate's common name")
        credentials = parse_authorization(metadata)
        on_behalf = acting_for(metadata)
        if isinstance(credentials, BearerToken):
            if hmac.compare_digest(credentials.token.encode(), self._node_secret.encode()):
                if on_behalf is not None:
                    return self.named_user(on_behalf, f"{ACTING_FOR_HEADER} of the admin service")
                return self._node_identity
            if on_behalf is None and looks_like_token(credentials.token):
                return self.token_user(credentials.token, OPERATION)
            raise Unauthenticated(_FAILED)
        if on_behalf is not None:
            raise Unauthenticated(
                f"{ACTING_FOR_HEADER} is only for this node's own services; sign in as the"
                " user instead"
            )
        assert isinstance(credentials, BasicCredentials)
        name = credentials.username
        source = source_key(self._source(metadata))
        self.throttle.check(name, source)  # before anything costs
        now = time.monotonic()
        digest = self._digest(name, credentials.password)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(digest)
            self.throttle.succeeded(name, source)
            return cached[1]
        pending = self._pending.get(digest)
        if pending is None:
            attempt = self.throttle.begin(name, source)
            pending = asyncio.ensure_future(
                self._verify(name, credentials.password, digest, attempt)
            )
            self._pending[digest] = pending
            pending.add_done_callback(lambda done: self._settled(digest, done))
        return await asyncio.shield(pending)

    def _source(self, metadata: Sequence[tuple[str, str | bytes]]) -> str:
        """Where a sign-in comes from: the address the node's admin service vouches for,
        else the call's own peer address."""
        forwarded = forwarded_source(metadata, self._node_secret)
        source = forwarded if forwarded is not None else source_text(current_peer.get())
        current_source.set(source)
        return source

    def named_user(self, name: str, named_by: str) -> UserIdentity:
        """The identity of the existing, active user ``name`` (named by a verified client
        certificate, or by the admin service acting for such a caller): no password is
        checked. Unauthenticated says why it cannot be used."""
        user = self.get(name) if name else None
        if user is None:
            raise Unauthenticated(
                f"no user {name!r} (named by {named_by}): add the user, or sign in with"
                " 'authorization: Basic <base64 user:password>'"
            )
        if not user.active:
            raise Unauthenticated(f"user {name!r} (named by {named_by}) is not active")
        permission = self.role(user.role)
        if permission is None:
            raise Unauthenticated(
                f"user {name!r} (named by {named_by}) has role {user.role!r}, which does not exist"
            )
        return UserIdentity(
            name=user.name, super_user=permission.super_user, role=user.role, permission=permission
        )

    # -- tokens (services/common/tokens.py) ---------------------------------------------

    def token_user(self, token: str, kind: str) -> UserIdentity:
        """The identity of a token of ``kind`` this node issued, while its user exists, is
        active, has a role and keeps the password it had; Unauthenticated otherwise."""
        claims = self.tokens.verify(token, kind)
        user = self.get(claims.username)
        permission = self.role(user.role) if user is not None else None
        if (
            user is None
            or not user.active
            or permission is None
            or not hmac.compare_digest(
                claims.password_digest, self.tokens.password_digest(user.password_hash)
            )
        ):
            raise Unauthenticated(INVALID, reason="INVALID_TOKEN")
        return UserIdentity(
            name=user.name, super_user=permission.super_user, role=user.role, permission=permission
        )

    def issue_tokens(self, who: Identity) -> tuple[str, str]:
        """(operation token, refresh token) for the user ``who`` (Harper's
        create_authentication_tokens)."""
        user = self.get(who.name) if isinstance(who, UserIdentity) else None
        if user is None:
            raise FailedPrecondition(
                f"{who.name} is not a user of this node: tokens are issued to users only"
            )
        return (
            self.tokens.issue(OPERATION, user.name, user.password_hash),
            self.tokens.issue(REFRESH, user.name, user.password_hash),
        )

    def refresh_token(self, refresh_token: str) -> str:
        """A new operation token for a refresh token (Harper's refresh_operation_token)."""
        who = self.token_user(refresh_token, REFRESH)
        user = self.get(who.name)
        assert user is not None
        return self.tokens.issue(OPERATION, user.name, user.password_hash)

    def _settled(self, digest: bytes, done: asyncio.Future[Identity]) -> None:
        if self._pending.get(digest) is done:
            del self._pending[digest]
        if not done.cancelled():
            done.exception()  # retrieved here: every waiter may have gone

    async def _verify(self, name: str, password: str, digest: bytes, attempt: Attempt) -> Identity:
        """Check a password with scrypt; ``attempt`` (counted in flight by the caller) ends
        here, as a failure, a success, or unchecked when no scrypt slot was free."""
        generation = self._generation
        failed: bool | None = None
        try:
            user = self.get(name)
            stored = user.password_hash if user is not None else _DUMMY_HASH
            ok = await self._slots.run(lambda: verify_password(password, stored))
            permission = self.role(user.role) if user is not None else None
            failed = user is None or not ok or not user.active or permission is None
        finally:
            self.throttle.ended(attempt, failed)
        if failed:
            raise Unauthenticated(_FAILED)
        assert user is not None and permission is not None
        now = time.monotonic()
        ident = UserIdentity(
            name=user.name,
            super_user=permission.super_user,
            role=user.role,
            permission=permission,
        )
        if generation == self._generation:
            self._cache[digest] = (now + CACHE_TTL_S, ident)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return ident
