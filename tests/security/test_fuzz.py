"""A fuzz suite against one real node (storage and admin): every client RPC of storage,
and Execute's JSON, driven with generated hostile input.

Requests are built from the protobuf descriptors (so a new field is fuzzed without
touching this file): names that exist mixed with names of any length and alphabet, JSON
nested past every limit, integers past 64 bits, invalid JSON, unknown enum values,
out-of-range numbers and timestamps, CSV streams of any shape, condition groups nested
past protobuf's own limit, and serialized requests with bytes flipped, cut or inserted.
After every call:

* the call ended OK or with a deliberate Shoal error (an ErrorInfo in its status), never
  INTERNAL or UNKNOWN;
* the service still reports SERVING;
* when the call was refused, the fuzzed database's digest is what it was before it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as pb

from services.common import errors
from tests.harness.hostile import digest, nested
from tests.harness.node import Node

pytestmark = pytest.mark.xdist_group("fuzz")

DATABASE, TABLE = "fz", "t"
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# RPCs only the node's own services may call (replication, copies, backups): not client
# RPCs, so not fuzzed here.
NODE_INTERNAL = {
    "Subscribe",
    "Apply",
    "Snapshot",
    "MergeSnapshot",
    "ReadResident",
    "GetPositions",
    "RecordAnalytics",
    "Backup",
    "Restore",
}
SERVICE = pb.DESCRIPTOR.services_by_name["StorageService"]
METHODS = {m.name: m for m in SERVICE.methods if m.name not in NODE_INTERNAL}
UNARY_REQUESTS = sorted(n for n, m in METHODS.items() if not m.client_streaming)
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# -- values ------------------------------------------------------------------------------

KNOWN_NAMES = [DATABASE, TABLE, "v", "id", "nobody", "super_user", "*", "system", "hdb_nodes"]
names = (
    st.sampled_from(KNOWN_NAMES)
    | st.text(max_size=40)
    | st.integers(240, 20_000).map(lambda n: "x" * n)
    | st.sampled_from(["", " ", "-x", "a.b", "é", "\x00", "a" * 250, "a" * 251])
)
EDGE_INTEGERS = [2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, -(2**63) - 1]
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from(EDGE_INTEGERS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


def _dumps(value: Any) -> bytes:
    """JSON text of any value (integers of any size), as a client in another language
    could write it."""
    return json.dumps(value).encode()


records = st.builds(
    lambda pk, attrs: _dumps({"id": pk, **attrs}),
    json_scalars | st.sampled_from([1, 2, 3, "a"]),
    st.dictionaries(st.sampled_from(["v", "w", "id", "x" * 300]), json_values, max_size=3),
)
json_payloads = (
    records
    | json_values.map(_dumps)
    | st.integers(0, 1100).map(nested)
    | st.integers(0, 300).map(lambda n: b'{"id":9,"v":' + nested(n) + b"}")
    | st.integers(19, 5000).map(lambda n: b"1" + b"0" * n)
    | st.binary(max_size=40)
    | st.sampled_from([b"", b"NaN", b"1e400", b'"\\ud800"', b"\xff", b'"*"', b'"a*"', b"[1,2]"])
)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, 1, -1, 2**31, 2**32, 2**53 + 1) if low <= v <= high]
    return st.sampled_from(edges) | st.integers(low, high)


SCALAR_FIELDS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: names,
    FieldDescriptor.TYPE_BYTES: json_payloads,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_ENUM: st.integers(-3, 20),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_INT32: _integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: _integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: _integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: _integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: _integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: _integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: _integers(0, 2**64 - 1),
}


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor`` with hostile values in any subset of its fields."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            kind = field.message_type
            if depth >= 3 or kind is None:
                continue
            count = draw(st.integers(0, 3)) if field.is_repeated else 1
            items = [draw(messages(kind, depth + 1)) for _ in range(count)]
            if field.is_repeated:
                getattr(message, field.name).extend(items)
            elif items:
                getattr(message, field.name).CopyFrom(items[0])
            continue
        values = SCALAR_FIELDS[field.type]
        try:
            if field.is_repeated:
                getattr(message, field.name).extend(draw(st.lists(values, max_size=3)))
            else:
                setattr(message, field.name, draw(values))
        except (ValueError, TypeError):
            pass  # a value this field cannot hold at all (protobuf refuses it locally)
    return message


def mutated(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with a few bytes flipped, cut or inserted."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "cut", "insert"]))
            at = draw(st.integers(0, len(out)))
            if kind == "flip" and at < len(out):
                out[at] ^= draw(st.integers(1, 255))
            elif kind == "cut":
                del out[at:]
            else:
                out[at:at] = draw(st.binary(min_size=1, max_size=4))
        return bytes(out)

    return mutate()


csv_cells = (
    st.sampled_from(["1", "true", "x", "", '"a,b"', "18446744073709551616", "1e400", "[1,2"])
    | st.text(alphabet='ab,"\n\r1{[', max_size=12)
    | st.integers(0, 300).map(lambda n: '"' + nested(n).decode().replace('"', '""') + '"')
    | st.integers(128 * 1024 - 2, 128 * 1024 + 2).map(lambda n: "y" * n)
)


@st.composite
def csv_streams(draw: st.DrawFn) -> list[pb.LoadCsvRequest]:
    """A LoadCsv stream: usually a header then chunks of a CSV whose rows have distinct
    ids (so nothing commits before the stream ends), sometimes a malformed one."""
    columns = draw(st.sampled_from(["id,v", "id", "v", "id,id", "", "id,v,w"]))
    rows = [
        f"{i},{draw(csv_cells)}"
        for i in draw(st.lists(st.integers(100, 999), unique=True, max_size=4))
    ]
    data = (columns + "\n" + "\n".join(rows)).encode()
    if draw(st.booleans()):
        data = draw(mutated(data))
    # Chunks split rows anywhere; tiny chunks only for small files (each message is
    # one more round of parsing the row it splits).
    size = draw(st.sampled_from([1, 7, 4096, 1 << 20] if len(data) < 4096 else [4096, 1 << 20]))
    chunks = [pb.LoadCsvRequest(chunk=data[i : i + size]) for i in range(0, len(data), size)]
    header: Any = draw(messages(pb.LoadCsvHeader.DESCRIPTOR))
    if draw(st.integers(0, 3)):
        header.database, header.table = DATABASE, TABLE
    shape = draw(st.sampled_from(["header first", "header first", "no header", "two headers"]))
    first = [pb.LoadCsvRequest(header=header)] if shape != "no header" else []
    extra = [pb.LoadCsvRequest(header=header)] if shape == "two headers" else []
    return first + chunks[:1] + extra + chunks[1:]


# -- the node ----------------------------------------------------------------------------------


class Target:
    """The fuzzed node, its clients, and the checks made after every call."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.client = node.client()
        self.admin = node.admin()

    def ensure(self) -> None:
        """The fuzzed table exists with a few records (a fuzzed call may have dropped it)."""
        try:
            self.client.describe(DATABASE, TABLE)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        try:
            self.client.create_table(DATABASE, TABLE, indexed=["v"])
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        self.client.upsert(
            DATABASE, TABLE, [{"id": 1, "v": "one"}, {"id": 2, "v": [1, 2]}, {"id": "a", "v": 3}]
        )

    def digest(self) -> str:
        try:
            return digest(self.node, DATABASE)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "no database"
            raise

    def check(self, call: Callable[[], Any], what: str) -> None:
        """Run ``call``; the checks of the module docstring."""
        self.ensure()
        before = self.digest()
        try:
            result = call()
            if isinstance(result, Iterator):
                list(result)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            assert code not in BAD_CODES, f"{what}: {code.name}: {details}"
            assert errors.error_info(exc) is not None, (
                f"{what}: {code.name} without ErrorInfo: {details}"
            )
            assert self.digest() == before, (
                f"{what} was refused ({code.name}) yet changed {DATABASE}"
            )
        assert self.node.health("storage"), f"storage stopped serving after {what}"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    node = Node(Path(tmp_path_factory.mktemp("fuzz")), services=("storage", "admin"))
    try:
        node.start()
        made = Target(node)
        made.ensure()
        yield made
    finally:
        node.close()


