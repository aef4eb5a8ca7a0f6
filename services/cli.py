"""The ``shoal`` command line.

    shoal local up              a local cluster on 127.0.0.1..N (what `make run` does)
    shoal certs init            a CA (made once) and a node certificate signed by it
    shoal node start -c FILE    one node: its services as supervised processes
    shoal storage|replicator|admin -c FILE
                                one service in the foreground (containers use these)
    shoal data insert|get|search
                                talk to a node's storage service
    shoal op '<json>'           any Harper-style operation, through the admin service
    shoal backup create|restore a database's backup (tar.gz), point-in-time recovery
    shoal cluster status|nodes|add-node|remove-node|routes
                                cluster operations
    shoal user list|add|alter|drop, shoal role list
                                users and roles of a node

Credentials come from --username/--password or SHOAL_USERNAME / SHOAL_PASSWORD. A node
whose ports serve TLS is verified against the CA certificate given with ``shoal --ca FILE``,
SHOAL_CA or ``ca:`` in the CLI config; without one the CLI speaks plaintext. Data goes to
stdout (JSON, one record per line); messages go to stderr. Exit codes follow the gRPC
status of a failed call (e.g. 5 for NOT_FOUND, 16 for UNAUTHENTICATED).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import grpc
import orjson
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services import clone
from services.common import certs
from services.common.auth import basic_metadata
from services.common.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_HEALTH_ADMIN_PORT,
    DEFAULT_HEALTH_REPLICATOR_PORT,
    DEFAULT_HEALTH_STORAGE_PORT,
    DEFAULT_REPLICATION_PORT,
    DEFAULT_STORAGE_PORT,
    ConfigError,
    load_config,
)
from services.common.grpcserver import channel_options
from services.local import (
    SERVICES,
    PortsTaken,
    healthy,
    local_cluster_configs,
    local_password,
    local_username,
    pid_path,
    run_services,
    serving_on,
    write_cli_config,
)

CSV_CHUNK_BYTES = 256 * 1024
CA_ENV = "SHOAL_CA"
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
user_app = typer.Typer(help="Users of a node (never replicated).", no_args_is_help=True)
role_app = typer.Typer(help="Roles of a node (never replicated).", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.add_typer(role_app, name="role")
certs_app = typer.Typer(help="TLS certificates of nodes.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="path to shoal.yaml", exists=True)
]
NodeOption = Annotated[
    str,
    typer.Option("--node", envvar="SHOAL_NODE", help="HOST[:PORT] of the node's storage service"),
]
UserOption = Annotated[str, typer.Option("--username", "-u", envvar="SHOAL_USERNAME")]
PasswordOption = Annotated[str, typer.Option("--password", "-p", envvar="SHOAL_PASSWORD")]


CLI_CONFIG_KEYS = {
    "node": "SHOAL_NODE",
    "username": "SHOAL_USERNAME",
    "password": "SHOAL_PASSWORD",
    "ca": CA_ENV,
}


def cli_config_path() -> Path:
    """$SHOAL_CLI_CONFIG, else ~/.config/shoal/cli.yaml."""
    default = Path.home() / ".config" / "shoal" / "cli.yaml"
    return Path(os.environ.get("SHOAL_CLI_CONFIG", default))


@app.callback()
def defaults(
    ca: Annotated[
        Path | None,
        typer.Option(
            "--ca",
            envvar=CA_ENV,
            help="CA certificate (PEM) to verify nodes whose ports serve TLS",
        ),
    ] = None,
) -> None:
    """Shoal's command line. Node and credentials come from flags, else the environment
    (SHOAL_NODE, SHOAL_USERNAME, SHOAL_PASSWORD, SHOAL_CA), else ~/.config/shoal/cli.yaml
    (`node:`, `username:`, `password:`, `ca:`; keep it private, mode 0600). With a CA
    (`--ca`, before the command), the CLI speaks TLS and verifies the node with it."""
    if ca is not None:
        os.environ[CA_ENV] = str(ca)
    path = cli_config_path()
    if not path.is_file():
        return
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        _fail(f"{path}: not valid YAML: {exc}", 2)
    if not isinstance(values, dict) or not set(values) <= set(CLI_CONFIG_KEYS):
        _fail(f"{path}: expected a mapping with {', '.join(CLI_CONFIG_KEYS)}", 2)
    for key, env in CLI_CONFIG_KEYS.items():
        if key in values and env not in os.environ:
            value = str(values[key])
            if key == "ca":  # relative to the CLI config's folder
                value = str(path.parent / Path(value).expanduser())
            os.environ[env] = value


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"shoal: {message}", err=True)
    raise typer.Exit(code)


def _trusted(extra: bytes = b"") -> bytes | None:
    """The CA certificates the CLI verifies nodes with (SHOAL_CA, set by --ca or the CLI
    config, plus ``extra``); None: speak plaintext."""
    name = os.environ.get(CA_ENV)
    pem = b""
    if name:
        try:
            pem = Path(name).read_bytes()
        except OSError as exc:
            _fail(f"cannot read the CA certificate {name} (--ca / {CA_ENV}): {exc.strerror}", 2)
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            _fail(f"{name} (--ca / {CA_ENV}) holds no PEM certificate", 2)
    if extra:
        pem = pem.rstrip(b"\n") + b"\n" + extra if pem else extra
    return pem or None


def _channel(address: str, extra_ca: bytes = b"") -> grpc.Channel:
    """A channel to a node's port: TLS verified with the CLI's CA when it has one."""
    trusted = _trusted(extra_ca)
    if trusted is None:
        return grpc.insecure_channel(address, options=channel_options())
    credentials = grpc.ssl_channel_credentials(root_certificates=trusted)
    return grpc.secure_channel(address, credentials, options=channel_options())


def _explain(code: grpc.StatusCode, details: str) -> str:
    """An error message, with what to check when the node could not be reached."""
    message = f"{code.name}: {details}"
    if code != grpc.StatusCode.UNAVAILABLE:
        return message
    if os.environ.get(CA_ENV):
        return (
            f"{message} (is the node running? It must present a certificate signed by the"
            f" CA in {os.environ[CA_ENV]} that names the host dialed)"
        )
    return (
        f"{message} (is the node running? If its ports serve TLS, give its CA certificate"
        f" with --ca FILE or {CA_ENV})"
    )


@local_app.command("up")
def local_up(
    nodes: Annotated[int, typer.Option(min=1, max=9, help="number of nodes")] = 3,
    data: Annotated[Path, typer.Option(help="folder for the nodes' data and configs")] = Path(
        "data"
    ),
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="new nodes replicate in plain text (port 9932, development only)"
            " instead of mutual TLS with generated certificates",
        ),
    ] = False,
) -> None:
    """Start a cluster of NODES nodes on 127.0.0.1..N (full mesh) and run until Ctrl-C.
    New nodes get certificates from a CA made in DATA/ca (see docs/security.md)."""
    password = local_password(data)
    try:
        paths = local_cluster_configs(data, nodes, tls=not insecure)
    except certs.CertificateError as exc:
        _fail(str(exc), 2)
        return
    try:
        configs = [load_config(p) for p in paths]
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    secure = all(c.tls.certificate is not None for c in configs)
    cli_config = write_cli_config(data, password, tls=secure, username=local_username(configs[0]))
    typer.echo(f"starting {nodes} nodes in {data}/ ...", err=True)
    try:
        supervisor = run_services(paths, SERVICES, {"SHOAL_ADMIN_PASSWORD": password}, logs=True)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    except PortsTaken as exc:
        _fail(str(exc), 6)  # ALREADY_EXISTS
        return
    hosts = ", ".join(f"127.0.0.{i}" for i in range(1, nodes + 1))
    if secure:
        ports = (
            f"storage :{DEFAULT_STORAGE_PORT} and admin :{DEFAULT_ADMIN_PORT} (TLS)"
            "   replication :9933 (mutual TLS)"
        )
    else:
        ports = (
            f"storage :{DEFAULT_STORAGE_PORT} and admin :{DEFAULT_ADMIN_PORT} (plaintext)"
            "   replication :9932 (plaintext)"
        )
    held = " and the CA" if secure else ""
    typer.echo(
        f"""
