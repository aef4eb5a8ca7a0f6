"""LoadCsv: a client stream of a header and chunks that split rows anywhere."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.conftest import MakeNode
from tests.harness.client import StorageClient


def messages(
    data: bytes,
    chunk: int = 7,
    database: str = "dev",
    table: str = "dog",
    operation: types_pb2.Operation.ValueType = types_pb2.OPERATION_UNSPECIFIED,
) -> Iterator[pb.LoadCsvRequest]:
    yield pb.LoadCsvRequest(
        header=pb.LoadCsvHeader(database=database, table=table, operation=operation)
    )
    for i in range(0, len(data), chunk):
        yield pb.LoadCsvRequest(chunk=data[i : i + chunk])


def load(client: StorageClient, data: bytes, **kwargs: Any) -> pb.LoadCsvResponse:
    return client.call("LoadCsv", messages(data, **kwargs), timeout=120)


def counts(reply: pb.LoadCsvResponse) -> tuple[int, int, int, int]:
    return reply.rows, reply.written, reply.skipped, reply.failed


TYPED = (
    "\ufeffid,name,age,score,good,tags,meta,note,code,city,big\r\n"
    '1,Penny,3,1.5,true,"[""a"",""b""]","{""k"": {""n"": null}}",,007,Tromsø,1e3\r\n'
    '2,"Kato, the lab",-2,0,false,[broken,{nope,"line one\r\nline two",-,😀 city,True\r\n'
    '"3","quoted ""name""",  4,-0.5,null,[],{},x,12345678901234567890123,"",false\r\n'
    "4.5,n,0012,1E-2,TRUE,[1],{},,,,\r\n"
).encode()


