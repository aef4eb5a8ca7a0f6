"""Cluster operations: status and rebalance, routes, membership (``system.hdb_nodes``) and
certificates (``system.hdb_certificate``). All need a super user (the registry checks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.admin.certificates import NewCertificate
from services.admin.exchange import JoinRequest, authorization_header
from services.admin.nodes import Row, start_time_text, validated_row
from services.admin.operations.body import Body, Json, harper_time
from services.admin.operations.execute import Execute, Replicable
from services.common import members
from services.common.config import (
    DEFAULT_REPLICATION_PORT,
    DEFAULT_REPLICATION_SECURE_PORT,
    parse_route_url,
    parse_time,
)
from services.common.errors import InvalidArgument, ShoalError
from services.common.routes import subscriptions_yaml

# -- status and rebalance --------------------------------------------------------------------

# Harper's `type` of a cluster_status answer, and the thread id its sockets show: Harper runs
# a socket per database on a worker thread; Shoal's replicator is one process.
STATUS_TYPE = "cluster-status"
SOCKET_THREAD_ID = 1


def harper_date(ms: float) -> str:
    """A time as Harper's cluster_status shows it (JavaScript's ``toUTCString``):
    ``Wed, 12 Feb 2025 19:09:34 GMT``."""
    return formatdate(ms / 1000, usegmt=True)


def _socket_json(c: rpb.Connection, db: rpb.DatabaseStatus) -> Json:
    """One of Harper's ``database_sockets``: its keys first (a time Harper does not know
    yet is left out, as Harper leaves it out), then Shoal's own."""
    socket: dict[str, Any] = {
        "database": db.database,
        "connected": c.connected,
        "latency": c.latency_ms,
        "thread_id": SOCKET_THREAD_ID,
        "threadId": SOCKET_THREAD_ID,
        "nodes": [c.peer],
    }
    if db.last_commit_confirmed:
        socket["lastCommitConfirmed"] = harper_date(harper_time(db.last_commit_confirmed))
    if db.last_received_version:
        socket["lastReceivedRemoteTime"] = harper_date(harper_time(db.last_received_version))
    if db.HasField("last_received_local_time"):
        local_ms = db.last_received_local_time.ToMilliseconds()
        socket["lastReceivedLocalTime"] = harper_date(local_ms)
    receiving = db.HasField("copy") or db.backlog_seconds > 0
    socket |= {
        "lastReceivedVersion": harper_time(db.last_received_version),
        "backPressurePercent": c.back_pressure_percent,
        "lastReceivedStatus": "Receiving" if receiving else "Waiting",
        # Shoal's own.
        "lastConnectionError": c.last_connection_error or None,
        "backlog": {"transactions": db.backlog_transactions, "seconds": db.backlog_seconds},
        "copy": {
            "source": db.copy.source,
            "rows": db.copy.rows,
            "bytes": db.copy.bytes,
            "estimatedRows": db.copy.estimated_rows,
        }
        if db.HasField("copy")
        else None,
    }
    return socket


def replicates_json(sends: bool, receives: bool) -> Json:
    """Harper's ``replicates``: true when data flows both ways, else the controlled flow."""
    return True if sends and receives else {"sends": sends, "receives": receives}


@dataclass(frozen=True)
class PeerRecord:
    """What this node's configuration says of a peer: its route in shoal.yaml, else its
    row of system.hdb_nodes (Harper's connection objects are those records)."""

    url: str | None = None
    subscriptions: Json = None
    revoked_certificates: list[str] | None = None


def _peer_records(ex: Execute, membership: members.Membership | None) -> dict[str, PeerRecord]:
    records: dict[str, PeerRecord] = {}
    if membership is not None:
        for name, row in membership.rows.items():
            url = row.get("url")
            subscriptions = row.get("subscriptions")
            revoked = row.get("revoked_certificates")
            records[name] = PeerRecord(
                url=url if isinstance(url, str) and url else None,
                subscriptions=subscriptions
                if isinstance(subscriptions, list) and subscriptions
                else None,
                revoked_certificates=list(revoked)
                if isinstance(revoked, list) and revoked
                else None,
            )
    for route in ex.cluster.routes():
        tls = ex.node.config.replication.secure_port is not None
        secure = route.secure if route.secure is not None else tls
        default = DEFAULT_REPLICATION_SECURE_PORT if secure else DEFAULT_REPLICATION_PORT
        host = f"[{route.hostname}]" if ":" in route.hostname else route.hostname
        records[route.hostname] = PeerRecord(
            url=f"{'shoals' if secure else 'ws'}://{host}:{route.port or default}",
            subscriptions=subscriptions_yaml(route.subscriptions) or None,
            revoked_certificates=list(route.revoked_certificates) or None,
        )
    return records


