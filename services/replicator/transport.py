"""The gRPC implementation of a ``Peer`` (peer.py): the two ends of a Replicate stream.

Each end sends and receives ``PeerMessage``s; ``recv`` returns None when the peer closed
its side. Transport failures raise ``ConnectionLost``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc

from services.common.grpcserver import channel_options
from services.common.tls import TlsMaterial, mutual_channel_credentials
from services.replicator.peer import ConnectionLost


class DialedStream:
    """The dialer's end: a client call on its own channel."""

    def __init__(self, channel: grpc.aio.Channel, call: Any, address: str) -> None:
        self._channel = channel
        self._call = call
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def send(self, message: rpb.PeerMessage) -> None:
        try:
            await self._call.write(rpb.ReplicateRequest(message=message))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
            raise ConnectionLost(str(exc)) from exc

    async def recv(self) -> rpb.PeerMessage | None:
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise ConnectionLost(exc.details() or str(exc.code())) from exc
        if reply is grpc.aio.EOF:
            return None
        message: rpb.PeerMessage = reply.message
        return message

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close()


class AcceptedStream:
    """The listener's end: the servicer context of the Replicate call."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], address: str) -> None:
        self._context = context
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    async def send(self, message: rpb.PeerMessage) -> None:
        try:
            await self._context.write(rpb.ReplicateResponse(message=message))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError) as exc:
            raise ConnectionLost(str(exc)) from exc

    async def recv(self) -> rpb.PeerMessage | None:
        try:
            request = await self._context.read()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError) as exc:
            raise ConnectionLost(str(exc)) from exc
        if request is grpc.aio.EOF:
            return None
        message: rpb.PeerMessage = request.message
        return message

    async def close(self) -> None:
        """The servicer ends the call by returning; nothing to do here."""


async def dial(
    address: str, tls: TlsMaterial | None, timeout_s: float, max_message_bytes: int
) -> DialedStream:
    """Open a Replicate stream to a peer; raises ConnectionLost if it cannot connect."""
    options = channel_options(max_message_bytes)
    if tls is not None:
        channel = grpc.aio.secure_channel(address, mutual_channel_credentials(tls), options=options)
    else:
        channel = grpc.aio.insecure_channel(address, options=options)
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=timeout_s)
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        await channel.close()
        raise ConnectionLost(f"cannot connect to {address}") from exc
    stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
    return DialedStream(channel, stub.Replicate(), address)
