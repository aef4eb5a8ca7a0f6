"""Hostile input, real processes: the JSON nesting limit at every entry (client writes,
Execute, CSV, Apply, copies, restores), scans that survive a record older code stored
too deep, integers kept exact or refused, and the status codes of malformed requests
(see docs/security.md, "Hostile input")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import orjson
import pytest
from shoal.admin.v1 import admin_pb2 as apb
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.admin.backup_archive import ArchiveWriter, Manifest
from services.common import errors
from services.common.config import DEFAULT_REPLICATION_PORT
from services.common.hlc import version_from_ms
from services.storage import keys
from services.storage.db import Store
from tests.conftest import MakeNode
from tests.harness.client import StorageClient, cond, expect_error
from tests.harness.hostile import (
    digest,
    nested,
    raw_client_stream,
    raw_stream,
    raw_unary,
    record,
    with_bad_utf8,
)
from tests.harness.node import Node
from tests.harness.wait import wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LIMIT = 64  # storage.maxNestingDepth by default
DEEP = LIMIT + 1
WITH_ADMIN = ("storage", "admin")
TWO_64 = b"18446744073709551616"  # 2^64: orjson would read the double 2^64 for 2^64 + 1 too


def _insert(client: StorageClient, *records: bytes, method: str = "Insert") -> object:
    request = {"Insert": pb.InsertRequest, "Update": pb.UpdateRequest, "Upsert": pb.UpsertRequest}
    return client.call(method, request[method](database="dev", table="t", records=records))


def _csv(client: StorageClient, data: bytes, chunk: int = 64 * 1024) -> pb.LoadCsvResponse:
    def messages() -> Iterator[pb.LoadCsvRequest]:
        yield pb.LoadCsvRequest(header=pb.LoadCsvHeader(database="dev", table="t"))
        for start in range(0, len(data), chunk):
            yield pb.LoadCsvRequest(chunk=data[start : start + chunk])

    reply: pb.LoadCsvResponse = client.call("LoadCsv", messages())
    return reply


@pytest.fixture
def dev(make_node: MakeNode) -> Node:
    """A node with storage and admin, and dev.t (``v`` indexed) holding record 1."""
    node = make_node(services=WITH_ADMIN)
    client = node.client()
    client.create_table("dev", "t", indexed=["v"])
    client.insert("dev", "t", [{"id": 1, "v": "one"}])
    return node


# -- the nesting limit ---------------------------------------------------------------------


def test_client_writes_deeper_than_the_limit_are_refused_and_change_nothing(dev: Node) -> None:
    client = dev.client()
    admin = dev.admin()
    before = digest(dev, "dev")
    for method in ("Insert", "Update", "Upsert"):
        expect_error(
            INVALID,
            partial(_insert, client, record(1, DEEP), method=method),
            "record 0",
            f"more than {LIMIT} levels",
            "storage.maxNestingDepth",
        )
    transact = pb.TransactRequest(
        database="dev",
        operations=[
            pb.TransactOperation(
                table="t", operation=types_pb2.OPERATION_INSERT, records=[record(2, 3)]
            ),
            pb.TransactOperation(
                table="t", operation=types_pb2.OPERATION_UPSERT, records=[record(3, DEEP)]
            ),
        ],
    )
    client.expect(INVALID, "Transact", transact, "operation 1", f"more than {LIMIT} levels")
    # Execute forwards records to storage, which holds them to the same limit.
    op = b'{"operation":"insert","database":"dev","table":"t","records":[%s]}' % record(4, DEEP)
    reply = admin.stub.Execute(apb.ExecuteRequest(operation=op), metadata=admin.metadata)
    assert reply.code == INVALID.value[0]
    assert f"more than {LIMIT} levels" in orjson.loads(reply.result)["error"]
    # CSV: a cell holding JSON makes the record one level deeper; that row fails.
    data = b'id,v\n5,"' + nested(DEEP - 1).replace(b'"', b'""') + b'"\n'
    loaded = _csv(client, data)
    assert (loaded.written, loaded.failed) == (0, 1)
    assert loaded.errors[0].line == 2 and f"more than {LIMIT} levels" in loaded.errors[0].message
    assert digest(dev, "dev") == before
    # A search value as deep is refused too (it could not be written into an error).
    client.expect(
        INVALID,
        "SearchByConditions",
        pb.SearchByConditionsRequest(
            database="dev",
            table="t",
            conditions=[
                pb.Condition(
                    comparison=pb.Comparison(
                        attribute="v", comparator=pb.COMPARATOR_EQUALS, value=nested(300)
                    )
                )
            ],
        ),
        "levels",
    )
    # At the limit, a record is accepted and every read returns it.
    at_limit = record(6, LIMIT)
    _insert(client, at_limit)
    assert client.get("dev", "t", [6]) == [orjson.loads(at_limit)]
    assert orjson.loads(at_limit) in client.all_records("dev", "t")


def _archive(
    rows: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
    log: list[types_pb2.Transaction] = (),  # type: ignore[assignment]
) -> bytes:
    """A backup archive of database "dev" from node "peer" with these rows and log."""
    version = version_from_ms(1_700_000_000_000)
    schema = types_pb2.TableSchema(name="t", primary_key="id", replicate=True)
    manifest = Manifest("dev", "peer", version, {"peer": version}, {}, (schema,))
    writer = ArchiveWriter(mtime=0)
    data = writer.manifest(manifest)
    snapshot = [types_pb2.SnapshotRow(table="t", id=b"%d" % pk, state=st) for pk, st in rows]
    data += writer.part(pb.BackupResponse(rows=snapshot))
    if log:
        data += writer.part(pb.BackupResponse(transactions=log))
    return data + writer.finish()


def _restore_requests(archive: bytes, database: str) -> Iterator[apb.RestoreBackupRequest]:
    yield apb.RestoreBackupRequest(header=apb.RestoreBackupHeader(database=database))
    for start in range(0, len(archive), 64 * 1024):
        yield apb.RestoreBackupRequest(chunk=archive[start : start + 64 * 1024])


def test_peers_and_restores_cannot_bring_in_a_record_deeper_than_the_limit(dev: Node) -> None:
    internal = dev.internal_client()
    before = digest(dev, "dev")
    positions = internal.call("GetPositions", pb.GetPositionsRequest(database="dev")).positions
    version = version_from_ms(1_700_000_000_000)
    txn = types_pb2.Transaction(
        origin="peer",
        version=version,
        database="dev",
        writes=[
            types_pb2.Write(
                table="t", kind=types_pb2.WRITE_KIND_PUT, id=b"7", value=record(7, DEEP)
            )
        ],
        tables=[types_pb2.TableSchema(name="t", primary_key="id", replicate=True)],
    )
    internal.expect(
        INVALID, "Apply", pb.ApplyRequest(transactions=[txn]), f"more than {LIMIT} levels"
    )
    state = b'[%d,"peer",false,%s,{}]' % (version, record(8, DEEP))
    internal.expect(
        INVALID,
        "MergeSnapshot",
        pb.MergeSnapshotRequest(
            source="peer",
            database="dev",
            part=1,
            begins_part=True,
            rows=[types_pb2.SnapshotRow(table="t", id=b"8", state=state)],
        ),
        f"more than {LIMIT} levels",
    )
    # A backup archive with such a row, or such a logged transaction, is refused whole.
    admin = dev.admin()
    for archive in (_archive(rows=[(8, state)]), _archive(log=[txn])):
        error = expect_error(
            INVALID,
            partial(
                admin.stub.RestoreBackup,
                _restore_requests(archive, "restored"),
                metadata=admin.metadata,
                timeout=60,
            ),
            f"more than {LIMIT} levels",
        )
        assert errors.error_info(error) is not None
    assert digest(dev, "dev") == before
    after = internal.call("GetPositions", pb.GetPositionsRequest(database="dev")).positions
    assert list(after) == list(positions)
    names = {d.name for d in internal.call("DescribeAll", pb.DescribeAllRequest()).databases}
    assert "restored" not in names


def test_the_limit_is_configurable_and_cannot_pass_what_reads_can_serialize(
    make_node: MakeNode,
) -> None:
    node = make_node(config={"storage": {"maxNestingDepth": 10}})
    client = node.client()
    client.create_table("dev", "t")
    _insert(client, record(1, 10))
    expect_error(INVALID, lambda: _insert(client, record(2, 11)), "more than 10 levels")
    assert [r["id"] for r in client.all_records("dev", "t")] == [1]

    too_high = make_node(start=False, config={"storage": {"maxNestingDepth": 201}})
    too_high.start_service("storage", wait=False)
    process = too_high.processes["storage"]
    assert process.wait(timeout=30) != 0
    log = too_high.log_path("storage").read_text()
    assert "storage.maxNestingDepth" in log and "between 8 and 200" in log


def _poison(node: Node, database: str, table: str, pk: str, depth: int) -> None:
    """Rewrite record ``pk`` (the node stopped) as older code stored a record nested
    ``depth`` levels deep: the client's JSON inside the state, unchecked."""
    store = Store(Path(node.config["rootPath"]) / "database", sync_writes=True)
    try:
        schema = store.meta.get(b"schema/" + database.encode())
        assert isinstance(schema, bytes), f"database {database} has no schema"
        table_id = orjson.loads(schema)["tables"][table]["id"]
        key = keys.data_key(table_id, keys.encode_key(pk))
        state = store.data.get(key)
        assert isinstance(state, bytes), f"no record {pk!r}"
        version = orjson.loads(state)[0]
        doc = b'{"id":%s,"v":%s}' % (json.dumps(pk).encode(), nested(depth - 1))
        store.data[key] = b'[%d,"old",false,%s,{}]' % (version, doc)
    finally:
        store.close()


