"""Operation and refresh tokens (services/common/tokens.py) and the settings that shape
them and the HTTP port of the operations API."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from services.common.config import ConfigError, parse_config
from services.common.errors import Unauthenticated
from services.common.tokens import (
    EXPIRED,
    INVALID,
    OPERATION,
    REFRESH,
    TokenLifetimes,
    TokenSigner,
    looks_like_token,
)

SECRET = "node-secret"


def signer(name: str = "server-one", secret: str = SECRET) -> TokenSigner:
    return TokenSigner(secret, name, TokenLifetimes(operation_s=60, refresh_s=600))


def test_a_token_says_who_and_what_it_is_for() -> None:
    token = signer().issue(OPERATION, "ann", "scrypt$hash")
    assert looks_like_token(token)
    claims = signer().verify(token, OPERATION)
    assert (claims.username, claims.kind) == ("ann", OPERATION)
    assert claims.password_digest == signer().password_digest("scrypt$hash")
    assert claims.password_digest != signer().password_digest("scrypt$other")
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 60 and payload["sub"] == "operation"
    assert "scrypt$hash" not in str(payload)
    refresh = signer().issue(REFRESH, "ann", "h")
    refresh_payload = jwt.decode(refresh, options={"verify_signature": False})
    assert refresh_payload["exp"] - refresh_payload["iat"] == 600


@pytest.mark.parametrize(
    "token_of",
    [
        lambda: signer().issue(REFRESH, "ann", "h"),  # the other kind
        lambda: signer("server-two").issue(OPERATION, "ann", "h"),  # another node
        lambda: signer(secret="other").issue(OPERATION, "ann", "h"),  # another key
        lambda: jwt.encode({"username": "ann", "sub": "operation"}, "x" * 32, algorithm="HS256"),
        lambda: "not.a.token",
    ],
)
def test_what_is_not_this_nodes_operation_token_is_invalid(token_of: Any) -> None:
    with pytest.raises(Unauthenticated, match=f"^{INVALID}$"):
        signer().verify(token_of(), OPERATION)


def test_an_expired_token_says_so() -> None:
    old = TokenSigner(SECRET, "server-one", TokenLifetimes(operation_s=-10, refresh_s=600))
    with pytest.raises(Unauthenticated, match=f"^{EXPIRED}$"):
        signer().verify(old.issue(OPERATION, "ann", "h"), OPERATION)


def parse(data: dict[str, Any]) -> Any:
    return parse_config({"replication": {"hostname": "server-one"}, **data}, env={})


def test_settings_of_the_http_port_and_the_tokens() -> None:
    config = parse({})
    assert config.operations_api.http_port == 9924
    assert config.operations_api.http_timeout_s == 120.0
    assert config.authentication.operation_token_timeout_s == 86400.0
    assert config.authentication.refresh_token_timeout_s == 30 * 86400.0
    closed = parse({"operationsApi": {"network": {"httpPort": None, "timeout": "5s"}}})
    assert (closed.operations_api.http_port, closed.operations_api.http_timeout_s) == (None, 5.0)
    with pytest.raises(ConfigError) as error:
        parse(
            {
                "operationsApi": {"network": {"httpPort": 9926, "timeout": "0s"}},
                "authentication": {"operationTokenTimeout": "never"},
            }
        )
    text = "\n".join(error.value.problems)
    assert "operationsApi.network.httpPort: port 9926 is already used by storage.port" in text
    assert "operationsApi.network.timeout" in text
    assert "authentication.operationTokenTimeout" in text