def _protected(method: str, request: Message) -> bool:
    """Calls that would lock the fuzzer out (its own user), which are not what is tested."""
    return method in ("AlterUser", "DropUser") and getattr(request, "username", "") == "admin"


# -- the fuzz tests ------------------------------------------------------------------------------


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_every_client_rpc_of_storage(target: Target, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(METHODS)), label="method")
    method = METHODS[name]
    call = getattr(target.client.stub, name)
    metadata = target.client.metadata
    if method.client_streaming:
        stream = data.draw(csv_streams(), label="stream")
        target.check(lambda: call(iter(stream), metadata=metadata, timeout=20), name)
        return
    request = data.draw(messages(method.input_type), label="request")
    if _protected(name, request):
        return
    target.check(lambda: call(request, metadata=metadata, timeout=20), name)


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_serialized_requests_with_bytes_flipped_cut_or_inserted(
    target: Target, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(UNARY_REQUESTS), label="method")
    method = METHODS[name]
    request = data.draw(messages(method.input_type), label="request")
    payload = data.draw(mutated(request.SerializeToString()), label="payload")
    try:
        parsed = message_factory.GetMessageClass(method.input_type).FromString(payload)
    except Exception:
        parsed = None
    if parsed is not None and _protected(name, parsed):
        return
    path = f"/shoal.storage.v1.StorageService/{name}"
    channel = target.client.channel
    if method.server_streaming:
        stream: Any = channel.unary_stream(path)
        target.check(lambda: stream(payload, metadata=target.client.metadata, timeout=20), name)
    else:
        unary: Any = channel.unary_unary(path)
        target.check(lambda: unary(payload, metadata=target.client.metadata, timeout=20), name)