def test_a_record_older_code_stored_too_deep_does_not_fail_reads_of_the_others(
    make_node: MakeNode,
) -> None:
    node = make_node()
    client = node.client()
    client.create_table("dev", "t", indexed=["v"])
    client.insert("dev", "t", [{"id": k, "v": k} for k in ("a", "b", "c", "d")])
    node.stop()
    _poison(node, "dev", "t", "b", 300)
    node.start()
    client = node.client()

    def readable(call: object) -> list[object]:
        """The records a read returned before it failed, and its failure."""
        records: list[object] = []
        with pytest.raises(grpc.RpcError) as caught:
            for chunk in call:  # type: ignore[attr-defined]
                records.extend(orjson.loads(r) for r in chunk.records)
        error = caught.value
        assert error.code() == grpc.StatusCode.DATA_LOSS, error.details()
        assert '"b"' in (error.details() or "")
        info = errors.error_info(error)
        assert info is not None and info.reason == "UNREADABLE_RECORDS"
        assert info.metadata["ids"] == '["b"]' and info.metadata["count"] == "1"
        return records

    stub, metadata = client.stub, client.metadata
    scans = [
        stub.SearchByValue(
            pb.SearchByValueRequest(database="dev", table="t", attribute="id", value=b'"*"'),
            metadata=metadata,
        ),
        stub.SearchByConditions(
            pb.SearchByConditionsRequest(database="dev", table="t"), metadata=metadata
        ),
        stub.SearchByConditions(
            pb.SearchByConditionsRequest(
                database="dev", table="t", conditions=[cond("id", "greater_than", "")]
            ),
            metadata=metadata,
        ),
        stub.SearchById(
            pb.SearchByIdRequest(database="dev", table="t", ids=[b'"a"', b'"b"', b'"c"', b'"d"']),
            metadata=metadata,
        ),
    ]
    for scan in scans:
        records = readable(scan)
        assert sorted(r["id"] for r in records) == ["a", "c", "d"]  # type: ignore[index]
    # A write that keeps its deep attribute cannot store it back; one that replaces it
    # can, and so can a delete. Then the table reads whole again.
    expect_error(
        grpc.StatusCode.DATA_LOSS,
        partial(client.update, "dev", "t", [{"id": "b", "w": 1}]),
        "'b'",
        "delete it",
    )
    assert "w" not in {a.name for a in client.describe("dev", "t").attributes}
    client.upsert("dev", "t", [{"id": "b", "v": "bee"}])
    assert client.get("dev", "t", ["b"]) == [{"id": "b", "v": "bee"}]
    assert client.delete("dev", "t", ["b"]).deleted_ids == [b'"b"']
    assert sorted(r["id"] for r in client.all_records("dev", "t")) == ["a", "c", "d"]