Shoal is running: {nodes} nodes on {hosts}
  {ports}
  logs in {data}/node*/*.log

Try it (in another terminal; {cli_config} holds the node, the admin password{held}):
  export SHOAL_CLI_CONFIG={cli_config}
  .venv/bin/shoal cluster status
  .venv/bin/shoal data create-table --node 127.0.0.1 dev dog
  .venv/bin/shoal data insert --node 127.0.0.1 dev dog '{{"id": 1, "name": "Penny"}}'
  .venv/bin/shoal data get --node 127.0.0.{nodes} dev dog 1

Ctrl-C stops the cluster.""",
        err=True,
    )
    supervisor.run_until_signalled()
    typer.echo("stopped", err=True)


@certs_app.command("init")
def certs_init(
    data: Annotated[Path, typer.Option(help="the node's rootPath (keys go to DATA/keys)")],
    name: Annotated[str, typer.Option(help="the node's name (replication.hostname)")],
    ca_dir: Annotated[
        Path | None,
        typer.Option(help="CA folder (ca.key, ca.crt), made when empty; default DATA/ca"),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option(help="another DNS name or IP address of the node (repeatable)"),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="replace an existing node certificate and key")
    ] = False,
) -> None:
    """Make (or reuse) a CA and issue a node certificate signed by it; prints the tls
    section for the node's shoal.yaml."""
    keys = data / "keys"
    if not force and (keys / certs.NODE_CERT_FILE).exists():
        _fail(f"{keys / certs.NODE_CERT_FILE} exists; --force replaces it", 2)
    try:
        authority = certs.ensure_authority(ca_dir or data / "ca", f"Shoal-CA-{name}")
        files = certs.ensure_node_files(keys, authority, name, san or [], replace=True)
    except (certs.CertificateError, OSError) as exc:
        _fail(str(exc), 2)
        return
    section = {
        "tls": {
            "certificate": str(files.certificate.relative_to(data)),
            "privateKey": str(files.private_key.relative_to(data)),
            "certificateAuthority": str(files.certificate_authority.relative_to(data)),
        }
    }
    typer.echo(f"node certificate for {name} in {keys}/; add to {data}/shoal.yaml:", err=True)
    typer.echo(yaml.safe_dump(section, sort_keys=False), nl=False)


@node_app.command("start")
def node_start(config: ConfigOption) -> None:
    """Run one node's services (storage, replicator, admin) until Ctrl-C, SIGTERM or
    `shoal node stop`."""
    try:
        supervisor = run_services([config], SERVICES, {}, logs=False)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    except PortsTaken as exc:
        _fail(str(exc), 6)  # ALREADY_EXISTS
        return
    pid_file = pid_path(load_config(config))
    pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
    try:
        supervisor.run_until_signalled()
    finally:
        pid_file.unlink(missing_ok=True)


@node_app.command("stop")
def node_stop(
    config: ConfigOption,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the services")] = 60.0,
) -> None:
    """Stop a node started with `shoal node start` (SIGTERM: in-flight work finishes)."""
    try:
        pid_file = pid_path(load_config(config))
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    if not pid_file.exists():
        _fail(f"no node runs from {config} (no {pid_file})", 5)
    pid = int(pid_file.read_text(encoding="utf-8").strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        _fail(f"process {pid} is gone; removed the stale {pid_file}", 5)
    deadline = time.monotonic() + timeout
    while pid_file.exists():
        if time.monotonic() > deadline:
            _fail(f"the node (process {pid}) did not stop within {timeout:.0f}s", 4)
        time.sleep(0.1)
    typer.echo("stopped", err=True)


@node_app.command("status")
def node_status(
    node: Annotated[
        str, typer.Option("--node", envvar="SHOAL_NODE", help="HOST of the node")
    ] = "127.0.0.1",
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """Whether each service of a node serves (gRPC health on its plaintext health port,
    else on its main port); exit 14 when one does not."""
    ports = {
        "storage": (DEFAULT_HEALTH_STORAGE_PORT, DEFAULT_STORAGE_PORT),
        "replicator": (DEFAULT_HEALTH_REPLICATOR_PORT, DEFAULT_REPLICATION_PORT),
        "admin": (DEFAULT_HEALTH_ADMIN_PORT, DEFAULT_ADMIN_PORT),
    }
    rows = []
    for name, (health_port, main_port) in ports.items():
        address, serving = f"{node}:{health_port}", healthy(f"{node}:{health_port}")
        if not serving:
            address = f"{node}:{main_port}"
            with _channel(address) as channel:
                serving = serving_on(channel)
        rows.append({"service": name, "address": address, "serving": serving})
    _print(rows, output, ["service", "address", "serving"])
    if not all(r["serving"] for r in rows):
        raise typer.Exit(int(grpc.StatusCode.UNAVAILABLE.value[0]))


@node_app.command("clone")
def node_clone(
    source: Annotated[str, typer.Option("--from", help="HOST of a running node to clone")],
    hostname: Annotated[str, typer.Option(help="the new node's name and address")],
    data: Annotated[Path, typer.Option(help="empty folder for the new node")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for the copy")] = 600.0,
    ca_dir: Annotated[
        Path | None,
        typer.Option(
            help="the cluster's CA folder (ca.key, ca.crt): the new node gets a certificate"
            " from it (e.g. data/ca for `make run`); without, it generates its own CA"
        ),
    ] = None,
    shard: Annotated[
        int | None,
        typer.Option(
            help="the new node's replication.shard (none without): the source's sharded"
            " databases are copied only into the source's own shard"
        ),
    ] = None,
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Make a new node from a running one: its configuration, schema and data; then run it
    as a member of the cluster until Ctrl-C."""
    source_config = _execute(source, {"operation": "get_configuration"}, username, password)
    source_name = str((source_config.get("replication") or {}).get("hostname") or source)
    config = clone.clone_config(source_config, source_name, hostname, shard)
    # The source's sharded databases do not flow into another shard: not waited for.
    described = set(_execute(source, {"operation": "describe_all"}, username, password))
    wanted = described - clone.withheld(source_config, config)
    try:
        if clone.exists(data):
            raise FileExistsError(f"{data / clone.CONFIG_FILE} exists: clone into an empty folder")
        if ca_dir is not None:
            config["tls"] = clone.issue_certificate(data, ca_dir, hostname)
        elif clone.secure(source_config):
            typer.echo(
                f"{hostname} will generate its own CA: members refuse its replication"
                " connections until it has a certificate of the cluster's CA (--ca-dir)",
                err=True,
            )
        path = clone.write_config(data, config, source_name)
    except FileExistsError as exc:
        _fail(str(exc), 6)
        return
    except (certs.CertificateError, OSError) as exc:
        _fail(f"cannot issue a certificate for {hostname} from {ca_dir}: {exc}", 2)
        return
    typer.echo(f"wrote {path}; starting {hostname} ...", err=True)
    env = {"SHOAL_ADMIN_USERNAME": username, "SHOAL_ADMIN_PASSWORD": password}
    try:
        supervisor = run_services([path], SERVICES, env, logs=True)
    except ConfigError as exc:
        _fail(str(exc), 2)
        return
    except PortsTaken as exc:
        _fail(str(exc), 6)  # ALREADY_EXISTS
        return
    try:
        body = {"operation": "add_node", "hostname": hostname}
        result, code = _try_execute(source, body, username, password)
        if code not in (0, int(grpc.StatusCode.ALREADY_EXISTS.value[0])):
            _fail(f"add_node on {source_name} failed: {result}", code)
        ready = _follow_clone(
            hostname, source_name, wanted, timeout, username, password, clone.ca_path(data)
        )
    except BaseException:
        supervisor.stop_all()
        raise
    if ready:
        typer.echo(
            f"{hostname} is a member, caught up with {source_name}; Ctrl-C stops it", err=True
        )
    else:
        typer.echo(f"{hostname} is still copying after {timeout:.0f}s; it carries on", err=True)
    supervisor.run_until_signalled()


def _follow_clone(
    hostname: str,
    source: str,
    wanted: set[str],
    timeout: float,
    username: str,
    password: str,
    node_ca: Path,
) -> bool:
    """Show the copy's progress until the new node is caught up; the new node is trusted
    with its own CA (``node_ca``) besides the CLI's."""

    def read_status() -> dict[str, Any]:
        extra = node_ca.read_bytes() if node_ca.exists() else b""
        body = {"operation": "cluster_status"}
        result, code = _try_execute(hostname, body, username, password, extra)
        if code:
            raise RuntimeError(result)
        return dict(result)

    with Progress(
        TextColumn("copying from " + source),
        BarColumn(),
        TextColumn("{task.fields[rows]} rows"),
        TextColumn("{task.fields[databases]}"),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task("copy", total=None, rows="0", databases="")

        def report(state: clone.CopyProgress) -> None:
            done = sorted((state.databases or set()) & wanted)
            total = max(state.estimated_rows, state.rows)
            bar.update(
                task,
                completed=state.rows,
                total=total or None,
                rows=f"{state.rows:,} / {total:,}" if total else f"{state.rows:,}",
                databases=f"{len(done)}/{len(wanted)} databases",
            )

        ready = clone.follow(read_status, source, wanted, report, timeout)
        if ready:
            extra = node_ca.read_bytes() if node_ca.exists() else b""
            described, code = _try_execute(
                hostname, {"operation": "describe_all"}, username, password, extra
            )
            rows = int(bar.tasks[0].completed)
            if not code and isinstance(described, dict):
                rows = max(rows, clone.held_rows(described, wanted))
            bar.update(task, total=max(rows, 1), completed=max(rows, 1), rows=f"{rows:,}")
    return ready


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
    str,
    typer.Option(
        "--node", envvar="SHOAL_NODE", help="HOST[:PORT] of the node's admin service (port 9925)"
    ),
]
OutputOption = Annotated[str, typer.Option("--output", "-o", help="table or json")]


def _try_execute(
    node: str, operation: dict[str, Any], username: str, password: str, extra_ca: bytes = b""
) -> tuple[Any, int]:
    """Run a Harper JSON operation: (result or {"error": ...}, gRPC code); ``extra_ca``
    is trusted besides the CLI's CA."""
    if not password:
        _fail("no password: use --password or SHOAL_PASSWORD", 2)
    address = node if ":" in node else f"{node}:{DEFAULT_ADMIN_PORT}"
    with _channel(address, extra_ca) as channel:
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
            return {"error": _explain(code, details or "")}, int(code.value[0]) or 1
    return orjson.loads(reply.result), reply.code


def _execute(node: str, operation: dict[str, Any], username: str, password: str) -> Any:
    """Run a Harper JSON operation; print the error and exit with its gRPC code on failure."""
    result, code = _try_execute(node, operation, username, password)
    if code:
        typer.echo(f"shoal: {result.get('error', result)}", err=True)
        raise typer.Exit(code)
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
            "log margin": _duration(c.get("logMarginSeconds")),
            "shard": "" if c.get("shard") is None else c["shard"],
            "databases": ", ".join(s["database"] for s in c["database_sockets"]),
            "last error": c["lastConnectionError"] or "",
        }
        for c in status["connections"]
    ]
    shard = status.get("shard")
    typer.echo(
        f"node {status['node_name']}" + ("" if shard is None else f" (shard {shard})"), err=True
    )
    _print(
        rows,
        output,
        [
            "peer",
            "connected",
            "dialed",
            "latency ms",
            "back-pressure %",
            "log margin",
            "shard",
            "databases",
            "last error",
        ],
    )


def _duration(seconds: float | None) -> str:
    """A log margin for people: '2d 4h', '35m', 'copy needed'; empty when unknown."""
    if seconds is None:
        return ""
    if seconds <= 0:
        return "copy needed"
    minutes = int(seconds // 60)
    days, hours, mins = minutes // 1440, minutes // 60 % 24, minutes % 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {mins}m"
    return f"{mins}m" if mins else f"{int(seconds)}s"


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


@cluster_app.command("nodes")
def cluster_nodes(
    node: AdminNodeOption = "127.0.0.1",
    output: OutputOption = "table",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """The members of the cluster (system.hdb_nodes) as this node knows them."""
    body = {
        "operation": "search_by_value",
        "database": "system",
        "table": "hdb_nodes",
        "attribute": "name",
        "value": "*",
    }
    rows = _execute(node, body, username, password)
    for row in rows:
        flows = row.get("replicates", True)
        row["replicates"] = (
            flows
            if isinstance(flows, bool)
            else "/".join(k for k in ("sends", "receives") if flows.get(k))
        )
        row["subscriptions"] = len(row.get("subscriptions") or [])
    _print(rows, output, ["name", "url", "replicates", "subscriptions", "shard"])


@cluster_app.command("add-node")
def cluster_add_node(
    hostname: Annotated[str, typer.Argument(help="the new node's name (the host peers dial)")],
    url: Annotated[
        str | None, typer.Option(help="how to reach it, e.g. shoals://HOST:9933")
    ] = None,
    sends: Annotated[bool, typer.Option(help="send data to it")] = True,
    receives: Annotated[bool, typer.Option(help="receive its data")] = True,
    shard: Annotated[int | None, typer.Option(help="its shard")] = None,
    start_time: Annotated[
        str | None, typer.Option(help="ISO time: start there instead of copying")
    ] = None,
    join_user: Annotated[
        str | None,
        typer.Option(
            help="join with temporary credentials: run this on the NEW node (--node);"
            " HOSTNAME is then the member that signs its certificate, and this is a super"
            " user there (used once, never stored)"
        ),
    ] = None,
    join_password: Annotated[
        str | None,
        typer.Option(envvar="SHOAL_JOIN_PASSWORD", help="the --join-user's password"),
    ] = None,
    verify_tls: Annotated[
        bool,
        typer.Option(
            help="with --join-user: check the member's certificate against this node's"
            " CAs; --no-verify-tls trusts the certificate it presents for this one call"
        ),
    ] = True,
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Add a node to the cluster; every member learns of it and connects."""
    body: dict[str, Any] = {"operation": "add_node", "hostname": hostname}
    if join_user:
        if not join_password:
            _fail("--join-user needs --join-password or SHOAL_JOIN_PASSWORD", 2)
        body["authorization"] = {"username": join_user, "password": join_password}
        body["verify_tls"] = verify_tls
    if url:
        body["url"] = url
    if not (sends and receives):
        body["replicates"] = {"sends": sends, "receives": receives}
    if shard is not None:
        body["shard"] = shard
    if start_time:
        body["start_time"] = start_time
    _print(_execute(node, body, username, password), "json")


@cluster_app.command("remove-node")
def cluster_remove_node(
    hostname: Annotated[str, typer.Argument(help="the member to remove")],
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Remove a node from the cluster; every member drops its connections with it."""
    body = {"operation": "remove_node", "hostname": hostname}
    _print(_execute(node, body, username, password), "json")


@cluster_app.command("rebalance")
def cluster_rebalance(
    database: Annotated[
        str | None, typer.Argument(help="a database with replicateTo (default: all)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="only count what would move")] = False,
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Move records to where the current members would place them (residency), on every
    member; progress in `cluster status -o json` (residency.rebalance)."""
    body: dict[str, Any] = {"operation": "rebalance", "dry_run": dry_run}
    if database:
        body["database"] = database
    _print(_execute(node, body, username, password), "json")


# -- users and roles --------------------------------------------------------------------


@user_app.command("list")
def user_list(
    node: AdminNodeOption = "127.0.0.1",
    output: OutputOption = "table",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """The node's users (users are local to each node)."""
    users = _execute(node, {"operation": "list_users"}, username, password)
    for user in users:
        user["role"] = user["role"].get("role", "") if isinstance(user["role"], dict) else ""
    _print(users, output, ["username", "role", "active"])


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Option(help="role name (super_user, or one of `role list`)")],
    new_password: Annotated[
        str,
        typer.Option(
            "--new-password",
            envvar="SHOAL_NEW_PASSWORD",
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="the new user's password (prompted when not given)",
        ),
    ],
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Add a user to the node."""
    body = {"operation": "add_user", "username": name, "password": new_password, "role": role}
    _print(_execute(node, body, username, password), "json")


@user_app.command("alter")
def user_alter(
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str | None, typer.Option(help="new role")] = None,
    active: Annotated[
        bool | None, typer.Option("--active/--inactive", help="allow or block sign-in")
    ] = None,
    new_password: Annotated[
        str | None,
        typer.Option("--new-password", envvar="SHOAL_NEW_PASSWORD", help="new password"),
    ] = None,
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Change a user's role, password or whether it may sign in."""
    body: dict[str, Any] = {"operation": "alter_user", "username": name}
    if role is not None:
        body["role"] = role
    if active is not None:
        body["active"] = active
    if new_password is not None:
        body["password"] = new_password
    if len(body) == 2:
        _fail("nothing to change: give --role, --active/--inactive or --new-password", 2)
    _print(_execute(node, body, username, password), "json")


@user_app.command("drop")
def user_drop(
    name: Annotated[str, typer.Argument(help="user name")],
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Remove a user from the node."""
    _print(_execute(node, {"operation": "drop_user", "username": name}, username, password), "json")


@role_app.command("list")
def role_list(
    node: AdminNodeOption = "127.0.0.1",
    output: OutputOption = "json",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """The node's roles and their permissions."""
    roles = _execute(node, {"operation": "list_roles"}, username, password)
    for role in roles:
        role["super_user"] = bool(role["permission"].get("super_user"))
    _print(roles, output, ["role", "super_user"])


# -- backups -------------------------------------------------------------------------------

backup_app = typer.Typer(
    help="Backups of a database (through a node's admin service).", no_args_is_help=True
)
app.add_typer(backup_app, name="backup")
BACKUP_CHUNK = 1024 * 1024


def _admin_call(node: str, password: str) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    if not password:
        _fail("no password: use --password or SHOAL_PASSWORD", 2)
    address = node if ":" in node else f"{node}:{DEFAULT_ADMIN_PORT}"
    channel = _channel(address)
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def _rpc_failed(exc: grpc.RpcError) -> None:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    _fail(_explain(code, details or ""), int(code.value[0]) or 1)


def _positions_json(positions: Any) -> list[dict[str, Any]]:
    return [{"origin": p.origin, "version": p.version} for p in positions]


def _bytes_progress(label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed:,} bytes"),
        console=Console(stderr=True),
        transient=True,
    )


@backup_app.command("create")
def backup_create(
    database: Annotated[str, typer.Option("--database", "-d", help="database to back up")],
    out: Annotated[Path, typer.Option("--out", help="the .tar.gz file to write (never replaced)")],
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Stream a consistent backup of DATABASE into a file; prints what it holds as JSON."""
    if out.exists():
        _fail(f"{out} exists; choose another file", 6)
    partial = out.with_name(out.name + ".partial")
    channel, stub = _admin_call(node, password)
    info = None
    try:
        with channel, partial.open("wb") as file, _bytes_progress("backup") as bar:
            task = bar.add_task("backup", total=None)
            stream = stub.GetBackup(
                apb.GetBackupRequest(database=database),
                metadata=basic_metadata(username, password),
            )
            for message in stream:
                file.write(message.chunk)
                bar.advance(task, len(message.chunk))
                if message.HasField("info"):
                    info = message.info
        if info is None:
            _fail("the node ended the backup without saying what it holds", 1)
            return
        partial.rename(out)
    except grpc.RpcError as exc:
        _rpc_failed(exc)
    finally:
        partial.unlink(missing_ok=True)
    assert info is not None
    summary = {
        "file": str(out),
        "database": info.database,
        "node_name": info.node_name,
        "taken_at": info.taken_at_ms,
        "rows": info.rows,
        "transactions": info.transactions,
        "size": info.size_bytes,
        "sha256": info.sha256,
        "positions": _positions_json(info.positions),
        "horizons": _positions_json(info.horizons),
    }
    _print(summary, "json")


@backup_app.command("restore")
def backup_restore(
    file: Annotated[Path, typer.Argument(help="a backup (.tar.gz)", exists=True, dir_okay=False)],
    until: Annotated[
        int | None, typer.Option("--until", help="restore the state as of this Unix ms time")
    ] = None,
    log: Annotated[
        Path | None,
        typer.Option(
            "--log", help="a later backup whose log is replayed", exists=True, dir_okay=False
        ),
    ] = None,
    database: Annotated[str, typer.Option(help="restore under this database name")] = "",
    node: AdminNodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Restore a backup into a node where its database does not exist or has no rows."""
    header = apb.RestoreBackupHeader(database=database)
    if until is not None:
        header.until_ms = until
    total = file.stat().st_size + (log.stat().st_size if log is not None else 0)
    channel, stub = _admin_call(node, password)
    with channel, _bytes_progress("restore") as bar:
        task = bar.add_task("restore", total=total)

        def requests() -> Any:
            yield apb.RestoreBackupRequest(header=header)
            for path, is_log in ((file, False), (log, True)):
                if path is None:
                    continue
                with path.open("rb") as source:
                    while chunk := source.read(BACKUP_CHUNK):
                        if is_log:
                            yield apb.RestoreBackupRequest(log_chunk=chunk)
                        else:
                            yield apb.RestoreBackupRequest(chunk=chunk)
                        bar.advance(task, len(chunk))

        try:
            response = stub.RestoreBackup(requests(), metadata=basic_metadata(username, password))
        except grpc.RpcError as exc:
            _rpc_failed(exc)
            return
    mode = apb.RestoreMode.Name(response.mode).removeprefix("RESTORE_MODE_").lower()
    result = {
        "database": response.database,
        "mode": mode,
        "rows": response.rows,
        "logged_transactions": response.logged_transactions,
        "replayed_transactions": response.replayed_transactions,
        "positions": _positions_json(response.positions),
    }
    _print(result, "json")


# -- data ----------------------------------------------------------------------------------


def _stub(node: str) -> storage_pb2_grpc.StorageServiceStub:
    address = node if ":" in node else f"{node}:{DEFAULT_STORAGE_PORT}"
    return storage_pb2_grpc.StorageServiceStub(_channel(address))


def _call(
    function: Any,
    request: Any,
    username: str,
    password: str,
    stream: bool = False,
    timeout: float = 30.0,
) -> Any:
    """Call an RPC (reading a whole stream when ``stream``); exit with the gRPC code on error."""
    if not password:
        _fail("no password: use --password or SHOAL_PASSWORD", 2)
    try:
        reply = function(request, metadata=basic_metadata(username, password), timeout=timeout)
        return list(reply) if stream else reply
    except grpc.RpcError as exc:
        _rpc_failed(exc)


def _print_records(chunks: Any) -> int:
    """Print every record; how many there were."""
    printed = 0
    for chunk in chunks:
        for record in chunk.records:
            sys.stdout.write(record.decode() + "\n")
            printed += 1
    return printed


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
    found = _print_records(
        _call(
            _stub(node).SearchById,
            pb.SearchByIdRequest(database=database, table=table, ids=keys),
            username,
            password,
            stream=True,
        )
    )
    wanted = len(set(keys))
    if found < wanted:
        # As for any failed call: the gRPC status code (NOT_FOUND) is the exit status.
        _fail(
            f"{wanted - found} of {wanted} ids not found in {database}.{table}",
            int(grpc.StatusCode.NOT_FOUND.value[0]),
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


@data_app.command("load-csv")
def load_csv(
    database: str,
    table: str,
    file: Annotated[Path, typer.Argument(help="CSV file; the first row names the columns")],
    action: Annotated[str, typer.Option(help="insert, update or upsert")] = "insert",
    node: NodeOption = "127.0.0.1",
    username: UserOption = "admin",
    password: PasswordOption = "",
) -> None:
    """Load a CSV file into a table, streamed in chunks (progress on stderr)."""
    operations = {
        "insert": types_pb2.OPERATION_INSERT,
        "update": types_pb2.OPERATION_UPDATE,
        "upsert": types_pb2.OPERATION_UPSERT,
    }
    if action not in operations:
        _fail(f"--action must be insert, update or upsert, not {action!r}", 2)
    if not file.is_file():
        _fail(f"{file} is not a file", 5)
    size = file.stat().st_size
    header = pb.LoadCsvHeader(database=database, table=table, operation=operations[action])

    def requests(advance: Any) -> Any:
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
        task = bar.add_task("load", total=size)
        reply = _call(
            _stub(node).LoadCsv,
            requests(lambda n: bar.advance(task, n)),
            username,
            password,
            timeout=3600,
        )
    sys.stdout.write(
        json.dumps(
            {
                "rows": reply.rows,
                "written": reply.written,
                "skipped": reply.skipped,
                "failed": reply.failed,
                "errors": [{"line": e.line, "message": e.message} for e in reply.errors],
            }
        )
        + "\n"
    )
    if reply.failed:
        raise typer.Exit(int(grpc.StatusCode.INVALID_ARGUMENT.value[0]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
