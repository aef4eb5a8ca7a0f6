"""``shoal node``: run, stop, check and clone one node; and ``shoal storage|replicator|admin``,
one service in the foreground (containers use these)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from services import clone
from services.cli.app import app
from services.cli.calls import channel, execute, try_execute
from services.cli.output import Output, OutputOption, emit, fail
from services.cli.settings import ConfigOption, HostOption, Settings, connected
from services.common import certs
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
from services.local import SERVICES, PortsTaken, healthy, pid_path, run_services, serving_on

node_app = typer.Typer(help="Run a node.", no_args_is_help=True)


@node_app.command("start")
def node_start(config: ConfigOption) -> None:
    """Run one node's services (storage, replicator, admin) until Ctrl-C, SIGTERM or
    `shoal node stop`."""
    try:
        supervisor = run_services([config], SERVICES, {}, logs=False)
    except ConfigError as exc:
        fail(str(exc), 2)
    except PortsTaken as exc:
        fail(str(exc), 6)  # ALREADY_EXISTS
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
        fail(str(exc), 2)
    if not pid_file.exists():
        fail(f"no node runs from {config} (no {pid_file})", 5)
    pid = int(pid_file.read_text(encoding="utf-8").strip())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        fail(f"process {pid} is gone; removed the stale {pid_file}", 5)
    deadline = time.monotonic() + timeout
    while pid_file.exists():
        if time.monotonic() > deadline:
            fail(f"the node (process {pid}) did not stop within {timeout:.0f}s", 4)
        time.sleep(0.1)
    typer.echo("stopped", err=True)


@node_app.command("status")
@connected(HostOption, credentials=False)
def node_status(settings: Settings, output: OutputOption = Output.table) -> None:
    """Whether each service of a node serves (gRPC health on its plaintext health port,
    else on its main port); exit 14 when one does not."""
    ports = {
        "storage": (DEFAULT_HEALTH_STORAGE_PORT, DEFAULT_STORAGE_PORT),
        "replicator": (DEFAULT_HEALTH_REPLICATOR_PORT, DEFAULT_REPLICATION_PORT),
        "admin": (DEFAULT_HEALTH_ADMIN_PORT, DEFAULT_ADMIN_PORT),
    }
    node = settings.node
    rows = []
    for name, (health_port, main_port) in ports.items():
        address, serving = f"{node}:{health_port}", healthy(f"{node}:{health_port}")
        if not serving:
            address = f"{node}:{main_port}"
            with channel(settings, address) as open_channel:
                serving = serving_on(open_channel)
        rows.append({"service": name, "address": address, "serving": serving})
    emit(rows, output, ["service", "address", "serving"])
    if not all(r["serving"] for r in rows):
        raise typer.Exit(int(grpc.StatusCode.UNAVAILABLE.value[0]))


@node_app.command("clone")
@connected(None)
def node_clone(
    settings: Settings,
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
) -> None:
    """Make a new node from a running one: its configuration, schema and data; then run it
    as a member of the cluster until Ctrl-C."""
    at_source = dataclasses.replace(settings, node=source)
    source_config = execute(at_source, {"operation": "get_configuration"})
    source_name = str((source_config.get("replication") or {}).get("hostname") or source)
    config = clone.clone_config(source_config, source_name, hostname, shard)
    # The source's sharded databases do not flow into another shard: not waited for.
    described = set(execute(at_source, {"operation": "describe_all"}))
    wanted = described - clone.withheld(source_config, config)
    path = _write_clone(data, config, source_config, source_name, hostname, ca_dir)
    typer.echo(f"wrote {path}; starting {hostname} ...", err=True)
    env = {"SHOAL_ADMIN_USERNAME": settings.username, "SHOAL_ADMIN_PASSWORD": settings.password}
    try:
        supervisor = run_services([path], SERVICES, env, logs=True)
    except ConfigError as exc:
        fail(str(exc), 2)
    except PortsTaken as exc:
        fail(str(exc), 6)  # ALREADY_EXISTS
    try:
        body = {"operation": "add_node", "hostname": hostname}
        result, code = try_execute(at_source, body)
        if code not in (0, int(grpc.StatusCode.ALREADY_EXISTS.value[0])):
            fail(f"add_node on {source_name} failed: {result}", code)
        at_new = dataclasses.replace(settings, node=hostname)
        ready = _follow_clone(at_new, source_name, wanted, timeout, clone.ca_path(data))
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


def _write_clone(
    data: Path,
    config: dict[str, Any],
    source_config: dict[str, Any],
    source_name: str,
    hostname: str,
    ca_dir: Path | None,
) -> Path:
    """Write the new node's shoal.yaml (and its certificate, from ``ca_dir``) into the
    empty folder ``data``; exits when it cannot."""
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
        return clone.write_config(data, config, source_name)
    except FileExistsError as exc:
        fail(str(exc), 6)
    except (certs.CertificateError, OSError) as exc:
        fail(f"cannot issue a certificate for {hostname} from {ca_dir}: {exc}", 2)


def _follow_clone(
    settings: Settings, source: str, wanted: set[str], timeout: float, node_ca: Path
) -> bool:
    """Show the copy's progress until the new node (``settings.node``) is caught up; the
    new node is trusted with its own CA (``node_ca``) besides the CLI's."""

    def node_execute(operation: dict[str, Any]) -> tuple[Any, int]:
        extra = node_ca.read_bytes() if node_ca.exists() else b""
        return try_execute(settings, operation, extra)

    def read_status() -> dict[str, Any]:
        result, code = node_execute({"operation": "cluster_status"})
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
            described, code = node_execute({"operation": "describe_all"})
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
