"""Reflection answers as grpc.reflection.v1 (what current clients ask for first) and as
v1alpha, and describes Shoal's services and itself under both names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from shoal.storage.v1 import storage_pb2

from services.common.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME, enable_reflection

STORAGE = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    enable_reflection([STORAGE], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def _messages(version: str) -> tuple[Any, Any]:
    """The request and response classes of ``grpc.reflection.<version>``, from the
    descriptor pool (a client built from that version's proto)."""
    pool = descriptor_pool.Default()
    return tuple(  # type: ignore[return-value]
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"grpc.reflection.{version}.{name}")
        )
        for name in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


async def _ask(channel: grpc.aio.Channel, version: str, **request: str) -> Any:
    request_class, response_class = _messages(version)
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    responses = [r async for r in call(iter([request_class(**request)]), timeout=5)]
    assert len(responses) == 1
    return responses[0]


def _described(response: Any) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    return {file.name: file for file in files}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_and_describes_in_both_versions(
    channel: grpc.aio.Channel, version: str
) -> None:
    listed = await _ask(channel, version, list_services="")
    names = {service.name for service in listed.list_services_response.service}
    assert names == {STORAGE, "grpc.health.v1.Health", V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME}

    described = _described(await _ask(channel, version, file_containing_symbol=STORAGE))
    storage = described["shoal/storage/v1/storage.proto"]
    assert "StorageService" in [service.name for service in storage.service]
    assert "shoal/storage/v1/types.proto" in described  # dependencies come along

    missing = await _ask(channel, version, file_containing_symbol="shoal.NoSuchService")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_v1_describes_itself_under_its_own_package(channel: grpc.aio.Channel) -> None:
    described = _described(await _ask(channel, "v1", file_containing_symbol=V1_SERVICE_NAME))
    file = described["grpc/reflection/v1/reflection.proto"]
    assert file.package == "grpc.reflection.v1"
    [service] = file.service
    [method] = service.method
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )
    assert method.client_streaming and method.server_streaming
    referenced = {f.type_name for m in file.message_type for f in m.field if f.type_name}
    assert referenced and all(name.startswith(".grpc.reflection.v1.") for name in referenced)
