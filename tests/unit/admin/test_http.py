"""The HTTP listener of the operations API in process, with a stand-in for Execute: its
status codes, its limits (time, concurrency) and who it says is calling."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
import pytest
from shoal.admin.v1 import admin_pb2 as apb

from services.admin.http import STATUS, OperationsHttp, http_status
from services.admin.node import Caller
from services.common.auth import Identity
from services.common.config import parse_config
from services.common.errors import Unauthenticated


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class FakeNode:
    config: Any
    secret: str = "secret"


class FakeAuthenticator:
    async def authenticate(self, metadata: Any, certificate_user: str | None = None) -> Identity:
        if dict(metadata).get("authorization") != "Basic good":
            raise Unauthenticated("Login failed")
        return Identity(name="admin", super_user=True)


class Served:
    def __init__(self, delay: float = 0.0, code: int = 0) -> None:
        self.delay, self.code = delay, code
        self.callers: list[Caller] = []

    async def __call__(self, caller: Caller, body: bytes, left: float | None) -> Any:
        self.callers.append(caller)
        await asyncio.sleep(self.delay)
        answer = {"echo": orjson.loads(body)} if self.code == 0 else {"error": "no"}
        return apb.ExecuteResponse(result=orjson.dumps(answer), code=self.code)


@pytest.fixture
async def listener(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Served]]:
    served: Served = getattr(request, "param", Served())
    config = parse_config(
        {
            "replication": {"hostname": "server-one"},
            "operationsApi": {
                "network": {"httpPort": free_port(), "timeout": "1s"},
                "maxConcurrentRpcs": 1,
            },
        },
        env={},
    )
    config = replace(config, host="127.0.0.1")
    http = OperationsHttp(FakeNode(config), served, FakeAuthenticator(), None, None)  # type: ignore[arg-type]
    await http.start()
    try:
        yield f"http://127.0.0.1:{config.operations_api.http_port}/", served
    finally:
        await http.stop()


async def post(url: str, body: Any, authorization: str | None = "Basic good") -> tuple[int, Any]:
    headers = {"Authorization": authorization} if authorization else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=orjson.dumps(body), headers=headers) as response,
    ):
        return response.status, orjson.loads(await response.read())


def test_every_code_has_harpers_status() -> None:
    assert [http_status(c) for c in (0, 3, 5, 6, 7, 16)] == [200, 400, 404, 409, 403, 401]
    assert set(STATUS) == set(range(17)) and http_status(99) == 500


async def test_the_answer_is_executes_and_the_caller_is_authenticated(
    listener: tuple[str, Served],
) -> None:
    url, served = listener
    assert await post(url, {"operation": "x"}) == (200, {"echo": {"operation": "x"}})
    assert served.callers[0].identity.name == "admin"
    assert ("authorization", "Basic good") in served.callers[0].metadata
    assert await post(url, {"operation": "x"}, "Basic bad") == (401, {"error": "Login failed"})
    assert await post(url, {"operation": "x"}, None) == (401, {"error": "Must login"})
    # The token operations run without credentials; storage checks what they carry.
    status, _ = await post(url, {"operation": "create_authentication_tokens"}, None)
    assert status == 200 and served.callers[-1].identity.name == ""
    status, _ = await post(url, {"operation": "refresh_operation_token"}, "Bearer a.b.c")
    assert status == 200 and served.callers[-1].metadata[0] == ("authorization", "Bearer a.b.c")


@pytest.mark.parametrize("listener", [Served(code=5)], indirect=True)
async def test_an_error_answer_keeps_its_body(listener: tuple[str, Served]) -> None:
    url, _ = listener
    assert await post(url, {"operation": "x"}) == (404, {"error": "no"})


@pytest.mark.parametrize("listener", [Served(delay=3.0)], indirect=True)
async def test_time_and_concurrency_are_bounded(listener: tuple[str, Served]) -> None:
    url, _ = listener
    slow = asyncio.create_task(post(url, {"operation": "x"}))
    await asyncio.sleep(0.3)
    status, body = await post(url, {"operation": "x"})
    assert status == 429 and "maxConcurrentRpcs" in body["error"]
    status, body = await slow
    assert status == 504 and "operationsApi.network.timeout" in body["error"]
