"""``shoal local``: a local cluster on loopback addresses (what `make run` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from services.cli.output import fail
from services.common import certs
from services.common.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_STORAGE_PORT,
    ConfigError,
    load_config,
)
from services.local import (
    SERVICES,
    PortsTaken,
    local_cluster_configs,
    local_password,
    local_username,
    run_services,
    write_cli_config,
)

local_app = typer.Typer(help="A local cluster on loopback addresses.", no_args_is_help=True)


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
        fail(str(exc), 2)
    try:
        configs = [load_config(p) for p in paths]
    except ConfigError as exc:
        fail(str(exc), 2)
    secure = all(c.tls.certificate is not None for c in configs)
    cli_config = write_cli_config(data, password, tls=secure, username=local_username(configs[0]))
    typer.echo(f"starting {nodes} nodes in {data}/ ...", err=True)
    try:
        supervisor = run_services(paths, SERVICES, {"SHOAL_ADMIN_PASSWORD": password}, logs=True)
    except ConfigError as exc:
        fail(str(exc), 2)
    except PortsTaken as exc:
        fail(str(exc), 6)  # ALREADY_EXISTS
    typer.echo(_running(nodes, data, secure, cli_config), err=True)
    supervisor.run_until_signalled()
    typer.echo("stopped", err=True)


def _running(nodes: int, data: Path, secure: bool, cli_config: Path) -> str:
    """What `local up` tells once the cluster runs: where, and how to try it."""
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
    return f"""
Shoal is running: {nodes} nodes on {hosts}
  {ports}
  logs in {data}/node*/*.log

Try it (in another terminal; {cli_config} holds the node, the admin password{held}):
  export SHOAL_CLI_CONFIG={cli_config}
  .venv/bin/shoal cluster status
  .venv/bin/shoal data create-table --node 127.0.0.1 dev dog
  .venv/bin/shoal data insert --node 127.0.0.1 dev dog '{{"id": 1, "name": "Penny"}}'
  .venv/bin/shoal data get --node 127.0.0.{nodes} dev dog 1

Ctrl-C stops the cluster."""
