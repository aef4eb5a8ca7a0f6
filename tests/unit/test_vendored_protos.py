"""The third-party protos shipped in protos/ describe what Shoal's servers speak: the
google/rpc files are the pinned googleapis-common-protos's own, and grpc/health/v1 has
the messages and methods of the pinned grpcio-health-checking."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import google.rpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

PROTOS = Path(__file__).resolve().parents[2] / "protos"


@pytest.mark.parametrize("name", ["status.proto", "error_details.proto", "code.proto"])
def test_google_rpc_files_are_the_pinned_package_s(name: str) -> None:
    shipped = Path(next(iter(google.rpc.__path__))) / name
    assert (PROTOS / "google" / "rpc" / name).read_bytes() == shipped.read_bytes()


def _compiled(path: str) -> descriptor_pb2.FileDescriptorProto:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}"]
        subprocess.run([*protoc, f"--descriptor_set_out={out}", path], check=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    [compiled] = files.file
    for message in compiled.message_type:
        _drop_json_names(message)
    return compiled


def _drop_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    """protoc records each field's JSON name; the Python package's descriptor does not."""
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)


def test_health_proto_matches_the_served_service() -> None:
    vendored = _compiled("grpc/health/v1/health.proto")
    served = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(served)
    # The Python package registers its copy as grpc_health/v1/health.proto: the names
    # of files differ, the package, messages and methods may not.
    assert vendored.package == served.package
    assert _by_name(vendored.message_type) == _by_name(served.message_type)
    assert [service.name for service in vendored.service] == ["Health"]
    assert [service.name for service in served.service] == ["Health"]
    assert _by_name(vendored.service[0].method) == _by_name(served.service[0].method)


def _by_name(items: Iterable[Any]) -> dict[str, str]:
    """Each message or method as text, by name (the files order them differently)."""
    return {item.name: str(item) for item in items}
