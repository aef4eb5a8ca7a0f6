"""ShoalInterceptor's call statistics on a real in-process gRPC server: every way a call
can end is recorded with the status the client saw."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.errors import NotFound
from services.common.interceptor import ShoalInterceptor
from services.common.metrics import MethodStats, RpcMetrics
from tests.harness.wait import wait_for

SERVICE = "test.Probe"


async def ok(request: bytes, context: Any) -> bytes:
    return request


async def missing(request: bytes, context: Any) -> bytes:
    raise NotFound("no such thing")


async def boom(request: bytes, context: Any) -> bytes:
    raise RuntimeError("boom")


async def aborts(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")
    raise AssertionError("abort returned")


async def forever(request: bytes, context: Any) -> bytes:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


async def endless(request: bytes, context: Any) -> AsyncIterator[bytes]:
    i = 0
    while True:
        yield str(i).encode()
        i += 1


@pytest.fixture
async def server() -> AsyncIterator[tuple[grpc.aio.Channel, RpcMetrics]]:
    metrics = RpcMetrics()
    server = grpc.aio.server(interceptors=[ShoalInterceptor(None, metrics)])
    unary: dict[str, Any] = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {
            "Ok": ok,
            "Missing": missing,
            "Boom": boom,
            "Aborts": aborts,
            "Forever": forever,
        }.items()
    }
    streams: dict[str, Any] = {
        name: grpc.unary_stream_rpc_method_handler(fn)
        for name, fn in {"Count": count, "Endless": endless}.items()
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {**unary, **streams})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, metrics
    finally:
        await channel.close()
        await server.stop(None)


def counts(stats: MethodStats) -> dict[str, int]:
    return {code.name: sum(c) for code, c, _ in stats.histograms()}


async def recorded(stats: MethodStats, expected: dict[str, int]) -> None:
    """Wait (off the loop, which keeps serving) until ``stats`` shows ``expected``."""

    def check() -> bool:
        return counts(stats) == expected

    await asyncio.to_thread(wait_for, check, 10, f"{expected} to be recorded")


async def call(channel: grpc.aio.Channel, method: str, deadline_s: float = 10) -> grpc.StatusCode:
    unary: Any = channel.unary_unary(f"/{SERVICE}/{method}")
    try:
        await unary(b"3", timeout=deadline_s)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_unary_calls_are_recorded_with_their_status(
    server: tuple[grpc.aio.Channel, RpcMetrics],
) -> None:
    channel, metrics = server
    assert await call(channel, "Ok") == grpc.StatusCode.OK
    assert await call(channel, "Ok") == grpc.StatusCode.OK
    assert await call(channel, "Missing") == grpc.StatusCode.NOT_FOUND
    assert await call(channel, "Boom") == grpc.StatusCode.INTERNAL
    # Returned calls and raised errors are recorded before the client hears of them.
    assert counts(metrics.method(f"/{SERVICE}/Ok")) == {"OK": 2}
    assert counts(metrics.method(f"/{SERVICE}/Missing")) == {"NOT_FOUND": 1}
    assert counts(metrics.method(f"/{SERVICE}/Boom")) == {"INTERNAL": 1}
    assert metrics.method(f"/{SERVICE}/Ok").started == 2

    assert await call(channel, "Aborts") == grpc.StatusCode.PERMISSION_DENIED
    await recorded(metrics.method(f"/{SERVICE}/Aborts"), {"PERMISSION_DENIED": 1})
    assert await call(channel, "Forever", deadline_s=0.3) == grpc.StatusCode.DEADLINE_EXCEEDED
    await recorded(metrics.method(f"/{SERVICE}/Forever"), {"DEADLINE_EXCEEDED": 1})


async def test_streams_are_recorded_when_they_end(
    server: tuple[grpc.aio.Channel, RpcMetrics],
) -> None:
    channel, metrics = server
    counter: Any = channel.unary_stream(f"/{SERVICE}/Count")
    items = [m async for m in counter(b"3")]
    assert items == [b"0", b"1", b"2"]
    assert counts(metrics.method(f"/{SERVICE}/Count")) == {"OK": 1}

    endless_stream: Any = channel.unary_stream(f"/{SERVICE}/Endless")
    stream = endless_stream(b"")
    async for _ in stream:
        break
    stream.cancel()
    await recorded(metrics.method(f"/{SERVICE}/Endless"), {"CANCELLED": 1})
    assert metrics.method(f"/{SERVICE}/Endless").started == 1
