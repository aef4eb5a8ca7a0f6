"""Harper's authentication tokens: an operation token (``Authorization: Bearer``) and a
refresh token that only buys new operation tokens.

Both are JSON Web Tokens (HS256, PyJWT) signed by the node whose storage issued them,
with a key derived from the node secret (``keys/node.secret``): users are per node and
never replicated, so a token is valid on the node that issued it only (``iss`` is the
node's name, checked too). The claims are Harper's (``username``, ``sub`` = ``operation``
or ``refresh``, ``iat``, ``exp``) plus ``pwd``, a keyed digest of the user's stored
password hash: storage checks at every use that the user still exists, is active, has a
role, and has the same password hash, so dropping a user, deactivating it or changing its
password ends its tokens at once. Changing the node secret ends every token of the node.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

import jwt

from services.common.config.model import AuthenticationConfig
from services.common.errors import Unauthenticated

ALGORITHM = "HS256"
OPERATION = "operation"
REFRESH = "refresh"
INVALID = "invalid token"  # Harper's texts
EXPIRED = "token expired"


@dataclass(frozen=True)
class TokenLifetimes:
    """``authentication.operationTokenTimeout`` / ``refreshTokenTimeout``, in seconds
    (their defaults are the config's)."""

    operation_s: float
    refresh_s: float

    @classmethod
    def of(cls, authentication: AuthenticationConfig) -> TokenLifetimes:
        return cls(authentication.operation_token_timeout_s, authentication.refresh_token_timeout_s)


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says."""

    username: str
    kind: str
    password_digest: str


def looks_like_token(text: str) -> bool:
    """Whether a bearer credential has a JSON Web Token's form (three dotted parts)."""
    return text.count(".") == 2


class TokenSigner:
    """Issues and verifies the tokens of one node."""

    def __init__(self, node_secret: str, node_name: str, lifetimes: TokenLifetimes) -> None:
        self._key = hmac.new(node_secret.encode(), b"shoal operation tokens v1", "sha256").digest()
        self.node_name = node_name
        self.lifetimes = lifetimes

    def password_digest(self, password_hash: str) -> str:
        """A keyed digest of a stored password hash (it reveals nothing of the hash)."""
        mac = hmac.new(self._key, b"password\x00" + password_hash.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()[:16]).decode().rstrip("=")

    def issue(self, kind: str, username: str, password_hash: str) -> str:
        now = int(time.time())
        lifetime = self.lifetimes.operation_s if kind == OPERATION else self.lifetimes.refresh_s
        claims = {
            "username": username,
            "sub": kind,
            "iat": now,
            "exp": now + int(lifetime),
            "iss": self.node_name,
            "pwd": self.password_digest(password_hash),
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str, kind: str) -> TokenClaims:
        """The claims of a token of ``kind`` signed by this node; Unauthenticated with
        Harper's text otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                issuer=self.node_name,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated(EXPIRED, reason="TOKEN_EXPIRED") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(INVALID, reason="INVALID_TOKEN") from exc
        username, digest = claims.get("username"), claims.get("pwd")
        if claims.get("sub") != kind or not isinstance(username, str) or not username:
            raise Unauthenticated(INVALID, reason="INVALID_TOKEN")
        if not isinstance(digest, str):
            raise Unauthenticated(INVALID, reason="INVALID_TOKEN")
        return TokenClaims(username, kind, digest)
