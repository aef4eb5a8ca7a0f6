"""Hostile input for tests: JSON nested to a chosen depth, integers beyond 64 bits,
protobuf messages with invalid UTF-8, and a table digest to show a refusal changed
nothing."""

from __future__ import annotations

import json
from typing import Any

import grpc

from tests.harness.cluster import Cluster
from tests.harness.node import Node


def nested(depth: int, inner: bytes = b"1") -> bytes:
    """A JSON value nesting ``depth`` levels of arrays and objects around ``inner``
    (objects on even levels), written by hand: orjson refuses to write it beyond 254."""
    head = b"".join(b'{"k":' if level % 2 else b"[" for level in range(depth))
    tail = b"".join(b"}" if level % 2 else b"]" for level in reversed(range(depth)))
    return head + inner + tail


def record(pk: Any, depth: int, name: str = "id") -> bytes:
    """A JSON record of ``depth`` levels (the record itself is the first)."""
    assert depth >= 1
    return b'{"%s":%s,"v":%s}' % (name.encode(), json.dumps(pk).encode(), nested(depth - 1))


def digest(node: Node, database: str) -> str:
    """SHA-256 of a database's schema and every row with its versions (Snapshot)."""
    return Cluster.digest(node, [database])


def with_bad_utf8(message: bytes, field_number: int) -> bytes:
    """A serialized message with a string field ``field_number`` appended holding bytes
    that are not UTF-8 (a later field wins in protobuf, so it replaces the field)."""
    value = b"\xff\xfe\xc0"
    return message + bytes([field_number << 3 | 2, len(value)]) + value


def raw_unary(node: Node, method: str, payload: bytes, metadata: Any) -> grpc.RpcError | None:
    """Send ``payload`` as the serialized request of a unary storage ``method``; the
    error it ends with (None when it succeeds)."""
    with node.channel("storage") as channel:
        call: Any = channel.unary_unary(f"/shoal.storage.v1.StorageService/{method}")
        try:
            call(payload, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None


def raw_stream(node: Node, method: str, payload: bytes, metadata: Any) -> grpc.RpcError | None:
    """As ``raw_unary``, for a server-streaming ``method`` (its answers are drained)."""
    with node.channel("storage") as channel:
        call: Any = channel.unary_stream(f"/shoal.storage.v1.StorageService/{method}")
        try:
            list(call(payload, metadata=metadata, timeout=10))
        except grpc.RpcError as exc:
            return exc
    return None


def raw_client_stream(
    node: Node, method: str, payloads: list[bytes], metadata: Any
) -> grpc.RpcError | None:
    """As ``raw_unary``, for a client-streaming ``method``."""
    with node.channel("storage") as channel:
        call: Any = channel.stream_unary(f"/shoal.storage.v1.StorageService/{method}")
        try:
            call(iter(payloads), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None
