"""The ``shoal`` command line.

    shoal local up              a local cluster on 127.0.0.1..N (what `make run` does)
    shoal node start -c FILE    one node: its services as supervised processes
    shoal storage|replicator|admin -c FILE
                                one service in the foreground (containers use these)
    shoal data insert|get|search
                                talk to a node's storage service
    shoal op '<json>'           any Harper-style operation, through the admin service
    shoal cluster status|routes cluster operations

Credentials come from --username/--password or SHOAL_USERNAME / SHOAL_PASSWORD. Data goes
to stdout (JSON, one record per line); messages go to stderr. Exit codes follow the gRPC
status of a failed call (e.g. 5 for NOT_FOUND, 16 for UNAUTHENTICATED).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import grpc
import orjson
import typer
from rich.console import Console
from rich.table import Table
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from services.common.auth import basic_metadata
from services.common.config import DEFAULT_ADMIN_PORT, DEFAULT_STORAGE_PORT, ConfigError
from services.common.grpcserver import channel_options
from services.local import SERVICES, local_cluster_configs, local_password, run_services

app = typer.Typer(help="Shoal: a replicated document database.", no_args_is_help=True)
local_app = typer.Typer(help="A local cluster on loopback addresses.", no_args_is_help=True)
node_app = typer.Typer(help="Run a node.", no_args_is_help=True)
data_app = typer.Typer(help="Read and write records.", no_args_is_help=True)
app.add_typer(local_app, name="local")
app.add_typer(node_app, name="node")
app.add_typer(data_app, name="data")
cluster_app = typer.Typer(
    help="Cluster operations (through a node's admin service).", no_args_is_help=True
)
routes_app = typer.Typer(
    help="Routes of a node (persisted in its shoal.yaml).", no_args_is_help=True
)
app.add_typer(cluster_app, name="cluster")
cluster_app.add_typer(routes_app, name="routes")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="path to shoal.yaml", exists=True)
]
NodeOption = Annotated[
    str, typer.Option("--node", help="HOST[:PORT] of the node's storage service")
]
UserOption = Annotated[str, typer.Option("--username", "-u", envvar="SHOAL_USERNAME")]
PasswordOption = Annotated[str, typer.Option("--password", "-p", envvar="SHOAL_PASSWORD")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"shoal: {message}", err=True)
    raise typer.Exit(code)


@local_app.command("up")
def local_up(
    nodes: Annotated[int, typer.Option(min=1, max=9, help="number of nodes")] = 3,
    data: Annotated[Path, typer.Option(help="folder for the nodes' data and configs")] = Path(
        "data"
    ),
) -> None:
    """Start a cluster of NODES nodes on 127.0.0.1..N (full mesh) and run until Ctrl-C."""
    password = local_password(data)
    paths = local_cluster_configs(data, nodes)
    typer.echo(f"starting {nodes} nodes in {data}/ ...", err=True)
    try:
        supervisor = run_services(paths, SERVICES, {"SHOAL_ADMIN_PASSWORD": password}, logs=True)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    hosts = ", ".join(f"127.0.0.{i}" for i in range(1, nodes + 1))
    typer.echo(
        f"""