# -- integers ----------------------------------------------------------------------------


def test_integers_are_kept_exact_or_refused(dev: Node) -> None:
    client = dev.client()
    big = [2**64 - 1, -(2**63), 2**60, 2**60 + 1, 2**53 + 1]
    client.insert("dev", "t", [{"id": 10 + i, "v": n} for i, n in enumerate(big)])
    got = {r["id"]: r["v"] for r in client.all_records("dev", "t") if r["id"] >= 10}
    assert got == {10 + i: n for i, n in enumerate(big)}
    assert all(type(v) is int for v in got.values())
    # Index neighbours that share a double stay apart.
    assert [r["id"] for r in client.by_value("dev", "t", "v", 2**60 + 1)] == [13]
    before = digest(dev, "dev")
    # Beyond 64 bits orjson would read a double: 2^64 and 2^64 + 1 would be one number.
    for text in (b"18446744073709551616", b"18446744073709551617", b"-9223372036854775809"):
        expect_error(INVALID, partial(_insert, client, b'{"id":20,"v":%s}' % text), "64-bit")
        expect_error(INVALID, partial(_insert, client, b'{"id":%s}' % text), "64-bit")
        client.expect(
            INVALID,
            "SearchById",
            pb.SearchByIdRequest(database="dev", table="t", ids=[text]),
            "64-bit",
        )
    # Numeric keys beyond 2^53, as integers or doubles, would share a key with a
    # neighbour: refused.
    for text in (b"9007199254740993", b"9007199254740994.0", b"1e300"):
        expect_error(INVALID, partial(_insert, client, b'{"id":%s}' % text), "2^53")
    # Over Execute the operation itself is refused.
    admin = dev.admin()
    op = b'{"operation":"insert","database":"dev","table":"t","records":[{"id":%s}]}' % TWO_64
    reply = admin.stub.Execute(apb.ExecuteRequest(operation=op), metadata=admin.metadata)
    assert reply.code == INVALID.value[0] and "64-bit" in orjson.loads(reply.result)["error"]
    assert digest(dev, "dev") == before
    # In a CSV, a number beyond 64 bits stays text, digit for digit.
    loaded = _csv(client, b"id,v\n30,123456789012345678901234567890\n")
    assert loaded.written == 1
    assert client.get("dev", "t", [30]) == [{"id": 30, "v": "123456789012345678901234567890"}]