def _connection_json(c: rpb.Connection, record: PeerRecord) -> Json:
    """One of Harper's ``connections`` (the peer's record and its ``database_sockets``),
    then Shoal's own keys."""
    connection: dict[str, Any] = {
        "name": c.peer,
        "url": record.url or c.address,
        "replicates": replicates_json(c.sends, c.receives),
        "replicateByDefault": record.subscriptions is None,
        "subscriptions": record.subscriptions,
    }
    if c.HasField("shard"):
        connection["shard"] = c.shard
    if record.revoked_certificates:
        connection["revoked_certificates"] = record.revoked_certificates
    connection |= {
        "database_sockets": [_socket_json(c, db) for db in c.databases],
        # Shoal's own.
        "address": c.address,
        "connected": c.connected,
        "dialed": c.dialed,
        "latency": c.latency_ms,
        "backPressurePercent": c.back_pressure_percent,
        "lastConnectionError": c.last_connection_error or None,
        "connectedSince": c.connected_since.ToMilliseconds()
        if c.HasField("connected_since")
        else None,
        "withheldDatabases": list(c.withheld_databases),
        # The tables flowing each way when only some do (null: every table).
        "flowingTables": {
            "receives": _tables_json(c.received_tables),
            "sends": _tables_json(c.sent_tables),
        },
        "logMarginSeconds": c.log_margin_seconds if c.HasField("log_margin_seconds") else None,
    }
    return connection


def _tables_json(tables: Sequence[types_pb2.TableRef]) -> Json:
    if not tables:
        return None
    return [{"database": t.database, "table": t.table} for t in tables]


def _progress_json(progress: spb.ResidencyProgress) -> Json:
    return {
        "running": progress.running,
        "passes": progress.passes,
        "scanned": progress.scanned,
        "needing": progress.needing,
        "rehomed": progress.rehomed,
        "deferred": progress.deferred,
        "unrecoverable": progress.unrecoverable,
        "dry_run": progress.dry_run,
        "started_ms": progress.started_ms,
        "finished_ms": progress.finished_ms,
    }


async def cluster_status(ex: Execute, request: None) -> Json:
    """Harper's answer (``type``, ``connections``, ``node_name``, ``is_enabled``), then
    Shoal's own keys (``removed``, ``shard``, ``residency``)."""
    reply = await ex.cluster.status()
    try:
        membership: members.Membership | None = await ex.nodes.read()
    except ShoalError:
        membership = None  # the records' subscriptions and urls are then left out
    records = _peer_records(ex, membership)
    answer: dict[str, Any] = {
        "type": STATUS_TYPE,
        "connections": [
            _connection_json(c, records.get(c.peer, PeerRecord())) for c in reply.connections
        ],
        "node_name": reply.node_name,
        "is_enabled": reply.is_enabled,
    }
    own = membership.rows.get(reply.node_name) if membership is not None else None
    if own is not None and isinstance(own.get("url"), str) and own["url"]:
        answer["url"] = own["url"]
    answer |= {
        "removed": reply.removed,
        "shard": reply.shard if reply.HasField("shard") else None,
        "residency": (
            {
                "repair": _progress_json(reply.residency.repair),
                "rebalance": _progress_json(reply.residency.rebalance),
                "gone": list(reply.residency.gone),
            }
            if reply.HasField("residency")
            else {"error": reply.residency_error}
        ),
    }
    return answer


def parse_rebalance(body: Body) -> Replicable[spb.RebalanceRequest]:
    replicated = body.flag("replicated", default=True)
    dry_run = body.flag("dry_run", default=False)
    database = body.text("database", "schema", required=False)
    return Replicable(spb.RebalanceRequest(database=database, dry_run=dry_run), replicated, body)