def test_a_string_that_is_not_utf8_is_invalid_argument_in_every_client_rpc(
    target: Target,
) -> None:
    """Systematic: the first string field of every request (nested ones for LoadCsv)."""
    metadata = target.client.metadata
    checked = []
    for name, method in sorted(METHODS.items()):
        strings = [f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING]
        if method.client_streaming:
            header = pb.LoadCsvHeader(database=DATABASE, table=TABLE).SerializeToString()
            header += b"\x12\x02\xff\xfe"  # table: not UTF-8
            payloads = [b"\x0a" + bytes([len(header)]) + header]
            call: Any = target.client.channel.stream_unary(
                f"/shoal.storage.v1.StorageService/{name}"
            )
            request: Any = iter(payloads)
        elif strings:
            payload = bytes([strings[0].number << 3 | 2, 2]) + b"\xff\xfe"
            path = f"/shoal.storage.v1.StorageService/{name}"
            channel = target.client.channel
            call = (
                channel.unary_stream(path) if method.server_streaming else channel.unary_unary(path)
            )
            request = payload
        else:
            continue
        with pytest.raises(grpc.RpcError) as caught:
            result = call(request, metadata=metadata, timeout=20)
            if isinstance(result, Iterator):
                list(result)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{name}: {error.details()}"
        assert "UTF-8" in (error.details() or ""), name
        checked.append(name)
    assert len(checked) >= 25, checked
    assert target.node.health("storage")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            return bytes(out + bytes([byte]))
        out.append(byte | 0x80)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_conditions(levels: int) -> bytes:
    """A serialized SearchByConditionsRequest whose condition sits inside ``levels``
    nested groups (written by hand: protobuf itself refuses to build past 100 levels)."""
    comparison = pb.Comparison(attribute="v", comparator=pb.COMPARATOR_EQUALS, value=b"1")
    condition = _field(1, comparison.SerializeToString())  # Condition.comparison
    for _ in range(levels):
        group = _field(2, condition)  # ConditionGroup.conditions
        condition = _field(2, group)  # Condition.group
    request = pb.SearchByConditionsRequest(database=DATABASE, table=TABLE).SerializeToString()
    return request + _field(4, condition)  # SearchByConditionsRequest.conditions


@pytest.mark.parametrize("levels", [16, 17, 60, 99, 100, 101, 1000, 20_000])
def test_condition_groups_nested_past_every_limit(target: Target, levels: int) -> None:
    search: Any = target.client.channel.unary_stream(
        "/shoal.storage.v1.StorageService/SearchByConditions"
    )
    payload = deep_conditions(levels)

    def call() -> Any:
        return search(payload, metadata=target.client.metadata, timeout=20)

    if levels <= 16:
        target.check(call, f"{levels} nested groups")
        assert len(list(call())) == 1  # {"id": 2, "v": [1, 2]} and nothing else
        return
    with pytest.raises(grpc.RpcError) as caught:
        list(call())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert target.node.health("storage")


# -- Execute ------------------------------------------------------------------------------------

OPERATIONS = [
    "insert", "update", "upsert", "delete", "search_by_id", "search_by_hash",
    "search_by_value", "search_by_conditions", "describe_all", "describe_database",
    "describe_table", "create_database", "create_table", "drop_table", "create_attribute",
    "drop_attribute", "read_transaction_log", "read_audit_log", "delete_audit_logs_before",
    "add_user", "alter_user", "drop_user", "list_users", "user_info", "add_role",
    "alter_role", "drop_role", "list_roles", "csv_data_load", "csv_file_load",
    "revert_transaction", "get_analytics", "list_metrics", "restore_backup",
    "list_certificates", "cluster_status", "cluster_get_routes", "get_configuration",
    "create_authentication_tokens", "refresh_operation_token", "no_such_operation",
]  # fmt: skip
FIELDS = [
    "database", "schema", "table", "records", "ids", "hash_values", "attribute",
    "search_attribute", "value", "search_value", "conditions", "operator", "get_attributes",
    "limit", "offset", "sort", "hash_attribute", "primary_key", "attributes", "indexed",
    "replicated", "replicated_confirmation", "replicateTo", "search_type", "search_values",
    "from", "to", "timestamp", "version", "origin", "force", "data", "action", "username",
    "password", "role", "active", "permission", "id", "metric", "start_time", "end_time",
    "period", "file_path", "name", "backup", "until", "replicate", "comparator",
    "refresh_token",
]  # fmt: skip
DEEP = "\x00deep\x00"  # replaced by JSON nested past every limit once serialized
field_values = (
    json_values
    | st.sampled_from([DATABASE, TABLE, "v", "id", "*", 1.5, 1e30, -1, 2**64, DEEP])
    | st.lists(st.fixed_dictionaries({"id": json_scalars, "v": json_values}), max_size=3)
    | st.lists(
        st.fixed_dictionaries(
            {"attribute": st.sampled_from(["v", "id"]), "comparator": st.text(max_size=12)},
            optional={"value": json_values, "conditions": st.just([])},
        ),
        max_size=3,
    )
)