# -- status codes of malformed requests ------------------------------------------------------


def test_execute_counts_and_times_must_be_whole_numbers_in_range(dev: Node) -> None:
    admin = dev.admin()
    search = {"operation": "search_by_value", "table": "t", "database": "dev"}
    search |= {"attribute": "id", "value": "*"}
    for field, value in [
        ("limit", 1e30),
        ("limit", 1.5),
        ("limit", -1),
        ("offset", 1e20),
        ("limit", "5"),
    ]:
        result, code = admin.execute({**search, field: value})
        assert code == INVALID.value[0], (field, value, result)
        assert f"'{field}' must be a whole number" in result["error"]
    assert admin.ok({**search, "limit": 2.0}) == [{"id": 1, "v": "one"}]
    for operation, field in (("read_transaction_log", "from"), ("read_transaction_log", "to")):
        result, code = admin.execute({"operation": operation, "database": "dev", field: 1e30})
        assert code == INVALID.value[0] and "Unix milliseconds" in result["error"], result


def test_a_very_long_name_is_refused_with_a_short_message(dev: Node) -> None:
    client = dev.client()
    name = "x" * 10_000
    for method, request in [
        ("DescribeTable", pb.DescribeTableRequest(database="dev", table=name)),
        ("CreateTable", pb.CreateTableRequest(database=name, table="t")),
        ("SearchByValue", pb.SearchByValueRequest(database="dev", table=name, value=b'"*"')),
    ]:
        error = client.expect(INVALID, method, request, "invalid", "10000 characters")
        assert len((error.details() or "").encode()) <= errors.MAX_MESSAGE_BYTES
    result, code = dev.admin().execute(
        {"operation": "describe_table", "database": "dev", "table": name}
    )
    assert code == INVALID.value[0] and "10000 characters" in result["error"]