def test_typed_values_from_chunks_split_anywhere(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    for chunk in (1, 2, 3, 7, len(TYPED)):
        client.call("DropTable", pb.DropTableRequest(database="dev", table="dog"))
        client.create_table("dev", "dog")
        reply = load(client, TYPED, chunk=chunk)
        assert counts(reply) == (4, 4, 0, 0), chunk
        assert list(reply.errors) == []
        assert client.all_records("dev", "dog") == [
            {
                "id": 1,
                "name": "Penny",
                "age": 3,
                "score": 1.5,
                "good": True,
                "tags": ["a", "b"],
                "meta": {"k": {"n": None}},
                "code": "007",
                "city": "Tromsø",
                "big": 1000.0,
            },
            {
                "id": 2,
                "name": "Kato, the lab",
                "age": -2,
                "score": 0,
                "good": False,
                "tags": "[broken",
                "meta": "{nope",
                "note": "line one\r\nline two",
                "code": "-",
                "city": "😀 city",
                "big": "True",
            },
            {
                "id": 3,
                "name": 'quoted "name"',
                "age": "  4",
                "score": -0.5,
                "good": "null",
                "tags": [],
                "meta": {},
                "note": "x",
                "code": "12345678901234567890123",  # beyond 64 bits: kept exact, as text
                "big": False,
            },
            {
                "id": 4.5,
                "name": "n",
                "age": "0012",
                "score": 0.01,
                "good": "TRUE",
                "tags": [1],
                "meta": {},
            },
        ], chunk


def test_row_errors_are_reported_and_do_not_stop_the_load(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": 1, "name": "existing"}])
    data = (
        b"id,name,note\n"  # line 1
        b"1,a,exists already\n"  # line 2: skipped
        b'2,b,"a note over\n'  # line 3
        b'two lines"\n'  # line 4
        b"3,c\n"  # line 5: too few fields
        b",d,no id\n"  # line 6: no primary key: a generated one
        b"true,e,boolean id\n"  # line 7: invalid primary key
        b"\n"  # line 8: blank, ignored
        b"4,f,ok,extra\n"  # line 9: too many fields
        b"5,g,ok\n"  # line 10
        b"[1],h,array id\n"  # line 11: invalid primary key
        b'7,j,"' + b"[" * 64 + b"]" * 64 + b'"\n'  # line 12: a record 65 levels deep
        b"18446744073709551616,k,beyond 64 bits\n"  # line 13: the id stays text
        b"6,i,last row without newline"  # line 14
    )
    for chunk in (7, 1, len(data)):
        client.call("DropTable", pb.DropTableRequest(database="dev", table="dog"))
        client.create_table("dev", "dog")
        client.insert("dev", "dog", [{"id": 1, "name": "existing"}])
        reply = load(client, data, chunk=chunk)
        assert counts(reply) == (11, 5, 1, 5), chunk
        assert [e.line for e in reply.errors] == [5, 7, 9, 11, 12], chunk
        messages = {e.line: e.message for e in reply.errors}
        assert "fields" in messages[5]
        assert "3" in messages[9] and "4" in messages[9]
        assert "primary key" in messages[7]
        assert "primary key" in messages[11]
        assert "more than 64 levels" in messages[12]
        loaded = {r["name"]: r["id"] for r in client.all_records("dev", "dog")}
        generated = loaded.pop("d")  # line 6: its key generated
        assert isinstance(generated, str) and len(generated) == 36
        assert sorted(loaded.values(), key=str) == [1, "18446744073709551616", 2, 5, 6]
        assert client.get("dev", "dog", [1, 2, 6]) == [
            {"id": 1, "name": "existing"},
            {"id": 2, "name": "b", "note": "a note over\ntwo lines"},
            {"id": 6, "name": "i", "note": "last row without newline"},
        ]


def test_at_most_100_row_errors_are_reported(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    data = b"id,name\n" + b"".join(b"%d,ok\n" % i if i % 2 else b"x%d\n" % i for i in range(300))
    reply = load(client, data, chunk=100)
    assert counts(reply) == (300, 150, 0, 150)
    assert len(reply.errors) == 100
    assert [e.line for e in reply.errors] == [i + 2 for i in range(0, 200, 2)]
    assert client.describe("dev", "dog").record_count == 150


def test_update_and_upsert_loads(client: StorageClient) -> None:
    client.create_table("dev", "dog", indexed=["breed"])
    client.insert("dev", "dog", [{"id": 1, "name": "Penny", "breed": "pug"}])
    data = b"id,breed\n1,lab\n2,husky\n"
    reply = load(client, data, operation=types_pb2.OPERATION_UPDATE)
    assert counts(reply) == (2, 1, 1, 0)
    assert client.all_records("dev", "dog") == [{"id": 1, "name": "Penny", "breed": "lab"}]
    reply = load(client, data + b"3,pug\n", operation=types_pb2.OPERATION_UPSERT)
    assert counts(reply) == (3, 3, 0, 0)
    assert client.all_records("dev", "dog") == [
        {"id": 1, "name": "Penny", "breed": "lab"},
        {"id": 2, "breed": "husky"},
        {"id": 3, "breed": "pug"},
    ]
    assert [r["id"] for r in client.by_value("dev", "dog", "breed", "husky")] == [2]
    reply = load(client, b"id,name\n4,Rex\n3,dup\n4,dup\n", operation=types_pb2.OPERATION_INSERT)
    assert counts(reply) == (3, 1, 2, 0)
    assert client.get("dev", "dog", [3, 4]) == [{"id": 3, "breed": "pug"}, {"id": 4, "name": "Rex"}]
    client.expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "LoadCsv",
        messages(b"id\n5\n", operation=types_pb2.OPERATION_DELETE),
        "operation",
    )
    assert client.get("dev", "dog", [5]) == []


def test_stream_shape_errors(client: StorageClient) -> None:
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": 1}])
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    header = pb.LoadCsvRequest(header=pb.LoadCsvHeader(database="dev", table="dog"))
    update = pb.LoadCsvRequest(
        header=pb.LoadCsvHeader(database="dev", table="dog", operation=types_pb2.OPERATION_UPDATE)
    )
    cases: list[tuple[list[pb.LoadCsvRequest], list[str]]] = [
        ([], ["header"]),
        ([pb.LoadCsvRequest(chunk=b"id\n2\n")], ["first message", "header"]),
        (
            [pb.LoadCsvRequest(chunk=b"id\n2\n"), header],
            ["first message", "header"],
        ),
        ([header, pb.LoadCsvRequest(chunk=b"id\n2\n"), header], ["header"]),
        ([header], ["empty", "header row"]),
        ([header, pb.LoadCsvRequest(chunk=b"")], ["empty", "header row"]),
        # Only an update needs the key column (an insert or upsert generates missing keys).
        ([update, pb.LoadCsvRequest(chunk=b"name,age\nRex,3\n")], ["no 'id' column"]),
        ([header, pb.LoadCsvRequest(chunk=b"id,name,id\n2,a,3\n")], ["twice"]),
        ([header, pb.LoadCsvRequest(chunk=b"id,,name\n2,a,b\n")], ["name every column"]),
        ([header, pb.LoadCsvRequest(chunk=b"\n2\n")], ["header row"]),
        ([header, pb.LoadCsvRequest(chunk=b"id\n\xff\xfe\n")], ["utf-8"]),
    ]
    for requests, words in cases:
        client.expect(invalid, "LoadCsv", iter(requests), *words)
        assert client.all_records("dev", "dog") == [{"id": 1}], words
    client.expect(
        grpc.StatusCode.NOT_FOUND,
        "LoadCsv",
        messages(b"id\n1\n", table="cat"),
        "dev.cat",
        "does not exist",
    )
    client.expect(
        grpc.StatusCode.NOT_FOUND, "LoadCsv", messages(b"id\n1\n", database="nope"), "nope"
    )


def test_batches_respect_the_records_per_request_limit(make_node: MakeNode) -> None:
    client = make_node(config={"storage": {"maxRecordsPerRequest": 10}}).client()
    client.create_table("dev", "dog")
    data = b"id,n\n" + b"".join(b"%d,%d\n" % (i, i * 2) for i in range(35))
    reply = load(client, data, chunk=16)
    assert counts(reply) == (35, 35, 0, 0)
    assert client.describe("dev", "dog").record_count == 35


def test_a_large_csv_loads_completely(client: StorageClient) -> None:
    client.create_table("dev", "big", indexed=["group"])
    rows = 100_000
    data = b"id,name,group,score,active\n" + b"".join(
        b'%d,"name %d, the %dth",g%d,%d.5,%s\n'
        % (i, i, i, i % 10, i, b"true" if i % 2 else b"false")
        for i in range(rows)
    )
    started = time.monotonic()
    reply = load(client, data, table="big", chunk=64 * 1024)
    elapsed = time.monotonic() - started
    assert counts(reply) == (rows, rows, 0, 0)
    assert list(reply.errors) == []
    assert elapsed < 30, f"loading {rows} rows took {elapsed:.1f}s"
    assert client.describe("dev", "big").record_count == rows
    assert client.get("dev", "big", [0, 54_321, rows - 1]) == [
        {"id": 0, "name": "name 0, the 0th", "group": "g0", "score": 0.5, "active": False},
        {
            "id": 54_321,
            "name": "name 54321, the 54321th",
            "group": "g1",
            "score": 54_321.5,
            "active": True,
        },
        {
            "id": rows - 1,
            "name": f"name {rows - 1}, the {rows - 1}th",
            "group": "g9",
            "score": rows - 0.5,
            "active": True,
        },
    ]
    in_group = client.by_value("dev", "big", "group", "g7", get_attributes=["id"])
    assert [r["id"] for r in in_group] == list(range(7, rows, 10))