Shoal is running: {nodes} nodes on {hosts}
  storage :{DEFAULT_STORAGE_PORT}   replication :9932   logs in {data}/node*/*.log

Try it (in another terminal):
  export SHOAL_USERNAME=admin SHOAL_PASSWORD={password}
  .venv/bin/shoal data create-table --node 127.0.0.1 dev dog
  .venv/bin/shoal data insert --node 127.0.0.1 dev dog '{{"id": 1, "name": "Penny"}}'
  .venv/bin/shoal data get --node 127.0.0.{nodes} dev dog 1

Ctrl-C stops the cluster.""",
        err=True,
    )
    supervisor.run_until_signalled()
    typer.echo("stopped", err=True)


@node_app.command("start")
def node_start(config: ConfigOption) -> None:
    """Run one node's services (storage, replicator) until Ctrl-C or SIGTERM."""
    try:
        supervisor = run_services([config], SERVICES, {}, logs=False)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    supervisor.run_until_signalled()


def _exec_service(service: str, config: Path) -> None:
    os.execv(sys.executable, [sys.executable, "-m", f"services.{service}", "--config", str(config)])


@app.command("storage")
def storage(config: ConfigOption) -> None:
    """Run the storage service in the foreground."""
    _exec_service("storage", config)


@app.command("replicator")
def replicator(config: ConfigOption) -> None:
    """Run the replicator in the foreground."""
    _exec_service("replicator", config)


@app.command("admin")
def admin(config: ConfigOption) -> None:
    """Run the admin service in the foreground."""
    _exec_service("admin", config)


# -- operations through the admin service ---------------------------------------------------

AdminNodeOption = Annotated[
    str, typer.Option("--node", help="HOST[:PORT] of the node's admin service (port 9925)")
]
OutputOption = Annotated[str, typer.Option("--output", "-o", help="table or json")]


def _execute(node: str, operation: dict[str, Any], username: str, password: str) -> Any:
    """Run a Harper JSON operation; print the error and exit with its gRPC code on failure."""
    if not password:
        _fail("no password: use --password or SHOAL_PASSWORD", 2)
    address = node if ":" in node else f"{node}:{DEFAULT_ADMIN_PORT}"
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            reply = stub.Execute(
                apb.ExecuteRequest(operation=orjson.dumps(operation)),
                metadata=basic_metadata(username, password),
                timeout=60,
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            _fail(f"{code.name}: {details}", int(code.value[0]) or 1)
            return None
    result = orjson.loads(reply.result)
    if reply.code:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        raise typer.Exit(reply.code)
    return result


def _print(result: Any, output: str, columns: list[str] | None = None) -> None:
    """JSON (stable, for scripts) or a table for people."""
    if output == "json" or columns is None or not isinstance(result, list):
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(*columns)
    for row in result:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console().print(table)


@app.command("op")
def op(
    operation: Annotated[str | None, typer.Argument(help="a Harper JSON operation")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="read the operation from a file")
    ] = None,
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Run any Harper-style operation, e.g. shoal op '{"operation": "describe_all"}'."""
    text = file.read_text() if file is not None else operation
    if not text:
        _fail("give the operation as an argument or with --file", 2)
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"not valid JSON: {exc}", 2)
        return
    _print(_execute(node, parsed, username, password), "json")


@cluster_app.command("status")
def cluster_status(
    node: AdminNodeOption = "127.0.0.1",
    output: OutputOption = "table",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Replication status of a node: one line per connection."""
    status = _execute(node, {"operation": "cluster_status"}, username, password)
    if output == "json":
        _print(status, "json")
        return
    rows = [
        {
            "peer": c["name"],
            "connected": c["connected"],
            "dialed": c["dialed"],
            "latency ms": round(c["latency"], 2),
            "back-pressure %": c["backPressurePercent"],
            "databases": ", ".join(s["database"] for s in c["database_sockets"]),
            "last error": c["lastConnectionError"] or "",
        }
        for c in status["connections"]
    ]
    typer.echo(f"node {status['node_name']}", err=True)
    _print(
        rows,
        output,
        ["peer", "connected", "dialed", "latency ms", "back-pressure %", "databases", "last error"],
    )


@routes_app.command("list")
def routes_list(
    node: AdminNodeOption = "127.0.0.1",
    output: OutputOption = "table",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """The node's routes."""
    routes = _execute(node, {"operation": "cluster_get_routes"}, username, password)
    _print(routes, output, ["hostname", "port"])


@routes_app.command("add")
def routes_add(
    routes: Annotated[list[str], typer.Argument(help="host names or URLs")],
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Add routes (persisted, applied at once); routes already there are skipped."""
    _print(
        _execute(node, {"operation": "cluster_set_routes", "routes": routes}, username, password),
        "json",
    )


@routes_app.command("remove")
def routes_remove(
    hostnames: Annotated[list[str], typer.Argument(help="host names")],
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Remove routes by host name."""
    body = {"operation": "cluster_delete_routes", "routes": hostnames}
    _print(_execute(node, body, username, password), "json")


# -- data ----------------------------------------------------------------------------------


def _stub(node: str) -> storage_pb2_grpc.StorageServiceStub:
    address = node if ":" in node else f"{node}:{DEFAULT_STORAGE_PORT}"
    return storage_pb2_grpc.StorageServiceStub(
        grpc.insecure_channel(address, options=channel_options())
    )


def _call(function: Any, request: Any, username: str, password: str, stream: bool = False) -> Any:
    """Call an RPC (reading a whole stream when ``stream``); exit with the gRPC code on error."""
    if not password:
        _fail("no password: use --password or SHOAL_PASSWORD", 2)
    try:
        reply = function(request, metadata=basic_metadata(username, password), timeout=30)
        return list(reply) if stream else reply
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        _fail(f"{code.name}: {details}", int(code.value[0]) or 1)


def _print_records(chunks: Any) -> None:
    for chunk in chunks:
        for record in chunk.records:
            sys.stdout.write(record.decode() + "\n")


@data_app.command("create-table")
def create_table(
    database: str,
    table: str,
    node: NodeOption = "127.0.0.1",
    primary_key: Annotated[str, typer.Option(help="primary key attribute")] = "id",
    index: Annotated[list[str] | None, typer.Option(help="attribute to index (repeatable)")] = None,
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Create a table (and its database when missing)."""
    request = pb.CreateTableRequest(
        database=database, table=table, primary_key=primary_key, indexed_attributes=index or []
    )
    reply = _call(_stub(node).CreateTable, request, username, password)
    typer.echo(
        f"created {database}.{reply.table.name} (primary key {reply.table.primary_key})", err=True
    )


@data_app.command("insert")
def insert(
    database: str,
    table: str,
    records: Annotated[list[str], typer.Argument(help="JSON objects")],
    node: NodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Insert records given as JSON objects."""
    payload = []
    for text in records:
        try:
            payload.append(orjson.dumps(json.loads(text)))
        except json.JSONDecodeError as exc:
            _fail(f"not valid JSON: {text!r} ({exc})", 2)
    reply = _call(
        _stub(node).Insert,
        pb.InsertRequest(database=database, table=table, records=payload),
        username,
        password,
    )
    sys.stdout.write(
        json.dumps(
            {
                "inserted": [orjson.loads(i) for i in reply.inserted_ids],
                "skipped": [orjson.loads(i) for i in reply.skipped_ids],
                "version": reply.version,
            }
        )
        + "\n"
    )


@data_app.command("get")
def get(
    database: str,
    table: str,
    ids: Annotated[list[str], typer.Argument(help="primary keys (numbers or strings)")],
    node: NodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Read records by primary key."""
    keys = []
    for text in ids:
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        keys.append(orjson.dumps(value))
    _print_records(
        _call(
            _stub(node).SearchById,
            pb.SearchByIdRequest(database=database, table=table, ids=keys),
            username,
            password,
            stream=True,
        )
    )


@data_app.command("search")
def search(
    database: str,
    table: str,
    attribute: str,
    value: Annotated[str, typer.Argument(help="JSON value, or text with * wildcards")],
    node: NodeOption = "127.0.0.1",
    limit: int = 0,
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Find records whose ATTRIBUTE equals VALUE (or matches a * pattern)."""
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    request = pb.SearchByValueRequest(
        database=database, table=table, attribute=attribute, value=orjson.dumps(parsed), limit=limit
    )
    _print_records(_call(_stub(node).SearchByValue, request, username, password, stream=True))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