def test_a_csv_field_over_128_kib_stops_the_load_naming_its_line(dev: Node) -> None:
    client = dev.client()
    before = digest(dev, "dev")
    data = b"id,v\n2,two\n3," + b"x" * (128 * 1024 + 1) + b"\n4,four\n"
    for chunk in (len(data), 4096):
        expect_error(
            INVALID,
            partial(_csv, client, data, chunk),
            "line 3",
            "131072 characters",
        )
    job = dev.admin().job(
        {"operation": "csv_data_load", "database": "dev", "table": "t", "data": data.decode()}
    )
    assert job["status"] == "ERROR" and "line 3" in job["message"], job
    assert digest(dev, "dev") == before


def test_invalid_utf8_in_a_string_field_is_invalid_argument(dev: Node) -> None:
    metadata = dev.client().metadata
    describe = pb.DescribeTableRequest(database="dev").SerializeToString()
    by_id = pb.SearchByIdRequest(database="dev", table="t", ids=[b"1"]).SerializeToString()
    header = pb.LoadCsvRequest(header=pb.LoadCsvHeader(database="dev")).SerializeToString()
    bad_header = pb.LoadCsvRequest(header=pb.LoadCsvHeader(database="dev", table="t"))
    bad_header_bytes = with_bad_utf8(bad_header.header.SerializeToString(), 2)
    nested_bad = bytes([1 << 3 | 2, len(bad_header_bytes)]) + bad_header_bytes
    for error in (
        raw_unary(dev, "DescribeTable", with_bad_utf8(describe, 2), metadata),
        raw_stream(dev, "SearchById", with_bad_utf8(by_id, 2), metadata),
        raw_client_stream(dev, "LoadCsv", [nested_bad, b"\x12\x04id\n2"], metadata),
    ):
        assert error is not None
        assert error.code() == INVALID, f"{error.code()}: {error.details()}"
        assert "UTF-8" in (error.details() or "")
    assert header  # a well-formed header still works:
    assert dev.client().describe("dev", "t").name == "t"


def test_a_first_replicate_message_that_is_not_a_hello_is_invalid_argument(
    make_node: MakeNode,
) -> None:
    # Insecure mode: the replicator serves the plain port only.
    node = make_node(services=("storage", "replicator"))
    port = node.config.get("replication", {}).get("port", DEFAULT_REPLICATION_PORT)
    for first in (
        rpb.PeerMessage(ack=rpb.Ack(generation=1, sequence=1)),
        rpb.PeerMessage(),
    ):
        with grpc.insecure_channel(f"{node.host}:{port}") as channel:
            stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
            call = stub.Replicate(iter([rpb.ReplicateRequest(message=first)]), timeout=10)
            error = expect_error(INVALID, partial(list, call), "must be a Hello")
            assert errors.error_info(error) is not None
    assert wait_for(lambda: node.health("replicator"), 10, "the replicator to serve")