NUMERIC_FIELDS = [
    "limit", "offset", "from", "to", "timestamp", "version", "period", "until",
    "start_time", "end_time", "replicated_confirmation", "replicateTo", "search_values",
]  # fmt: skip
numbers = (
    st.sampled_from([1.5, 1e30, -1, -0.5, 2**63, 2**64 - 1, 1e308, 5e-324, "5", True, 0])
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(st.floats(allow_nan=False, allow_infinity=False) | st.integers(), max_size=3)
)


# Fields that make each operation valid, so that a hostile field is reached.
VALID: dict[str, dict[str, Any]] = {
    "insert": {"records": [{"id": 50, "v": 5}]},
    "update": {"records": [{"id": 1, "v": 6}]},
    "upsert": {"records": [{"id": 51}]},
    "delete": {"ids": [51]},
    "search_by_id": {"ids": [1, "a"]},
    "search_by_hash": {"hash_values": [2]},
    "search_by_value": {"attribute": "id", "value": "*"},
    "search_by_conditions": {
        "conditions": [{"attribute": "v", "comparator": "equals", "value": 1}]
    },
    "create_attribute": {"attribute": "w"},
    "read_audit_log": {"search_type": "timestamp", "search_values": [0]},
    "delete_audit_logs_before": {"timestamp": 1},
    "csv_data_load": {"data": "id,v\n60,x\n"},
    "revert_transaction": {"origin": "nobody", "version": 1},
    "get_analytics": {"metric": "requests"},
    "add_user": {"username": "fuzzed", "password": "p", "role": "super_user"},
}


@st.composite
def operations(draw: st.DrawFn) -> bytes:
    operation = draw(st.sampled_from(OPERATIONS))
    body = {
        "operation": operation,
        "database": DATABASE,
        "table": TABLE,
        **VALID.get(operation, {}),
    }
    body.update(draw(st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=3)))
    body.update(draw(st.dictionaries(st.sampled_from(NUMERIC_FIELDS), numbers, max_size=2)))
    if operation in ("alter_user", "drop_user") and body.get("username") == "admin":
        body["username"] = "nobody"
    text = json.dumps(body).encode()
    depth = draw(st.sampled_from([60, 210, 300, 1100]))
    return text.replace(json.dumps(DEEP).encode(), nested(depth))


@settings(FUZZ, max_examples=200)
@given(operations())
def test_execute_json(target: Target, raw: bytes) -> None:
    stub, metadata = target.admin.stub, target.admin.metadata
    outcome: dict[str, Any] = {}

    def execute() -> None:
        reply = stub.Execute(apb.ExecuteRequest(operation=raw), metadata=metadata, timeout=20)
        outcome["code"] = reply.code
        outcome["result"] = orjson.loads(reply.result)

    target.ensure()
    before = target.digest()
    target.check(execute, "Execute")  # the call itself never fails
    code = outcome["code"]
    assert code not in (grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0]), (
        f"Execute {raw[:300]!r}: {outcome['result']}"
    )
    if code:
        assert isinstance(outcome["result"].get("error"), str)
        assert target.digest() == before, f"refused Execute {raw[:300]!r} changed {DATABASE}"
    elif isinstance(outcome["result"], dict) and "job_id" in outcome["result"]:
        _finished(target, outcome["result"]["job_id"])  # its writes land before the next
    assert target.node.health("admin")


def _finished(target: Target, job_id: str) -> None:
    """Wait for a job (a CSV load) an operation started."""
    give_up = time.monotonic() + 60
    while target.admin.ok({"operation": "get_job", "id": job_id})[0]["status"] == "IN_PROGRESS":
        assert time.monotonic() < give_up, f"job {job_id} still running"
        time.sleep(0.05)
