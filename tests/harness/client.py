"""A small synchronous storage client for tests: real gRPC, JSON in and out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import orjson
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services.common import errors
from services.common.auth import basic_metadata, bearer_metadata
from services.common.grpcserver import channel_options

COMPARATORS = {
    name.removeprefix("COMPARATOR_").lower(): value for name, value in pb.Comparator.items()
}


def cond(attribute: str, comparator: str, value: Any) -> pb.Condition:
    """A comparison condition, e.g. ``cond("age", "greater_than", 3)``."""
    return pb.Condition(
        comparison=pb.Comparison(
            attribute=attribute, comparator=COMPARATORS[comparator], value=orjson.dumps(value)
        )
    )


def group(operator: str, *conditions: pb.Condition) -> pb.Condition:
    """A nested group of conditions."""
    op = pb.LOGICAL_OPERATOR_OR if operator == "or" else pb.LOGICAL_OPERATOR_AND
    return pb.Condition(group=pb.ConditionGroup(operator=op, conditions=conditions))


def ids(values: Iterable[Any]) -> list[bytes]:
    return [orjson.dumps(v) for v in values]


def loads(values: Iterable[bytes]) -> list[Any]:
    return [orjson.loads(v) for v in values]


def error_info(error: grpc.RpcError) -> Any:
    """The error's ``google.rpc.ErrorInfo``; fails the test when it carries none."""
    info = errors.error_info(error)
    assert info is not None, f"the error carries no ErrorInfo: {error!r}"
    return info


def expect_error(code: grpc.StatusCode, call: Callable[[], Any], *words: str) -> grpc.RpcError:
    """Run ``call``: it must fail with ``code`` and a message holding every word (any case).

    Streaming results are drained, so errors raised mid-stream count too.
    """
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as exc:
        message = exc.details() or ""
        assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {message}"
        for word in words:
            assert word.lower() in message.lower(), f"{word!r} is not in the message {message!r}"
        return exc
    raise AssertionError(f"expected {code.name}, but the call succeeded")


class StorageClient:
    """Calls to one storage service with fixed credentials, on ``channel`` (a TLS channel
    from ``Node.channel`` when the port serves TLS) or a plaintext one to ``address``."""

    def __init__(
        self,
        address: str,
        metadata: Sequence[tuple[str, str]],
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.channel = channel or grpc.insecure_channel(address, options=channel_options())
        self.stub = storage_pb2_grpc.StorageServiceStub(self.channel)
        # The node-internal RPCs (served on the node-local socket only).
        self.node_stub = storage_pb2_grpc.StorageNodeServiceStub(self.channel)
        self.metadata = tuple(metadata)

    @classmethod
    def basic(
        cls, address: str, username: str, password: str, channel: grpc.Channel | None = None
    ) -> StorageClient:
        return cls(address, basic_metadata(username, password), channel)

    @classmethod
    def bearer(cls, address: str, token: str, channel: grpc.Channel | None = None) -> StorageClient:
        return cls(address, bearer_metadata(token), channel)

    def close(self) -> None:
        self.channel.close()

    def _method(self, method: str) -> Any:
        """A StorageService method, or else a StorageNodeService one."""
        found = getattr(self.stub, method, None)
        return found if found is not None else getattr(self.node_stub, method)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        return self._method(method)(request, metadata=self.metadata, timeout=timeout)

    def stream(self, method: str, request: Any, timeout: float = 60.0) -> list[Any]:
        return list(self._method(method)(request, metadata=self.metadata, timeout=timeout))

    def expect(
        self, code: grpc.StatusCode, method: str, request: Any, *words: str
    ) -> grpc.RpcError:
        """Call ``method`` (unary or streaming): it must fail as ``expect_error`` says."""
        return expect_error(code, lambda: self.call(method, request), *words)

    # -- conveniences ----------------------------------------------------------------

    def create_table(
        self,
        database: str,
        table: str,
        primary_key: str = "",
        indexed: Sequence[str] = (),
        replicate: bool | None = None,
    ) -> pb.TableInfo:
        request = pb.CreateTableRequest(
            database=database, table=table, primary_key=primary_key, indexed_attributes=indexed
        )
        if replicate is not None:
            request.replicate = replicate
        return self.call("CreateTable", request).table

    def insert(
        self, database: str, table: str, records: Sequence[dict[str, Any]]
    ) -> pb.InsertResponse:
        return self.call(
            "Insert",
            pb.InsertRequest(
                database=database, table=table, records=[orjson.dumps(r) for r in records]
            ),
        )

    def update(
        self, database: str, table: str, records: Sequence[dict[str, Any]]
    ) -> pb.UpdateResponse:
        return self.call(
            "Update",
            pb.UpdateRequest(
                database=database, table=table, records=[orjson.dumps(r) for r in records]
            ),
        )

    def upsert(
        self, database: str, table: str, records: Sequence[dict[str, Any]]
    ) -> pb.UpsertResponse:
        return self.call(
            "Upsert",
            pb.UpsertRequest(
                database=database, table=table, records=[orjson.dumps(r) for r in records]
            ),
        )

    def delete(self, database: str, table: str, keys: Sequence[Any]) -> pb.DeleteResponse:
        return self.call("Delete", pb.DeleteRequest(database=database, table=table, ids=ids(keys)))

    def get(
        self, database: str, table: str, keys: Sequence[Any], attributes: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        chunks = self.stream(
            "SearchById",
            pb.SearchByIdRequest(
                database=database, table=table, ids=ids(keys), get_attributes=attributes
            ),
        )
        return [orjson.loads(r) for c in chunks for r in c.records]

    def by_value(
        self, database: str, table: str, attribute: str, value: Any, **kwargs: Any
    ) -> list[dict[str, Any]]:
        sort = [pb.SortKey(attribute=a, descending=d) for a, d in kwargs.pop("sort", [])]
        chunks = self.stream(
            "SearchByValue",
            pb.SearchByValueRequest(
                database=database,
                table=table,
                attribute=attribute,
                value=orjson.dumps(value),
                sort=sort,
                **kwargs,
            ),
        )
        return [orjson.loads(r) for c in chunks for r in c.records]

    def by_conditions(
        self,
        database: str,
        table: str,
        conditions: Sequence[pb.Condition],
        operator: str = "and",
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        sort = [pb.SortKey(attribute=a, descending=d) for a, d in kwargs.pop("sort", [])]
        op = pb.LOGICAL_OPERATOR_OR if operator == "or" else pb.LOGICAL_OPERATOR_AND
        chunks = self.stream(
            "SearchByConditions",
            pb.SearchByConditionsRequest(
                database=database,
                table=table,
                operator=op,
                conditions=conditions,
                sort=sort,
                **kwargs,
            ),
        )
        return [orjson.loads(r) for c in chunks for r in c.records]

    def all_records(
        self, database: str, table: str, primary_key: str = "id"
    ) -> list[dict[str, Any]]:
        return self.by_value(database, table, primary_key, "*")

    def describe(self, database: str, table: str) -> pb.TableInfo:
        return self.call(
            "DescribeTable", pb.DescribeTableRequest(database=database, table=table)
        ).table

    def transactions(self, database: str, table: str = "") -> list[types_pb2.Transaction]:
        chunks = self.stream(
            "ReadTransactionLog", pb.ReadTransactionLogRequest(database=database, table=table)
        )
        return [t for c in chunks for t in c.transactions]
