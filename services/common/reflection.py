"""gRPC server reflection, as ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection (pinned with grpcio) implements only v1alpha, while newer clients
(grpcurl, Postman, grpc-java's and grpc-go's tools) ask for v1 first. The two protocols
are the same messages under another package name (grpc/reflection/v1/reflection.proto is
a copy of v1alpha's with its package renamed), so one servicer answers both: the v1
method decodes and encodes its messages with the v1alpha classes, which read and write
the same bytes.

So that reflection describes itself under both names, the v1 file is added to the
default descriptor pool: v1alpha's file descriptor with its package renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = ".grpc.reflection.v1alpha."
_V1_PACKAGE = ".grpc.reflection.v1."


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's reflection.proto under v1's file and package names and options."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = _V1_FILE
    file.package = "grpc.reflection.v1"
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in file.message_type:
        for field in message.field:
            if field.type_name.startswith(_V1ALPHA_PACKAGE):
                field.type_name = _V1_PACKAGE + field.type_name.removeprefix(_V1ALPHA_PACKAGE)
    for service in file.service:
        for method in service.method:
            method.input_type = _V1_PACKAGE + method.input_type.removeprefix(_V1ALPHA_PACKAGE)
            method.output_type = _V1_PACKAGE + method.output_type.removeprefix(_V1ALPHA_PACKAGE)
    return file


def _register_v1_file() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) on ``server``, listing ``service_names``, health
    and reflection itself."""
    _register_v1_file()
    names = [*service_names, health.SERVICE_NAME, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    servicer: Any = reflection.aio.ReflectionServicer(names)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": method})
            for name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
        ]
    )
