"""Routes in their three forms: the config dataclass (`config.Route`), the protobuf
message (`shoal.replicator.v1.Route`) and the YAML entry written to shoal.yaml.

The admin service edits `replication.routes` in the node's config file and tells the
replicator; both go through these functions so the forms cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common import yamlfile
from services.common.config import Route, Subscription, parse_config


def to_proto(route: Route) -> rpb.Route:
    message = rpb.Route(
        hostname=route.hostname,
        port=route.port or 0,
        sends=route.replicates.sends,
        receives=route.replicates.receives,
        subscriptions=[
            rpb.Subscription(
                database=s.database, table=s.table, publish=s.publish, subscribe=s.subscribe
            )
            for s in route.subscriptions
        ],
        revoked_certificates=route.revoked_certificates,
    )
    if route.secure is not None:
        message.secure = route.secure
    if route.start_time is not None:
        message.start_time.FromDatetime(route.start_time.astimezone(UTC).replace(tzinfo=None))
    return message


def to_yaml(route: Route) -> str | dict[str, Any]:
    """The shortest YAML entry for a route: a bare host name when nothing else is set."""
    entry: dict[str, Any] = {"hostname": route.hostname}
    if route.port:
        entry["port"] = route.port
    if route.secure is not None:
        entry["url"] = f"{'shoals' if route.secure else 'ws'}://{route.hostname}" + (
            f":{route.port}" if route.port else ""
        )
        entry.pop("hostname")
        entry.pop("port", None)
    if not (route.replicates.sends and route.replicates.receives):
        entry["replicates"] = {
            "sends": route.replicates.sends,
            "receives": route.replicates.receives,
        }
    if route.start_time is not None:
        entry["startTime"] = route.start_time.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if route.revoked_certificates:
        entry["revokedCertificates"] = list(route.revoked_certificates)
    if route.subscriptions:
        entry["subscriptions"] = subscriptions_yaml(route.subscriptions)
    return route.hostname if list(entry) == ["hostname"] else entry


def subscriptions_yaml(
    subscriptions: Iterable[Subscription | rpb.Subscription],
) -> list[dict[str, Any]]:
    """YAML entries of subscriptions (config dataclasses and messages have the same fields)."""
    return [
        {"database": s.database, "table": s.table, "publish": s.publish, "subscribe": s.subscribe}
        for s in subscriptions
    ]


def configured_entries(config_path: Path, routes: Sequence[Route]) -> list[Any]:
    """The `replication.routes` entries of a shoal.yaml as written there (a string or a
    mapping each), one for each of ``routes`` (the same list, parsed); the shortest form
    of each route when the file's list is not that one (set by the environment)."""
    replication = yamlfile.plain(yamlfile.load(config_path)).get("replication") or {}
    written = replication.get("routes") if isinstance(replication, dict) else None
    if not isinstance(written, list) or len(written) != len(routes):
        return [to_yaml(r) for r in routes]
    return written


def from_proto(messages: Iterable[rpb.Route], node_name: str) -> list[Route]:
    """Validate protobuf routes exactly like routes in shoal.yaml (ConfigError naming the
    bad entry)."""
    entries = [_proto_entry(m) for m in messages]
    config = parse_config({"replication": {"hostname": node_name, "routes": entries}}, env={})
    return list(config.replication.routes)


def _proto_entry(message: rpb.Route) -> dict[str, Any]:
    entry: dict[str, Any] = {"hostname": message.hostname}
    if message.port:
        entry["port"] = message.port
    entry["replicates"] = {
        "sends": message.sends if message.HasField("sends") else True,
        "receives": message.receives if message.HasField("receives") else True,
    }
    if message.HasField("start_time"):
        entry["startTime"] = message.start_time.ToDatetime(tzinfo=UTC).isoformat()
    if message.revoked_certificates:
        entry["revokedCertificates"] = list(message.revoked_certificates)
    if message.subscriptions:
        entry["subscriptions"] = subscriptions_yaml(message.subscriptions)
    if message.HasField("secure"):
        scheme = "shoals" if message.secure else "ws"
        port = f":{message.port}" if message.port else ""
        entry = {k: v for k, v in entry.items() if k not in ("hostname", "port")}
        entry["url"] = f"{scheme}://{message.hostname}{port}"
    return entry


def with_routes(
    config_path: Path, routes: Sequence[Route], entries: Sequence[Any] | None = None
) -> dict[str, Any]:
    """The shoal.yaml at ``config_path`` with `replication.routes` replaced, validated as a
    whole (ConfigError otherwise); nothing is written. The result keeps the file's
    comments (``yamlfile``) for ``write_config_data``. ``entries``: the YAML entries to
    write, in the form they were given (else each route's shortest form)."""
    data = yamlfile.load(config_path)
    replication = data.setdefault("replication", {})
    replication["routes"] = list(entries) if entries is not None else [to_yaml(r) for r in routes]
    parse_config(yamlfile.plain(data), env={}, base_dir=config_path.parent)  # ConfigError
    return data


def write_routes(config_path: Path, routes: Sequence[Route]) -> None:
    """Replace `replication.routes` in a shoal.yaml, atomically, keeping every other key
    and the operator's comments.

    The file is re-validated as a whole before it replaces the old one, so a bad route
    never reaches disk.
    """
    write_config_data(config_path, with_routes(config_path, routes))


def write_config_data(config_path: Path, data: dict[str, Any]) -> None:
    """Write a validated shoal.yaml atomically (a temporary file, fsync, rename), keeping
    the comments of data read with ``yamlfile.load``."""
    yamlfile.write(config_path, data)
