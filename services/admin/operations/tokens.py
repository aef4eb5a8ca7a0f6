"""Harper's token operations: ``create_authentication_tokens`` and
``refresh_operation_token``. Storage issues and checks the tokens
(services/common/tokens.py); these forward what the caller gives."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.storage.v1 import storage_pb2 as spb

from services.admin.operations.body import Body, Json
from services.admin.operations.execute import Execute
from services.common.auth import basic_metadata
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.sources import current_peer, forwarded_for_metadata, source_text


@dataclass(frozen=True)
class Credentials:
    """``username`` and ``password`` of the body (None: the caller's own)."""

    username: str | None
    password: str | None


def parse_create_authentication_tokens(body: Body) -> Credentials:
    username = body.text("username", required=False) or None
    password = body.text("password", required=False) or None
    if (username is None) != (password is None):
        raise InvalidArgument(
            f"{body.operation}: 'username' and 'password' go together (or send neither, to"
            " get tokens for the caller)"
        )
    return Credentials(username, password)


async def create_authentication_tokens(ex: Execute, credentials: Credentials) -> Json:
    """Tokens for the body's user (its password checked by storage, as a sign-in from the
    caller's address), else for the caller."""
    if credentials.username is not None and credentials.password is not None:
        source = source_text(current_peer.get())
        metadata = (
            *basic_metadata(credentials.username, credentials.password),
            *forwarded_for_metadata(ex.node.secret, source),
        )
    elif ex.caller.metadata:
        metadata = ex.caller.metadata
    else:
        raise Unauthenticated("Must login")
    reply = await ex.node.call(
        ex.node.storage.CreateAuthenticationTokens,
        spb.CreateAuthenticationTokensRequest(),
        metadata,
    )
    return {"operation_token": reply.operation_token, "refresh_token": reply.refresh_token}


def parse_refresh_operation_token(body: Body) -> str:
    return body.text("refresh_token", required=False)


def bearer_token(ex: Execute) -> str:
    """The caller's ``Authorization: Bearer`` credential, or ""."""
    for key, value in ex.caller.metadata:
        scheme, _, rest = value.strip().partition(" ")
        if key.lower() == "authorization" and scheme.lower() == "bearer":
            return rest.strip()
    return ""


async def refresh_operation_token(ex: Execute, refresh_token: str) -> Json:
    """A new operation token for the refresh token of the body, else of the caller's
    ``Authorization: Bearer`` (Harper's form); storage checks it."""
    token = refresh_token or bearer_token(ex)
    if not token:
        raise Unauthenticated("Must login")
    reply = await ex.node.call(
        ex.node.storage_node.RefreshOperationToken,
        spb.RefreshOperationTokenRequest(refresh_token=token),
        ex.node.internal,
    )
    return {"operation_token": reply.operation_token}
