"""``shoal cluster``: cluster operations through a node's admin service (status, members,
rebalancing, routes)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from services.cli.calls import execute
from services.cli.output import Output, OutputOption, emit, fail
from services.cli.settings import Settings, connected

cluster_app = typer.Typer(
    help="Cluster operations (through a node's admin service).", no_args_is_help=True
)
routes_app = typer.Typer(
    help="Routes of a node (persisted in its shoal.yaml).", no_args_is_help=True
)
cluster_app.add_typer(routes_app, name="routes")

STATUS_COLUMNS = [
    "peer",
    "connected",
    "dialed",
    "latency ms",
    "back-pressure %",
    "log margin",
    "shard",
    "databases",
    "last error",
]


@cluster_app.command("status")
@connected()
def cluster_status(settings: Settings, output: OutputOption = Output.table) -> None:
    """Replication status of a node: one line per connection."""
    status = execute(settings, {"operation": "cluster_status"})
    if output is Output.json:
        emit(status)
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
    emit(rows, output, STATUS_COLUMNS)


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
@connected()
def routes_list(settings: Settings, output: OutputOption = Output.table) -> None:
    """The node's routes."""
    routes = execute(settings, {"operation": "cluster_get_routes"})
    if output is Output.table:
        # Routes are answered as they were given: a string (host name or URL) or an
        # object with `host` or `hostname`.
        routes = [
            {"hostname": r}
            if isinstance(r, str)
            else {**r, "hostname": r.get("hostname") or r.get("host") or r.get("url")}
            for r in routes
        ]
    emit(routes, output, ["hostname", "port"])


@routes_app.command("add")
@connected()
def routes_add(
    settings: Settings,
    routes: Annotated[list[str], typer.Argument(help="host names or URLs")],
) -> None:
    """Add routes (persisted, applied at once); routes already there are skipped."""
    emit(execute(settings, {"operation": "cluster_set_routes", "routes": routes}))


@routes_app.command("remove")
@connected()
def routes_remove(
    settings: Settings,
    hostnames: Annotated[list[str], typer.Argument(help="host names")],
) -> None:
    """Remove routes by host name."""
    emit(execute(settings, {"operation": "cluster_delete_routes", "routes": hostnames}))


@cluster_app.command("nodes")
@connected()
def cluster_nodes(settings: Settings, output: OutputOption = Output.table) -> None:
    """The members of the cluster (system.hdb_nodes) as this node knows them."""
    body = {
        "operation": "search_by_value",
        "database": "system",
        "table": "hdb_nodes",
        "attribute": "name",
        "value": "*",
    }
    rows = execute(settings, body)
    for row in rows:
        flows = row.get("replicates", True)
        row["replicates"] = (
            flows
            if isinstance(flows, bool)
            else "/".join(k for k in ("sends", "receives") if flows.get(k))
        )
        row["subscriptions"] = len(row.get("subscriptions") or [])
    emit(rows, output, ["name", "url", "replicates", "subscriptions", "shard"])


@cluster_app.command("add-node")
@connected()
def cluster_add_node(
    settings: Settings,
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
) -> None:
    """Add a node to the cluster; every member learns of it and connects."""
    body: dict[str, Any] = {"operation": "add_node", "hostname": hostname}
    if join_user:
        if not join_password:
            fail("--join-user needs --join-password or SHOAL_JOIN_PASSWORD", 2)
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
    emit(execute(settings, body))


@cluster_app.command("remove-node")
@connected()
def cluster_remove_node(
    settings: Settings,
    hostname: Annotated[str, typer.Argument(help="the member to remove")],
) -> None:
    """Remove a node from the cluster; every member drops its connections with it."""
    emit(execute(settings, {"operation": "remove_node", "hostname": hostname}))


@cluster_app.command("rebalance")
@connected()
def cluster_rebalance(
    settings: Settings,
    database: Annotated[
        str | None, typer.Argument(help="a database with replicateTo (default: all)")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="only count what would move")] = False,
) -> None:
    """Move records to where the current members would place them (residency), on every
    member; progress in `cluster status -o json` (residency.rebalance)."""
    body: dict[str, Any] = {"operation": "rebalance", "dry_run": dry_run}
    if database:
        body["database"] = database
    emit(execute(settings, body))
