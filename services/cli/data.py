"""``shoal data``: read and write records through a node's storage service."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services.cli.calls import call, channel
from services.cli.output import fail
from services.cli.settings import Settings, StorageNodeOption, connected
from services.common.config import DEFAULT_STORAGE_PORT

data_app = typer.Typer(help="Read and write records.", no_args_is_help=True)
CSV_CHUNK_BYTES = 256 * 1024
CSV_OPERATIONS = {
    "insert": types_pb2.OPERATION_INSERT,
    "update": types_pb2.OPERATION_UPDATE,
    "upsert": types_pb2.OPERATION_UPSERT,
}


def _stub(settings: Settings) -> storage_pb2_grpc.StorageServiceStub:
    address = settings.address(DEFAULT_STORAGE_PORT)
    return storage_pb2_grpc.StorageServiceStub(channel(settings, address))


def _print_records(chunks: Any) -> int:
    """Print every record; how many there were."""
    printed = 0
    for chunk in chunks:
        for record in chunk.records:
            sys.stdout.write(record.decode() + "\n")
            printed += 1
    return printed


def _json_or_text(text: str) -> Any:
    """``text`` as JSON when it is JSON, else as a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@data_app.command("create-table")
@connected(StorageNodeOption)
def create_table(
    settings: Settings,
    database: str,
    table: str,
    primary_key: Annotated[str, typer.Option(help="primary key attribute")] = "id",
    index: Annotated[list[str] | None, typer.Option(help="attribute to index (repeatable)")] = None,
) -> None:
    """Create a table (and its database when missing)."""
    request = pb.CreateTableRequest(
        database=database, table=table, primary_key=primary_key, indexed_attributes=index or []
    )
    reply = call(settings, _stub(settings).CreateTable, request)
    typer.echo(
        f"created {database}.{reply.table.name} (primary key {reply.table.primary_key})", err=True
    )


@data_app.command("insert")
@connected(StorageNodeOption)
def insert(
    settings: Settings,
    database: str,
    table: str,
    records: Annotated[list[str], typer.Argument(help="JSON objects")],
) -> None:
    """Insert records given as JSON objects."""
    payload = []
    for text in records:
        try:
            payload.append(orjson.dumps(json.loads(text)))
        except json.JSONDecodeError as exc:
            fail(f"not valid JSON: {text!r} ({exc})", 2)
    request = pb.InsertRequest(database=database, table=table, records=payload)
    reply = call(settings, _stub(settings).Insert, request)
    inserted = {
        "inserted": [orjson.loads(i) for i in reply.inserted_ids],
        "skipped": [orjson.loads(i) for i in reply.skipped_ids],
        "version": reply.version,
    }
    sys.stdout.write(json.dumps(inserted) + "\n")


@data_app.command("get")
@connected(StorageNodeOption)
def get(
    settings: Settings,
    database: str,
    table: str,
    ids: Annotated[list[str], typer.Argument(help="primary keys (numbers or strings)")],
) -> None:
    """Read records by primary key."""
    keys = [orjson.dumps(_json_or_text(text)) for text in ids]
    request = pb.SearchByIdRequest(database=database, table=table, ids=keys)
    found = _print_records(call(settings, _stub(settings).SearchById, request, stream=True))
    wanted = len(set(keys))
    if found < wanted:
        # As for any failed call: the gRPC status code (NOT_FOUND) is the exit status.
        fail(
            f"{wanted - found} of {wanted} ids not found in {database}.{table}",
            int(grpc.StatusCode.NOT_FOUND.value[0]),
        )


@data_app.command("search")
@connected(StorageNodeOption)
def search(
    settings: Settings,
    database: str,
    table: str,
    attribute: str,
    value: Annotated[str, typer.Argument(help="JSON value, or text with * wildcards")],
    limit: int = 0,
) -> None:
    """Find records whose ATTRIBUTE equals VALUE (or matches a * pattern)."""
    request = pb.SearchByValueRequest(
        database=database,
        table=table,
        attribute=attribute,
        value=orjson.dumps(_json_or_text(value)),
        limit=limit,
    )
    _print_records(call(settings, _stub(settings).SearchByValue, request, stream=True))


@data_app.command("load-csv")
@connected(StorageNodeOption)
def load_csv(
    settings: Settings,
    database: str,
    table: str,
    file: Annotated[Path, typer.Argument(help="CSV file; the first row names the columns")],
    action: Annotated[str, typer.Option(help="insert, update or upsert")] = "insert",
) -> None:
    """Load a CSV file into a table, streamed in chunks (progress on stderr)."""
    if action not in CSV_OPERATIONS:
        fail(f"--action must be insert, update or upsert, not {action!r}", 2)
    if not file.is_file():
        fail(f"{file} is not a file", 5)
    header = pb.LoadCsvHeader(database=database, table=table, operation=CSV_OPERATIONS[action])

    def requests(advance: Callable[[int], None]) -> Iterator[pb.LoadCsvRequest]:
        yield pb.LoadCsvRequest(header=header)
        with file.open("rb") as stream:
            while chunk := stream.read(CSV_CHUNK_BYTES):
                advance(len(chunk))
                yield pb.LoadCsvRequest(chunk=chunk)

    with Progress(
        TextColumn(f"loading {file.name}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task("load", total=file.stat().st_size)
        chunks = requests(lambda n: bar.advance(task, n))
        reply = call(settings, _stub(settings).LoadCsv, chunks, timeout=3600)
    loaded = {
        "rows": reply.rows,
        "written": reply.written,
        "skipped": reply.skipped,
        "failed": reply.failed,
        "errors": [{"line": e.line, "message": e.message} for e in reply.errors],
    }
    sys.stdout.write(json.dumps(loaded) + "\n")
    if reply.failed:
        raise typer.Exit(int(grpc.StatusCode.INVALID_ARGUMENT.value[0]))