async def rebalance(ex: Execute, request: Replicable[spb.RebalanceRequest]) -> Json:
    """Move records to where rendezvous hashing over the current members puts them, on
    every member (each moves the records it is the first resident of); ``dry_run`` only
    counts. Progress: ``cluster_status`` (``residency.rebalance``) of each node."""
    reply = await ex.storage("Rebalance", request.message)
    result: dict[str, Any] = {
        "message": "rebalance dry run started" if request.message.dry_run else "rebalance started",
        "progress": _progress_json(reply.progress),
    }
    return await ex.on_members(request.body, result) if request.replicated else result


# -- routes ----------------------------------------------------------------------------------

# What a route object of cluster_set_routes may hold (anything else is refused, never
# silently dropped).
_ROUTE_KEYS = frozenset(
    {
        "hostname",
        "host",
        "port",
        "url",
        "replicates",
        "startTime",
        "start_time",
        "subscriptions",
        "revokedCertificates",
        "revoked_certificates",
    }
)


@dataclass(frozen=True)
class GivenRoute:
    """A route of cluster_set_routes / cluster_delete_routes: as given (Harper answers
    with the routes as they were given), and read."""

    given: Json
    message: rpb.Route


def _routes_from_body(body: Body) -> list[GivenRoute]:
    routes: list[GivenRoute] = []
    for i, item in enumerate(body.array("routes")):
        if isinstance(item, str):
            fields = {"url": item} if "://" in item else {"hostname": item}
            routes.append(GivenRoute(item, _route_message(fields, i, body)))
        elif isinstance(item, dict):
            routes.append(GivenRoute(item, _route_message(item, i, body)))
        else:
            raise InvalidArgument(
                f"{body.operation}: route {i} must be a host name, a URL or an object"
            )
    return routes


def _yaml_entry(route: GivenRoute) -> Json:
    """The shoal.yaml entry of a route given to cluster_set_routes: a string as given; an
    object with the keys it was given (Harper's aliases in shoal.yaml's spelling)."""
    if isinstance(route.given, str):
        return route.given
    message = route.message
    entry: dict[str, Any] = {}
    for key in route.given:
        if key in ("host", "hostname", "url"):
            entry[key] = route.given[key]
        elif key == "port" and message.port:
            entry["port"] = message.port
        elif key == "replicates" and isinstance(route.given[key], dict):
            entry["replicates"] = {"sends": message.sends, "receives": message.receives}
        elif key in ("startTime", "start_time") and message.HasField("start_time"):
            start = message.start_time.ToDatetime(tzinfo=UTC)
            entry["startTime"] = start.isoformat().replace("+00:00", "Z")
        elif key in ("revokedCertificates", "revoked_certificates"):
            entry["revokedCertificates"] = [s.upper() for s in message.revoked_certificates]
        elif key == "subscriptions":
            entry["subscriptions"] = subscriptions_yaml(message.subscriptions)
    return entry


def _route_message(item: dict[str, Any], index: int, body: Body) -> rpb.Route:
    host = item.get("hostname", item.get("host"))
    port = item.get("port") or 0
    secure = None
    if "url" in item:
        try:
            host, url_port, secure = parse_route_url(str(item["url"]))
        except ValueError as exc:
            raise InvalidArgument(f"{body.operation}: route {index}: {exc}") from exc
        port = url_port or port
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise InvalidArgument(
            f"{body.operation}: route {index} needs a host name (and a numeric port)"
        )
    message = rpb.Route(hostname=host, port=port)
    if secure is not None:
        message.secure = secure
    replicates = item.get("replicates")
    if isinstance(replicates, dict):
        message.sends = bool(replicates.get("sends", True))
        message.receives = bool(replicates.get("receives", True))
    unknown = sorted(set(item) - _ROUTE_KEYS)
    if unknown:
        raise InvalidArgument(
            f"{body.operation}: route {index}: unknown field(s) {', '.join(unknown)}"
            f" (a route has {', '.join(sorted(_ROUTE_KEYS))})"
        )
    _route_extras(item, message, f"{body.operation}: route {index}")
    return message


