"""The storage service end to end: a real process, real RocksDB, real gRPC."""

from __future__ import annotations

import grpc
import pytest

from tests.harness.client import StorageClient


def test_insert_then_read_back(client: StorageClient) -> None:
    client.create_table("dev", "dog", indexed=["breed"])
    reply = client.insert(
        "dev",
        "dog",
        [{"id": 1, "name": "Penny", "breed": "pug"}, {"id": 2, "name": "Kato", "breed": "lab"}],
    )
    assert list(reply.inserted_ids) == [b"1", b"2"]
    assert reply.version > 0
    assert client.get("dev", "dog", [2, 1, 3]) == [
        {"id": 2, "name": "Kato", "breed": "lab"},
        {"id": 1, "name": "Penny", "breed": "pug"},
    ]
    assert client.by_value("dev", "dog", "breed", "pug") == [
        {"id": 1, "name": "Penny", "breed": "pug"}
    ]


def test_unknown_table_is_not_found(client: StorageClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.get("dev", "nope", [1])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Database 'dev' does not exist" in (err.value.details() or "")