def _route_extras(item: dict[str, Any], message: rpb.Route, where: str) -> None:
    """A route object's revoked certificates, start time and subscriptions, into ``message``."""
    revoked = item.get("revokedCertificates", item.get("revoked_certificates"))
    if revoked is not None:
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise InvalidArgument(f"{where}: 'revokedCertificates' must be a list of serials")
        message.revoked_certificates.extend(revoked)
    start = item.get("startTime", item.get("start_time"))
    if start is not None:
        try:
            when = (
                datetime.fromtimestamp(start / 1000, tz=UTC)
                if isinstance(start, int | float) and not isinstance(start, bool)
                else parse_time(start)
            )
        except (ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{where}: 'startTime': {exc}") from exc
        message.start_time.FromDatetime(when.astimezone(UTC).replace(tzinfo=None))
    subscriptions = item.get("subscriptions")
    if subscriptions is not None:
        if not isinstance(subscriptions, list) or not all(
            isinstance(x, dict) for x in subscriptions
        ):
            raise InvalidArgument(f"{where}: 'subscriptions' must be a list of objects")
        for x in subscriptions:
            message.subscriptions.append(
                rpb.Subscription(
                    database=str(x.get("database", x.get("schema", ""))),
                    table=str(x.get("table", "")),
                    publish=bool(x.get("publish", False)),
                    subscribe=bool(x.get("subscribe", False)),
                )
            )


async def cluster_get_routes(ex: Execute, request: None) -> Json:
    """Harper's answer: the configured routes as they were given (strings and objects)."""
    return [entry for _, entry in ex.cluster.route_entries()]


def parse_cluster_set_routes(body: Body) -> list[GivenRoute]:
    return _routes_from_body(body)


async def cluster_set_routes(ex: Execute, routes: list[GivenRoute]) -> Json:
    """Harper's answer: the routes added and those skipped (a route to the peer exists,
    or the peer was given before), each as it was given."""
    entries: dict[str, Json] = {}
    firsts: list[rpb.Route] = []
    for route in routes:
        if route.message.hostname not in entries:
            entries[route.message.hostname] = _yaml_entry(route)
            firsts.append(route.message)
    change = await ex.cluster.set_routes(firsts, entries)
    added = {r.hostname for r in change.changed}
    answer: dict[str, Any] = {
        "message": "cluster routes successfully set",
        "set": [],
        "skipped": [],
    }
    for route in routes:
        first = route.message.hostname in added
        answer["set" if first else "skipped"].append(route.given)
        added.discard(route.message.hostname)
    return answer


def parse_cluster_delete_routes(body: Body) -> list[GivenRoute]:
    return _routes_from_body(body)


async def cluster_delete_routes(ex: Execute, routes: list[GivenRoute]) -> Json:
    """Harper's answer: ``deleted``, the routes removed as shoal.yaml held them;
    ``skipped``, the routes given that matched none, as given."""
    change = await ex.cluster.delete_routes([r.message.hostname for r in routes])
    missing = set(change.missing)
    return {
        "message": "cluster routes successfully deleted",
        "deleted": change.entries,
        "skipped": [r.given for r in routes if r.message.hostname in missing],
    }


# -- membership (system.hdb_nodes) -----------------------------------------------------------

_NODE_COLUMNS = ("url", "replicates", "subscriptions", "start_time", "revoked_certificates")


def _node_name(body: Body) -> str:
    name = body.value("hostname", "node_name", "name")
    url = body.value("url")
    if name is None and isinstance(url, str):
        try:
            name, _, _ = parse_route_url(url)
        except ValueError as exc:
            raise InvalidArgument(f"{body.operation}: url: {exc}") from exc
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{body.operation}: 'hostname' (or 'url') is required")
    return name


def _node_changes(body: Body) -> Row:
    """The hdb_nodes columns an add_node / update_node body sets (Harper's field names)."""
    changes: Row = {c: body.data[c] for c in _NODE_COLUMNS if c in body.data}
    if "sends" in body.data or "receives" in body.data:
        replicates = changes.get("replicates", True)
        flows = replicates if isinstance(replicates, dict) else {}
        changes["replicates"] = {
            "sends": body.flag("sends", default=flows.get("sends", True)),
            "receives": body.flag("receives", default=flows.get("receives", True)),
        }
    if "subscriptions" in changes:
        subscriptions = body.array("subscriptions")
        changes["subscriptions"] = [
            {"database": s.get("database", s.get("schema")), **s} if isinstance(s, dict) else s
            for s in subscriptions
        ]
        for item in changes["subscriptions"]:
            if isinstance(item, dict):
                item.pop("schema", None)
    if "start_time" in changes:
        changes["start_time"] = start_time_text(changes["start_time"], body.operation)
    if "shard" in body.data:
        shard = body.data["shard"]
        if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int)):
            raise InvalidArgument(f"{body.operation}: 'shard' must be a whole number")
        changes["shard"] = shard
    return changes


def _requested_row(body: Body, node_name: str, where: str = "") -> Row:
    name = _node_name(body)
    changes = _node_changes(body)
    return validated_row(
        {"name": name, **changes}, node_name, changes.get("shard"), f"{body.operation}: {where}"
    )


async def add_node(ex: Execute, body: Body) -> Json:
    """Its body is read here (parser: ``whole``): the row is checked against this node's
    name before the fields of the certificate exchange are read."""
    requested = _requested_row(body, ex.nodes.name)
    authorization = body.data.get("authorization")
    if authorization is None or authorization == "":
        # verify_tls only concerns the certificate exchange: without credentials no
        # connection is made here.
        row = await ex.nodes.add(requested)
    else:
        port = body.number("admin_port", default=0)
        if port > 65535:
            raise InvalidArgument("add_node: 'admin_port' must be a port number (1 to 65535)")
        join = JoinRequest(
            row=requested,
            authorization=authorization_header(authorization, "add_node"),
            verify_tls=body.flag("verify_tls", default=True),
            admin_port=port or None,
        )
        row = await ex.exchange.join(join)
    return {"message": f"Successfully added '{row['name']}' to cluster", "node": row}


@dataclass(frozen=True)
class NodeChange:
    name: str
    changes: Row


def parse_update_node(body: Body) -> NodeChange:
    name = _node_name(body)
    return NodeChange(name, _node_changes(body))


async def update_node(ex: Execute, request: NodeChange) -> Json:
    row = await ex.nodes.update(request.name, request.changes)
    return {"message": f"Successfully updated '{request.name}'", "node": row}


def parse_remove_node(body: Body) -> str:
    return _node_name(body)


async def remove_node(ex: Execute, name: str) -> Json:
    await ex.nodes.remove(name)
    return {"message": f"Successfully removed '{name}' from cluster"}


async def configure_cluster(ex: Execute, body: Body) -> Json:
    """Its body is read here (parser: ``whole``): each connection is checked against
    this node's name before the next is read."""
    rows = []
    for i, item in enumerate(body.array("connections")):
        if not isinstance(item, dict):
            raise InvalidArgument(f"configure_cluster: connection {i} must be an object")
        entry = Body({**item, "operation": "configure_cluster"})
        row = _requested_row(entry, ex.nodes.name, f"connection {i}: ")
        if "shard" not in item:
            row.pop("shard")
        rows.append(row)
    done = await ex.nodes.configure(rows)
    return {
        "message": "Cluster successfully configured.",
        "added": [r["name"] for r in done.added],
        "updated": [r["name"] for r in done.updated],
        "removed": done.removed,
    }


# -- certificates (system.hdb_certificate) ---------------------------------------------------


def parse_add_certificate(body: Body) -> NewCertificate:
    raw_authority = body.value("is_authority")
    if raw_authority is not None and not isinstance(raw_authority, bool):
        raise InvalidArgument("add_certificate: 'is_authority' must be true or false")
    return NewCertificate(
        name=body.text("name"),
        certificate=body.text("certificate"),
        private_key=body.text("private_key", required=False),
        is_authority=raw_authority,
    )


async def add_certificate(ex: Execute, new: NewCertificate) -> Json:
    row = await ex.certificates.add(new)
    return {
        "message": f"Successfully added certificate: {new.name}",
        "certificate": row,
    }


async def list_certificates(ex: Execute, request: None) -> Json:
    return await ex.certificates.list()


def parse_remove_certificate(body: Body) -> str:
    return body.text("name")


async def remove_certificate(ex: Execute, name: str) -> Json:
    await ex.certificates.remove(name)
    return {"message": f"Successfully removed {name}"}
