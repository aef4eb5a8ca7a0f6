"""Reading ``replication.*``: the node's name and ports, its routes (a host name, a URL or
a mapping each), the databases it replicates, and the checks across them."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from datetime import UTC, datetime

from services.common.config.model import (
    ALL_DATABASES,
    DEFAULT_REPLICATION_PORT,
    DEFAULT_REPLICATION_SECURE_PORT,
    IPNetwork,
    ReplicatedDatabase,
    Replicates,
    ReplicationConfig,
    Route,
    Subscription,
)
from services.common.config.settings import Later, Reader, read_section

NAME_RE = re.compile(r"^[A-Za-z0-9_$][A-Za-z0-9_$-]{0,249}$")


def valid_hostname(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    return (
        bool(name)
        and len(name) <= 253
        and all(
            re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", label)
            for label in labels
        )
    )


def parse_route_url(text: str) -> tuple[str, int | None, bool | None]:
    """``server``, ``server:9933``, ``shoal://server:9933``, ``wss://…`` → (host, port, secure)."""
    secure: bool | None = None
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("shoals", "wss", "https", "grpcs"):
            secure = True
        elif scheme in ("ws", "http", "grpc"):
            secure = False
        elif scheme != "shoal":
            raise ValueError(f"unknown scheme {scheme!r}")
        rest = rest.rstrip("/")
    port: int | None = None
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        port = int(port_text)
    else:
        host = rest
    if not valid_hostname(host):
        raise ValueError(f"{host!r} is not a valid host name or address")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port, secure


def parse_time(value: object) -> datetime:
    """A startTime as shoal.yaml and system.hdb_nodes hold it (ISO 8601; naive is UTC)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError("expected an ISO 8601 time such as 2024-01-01T00:00:00Z")


# -- routes ----------------------------------------------------------------------------------


def _replicates(sub: Reader) -> Replicates:
    """A route's ``replicates``: true/false or ``{sends, receives}``."""
    present, rep = sub.raw("replicates")
    if not present:
        return Replicates()
    if isinstance(rep, bool):
        return Replicates(sends=rep, receives=rep)
    if isinstance(rep, Mapping):
        rr = sub.section("replicates")
        replicates = read_section(Replicates, rr)
        rr.finish()
        return replicates
    sub.problem("replicates", rep, "expected true/false or {sends, receives}")
    return Replicates()


def _start_time(sub: Reader) -> datetime | None:
    present, raw_start = sub.raw("startTime")
    if present and raw_start is not None:
        try:
            return parse_time(raw_start)
        except ValueError as exc:
            sub.problem("startTime", raw_start, str(exc))
    return None


def _revoked(sub: Reader) -> tuple[str, ...]:
    present, raw_revoked = sub.raw("revokedCertificates")
    if present and raw_revoked is not None:
        if isinstance(raw_revoked, list) and all(isinstance(s, str | int) for s in raw_revoked):
            return tuple(str(s).upper() for s in raw_revoked)
        sub.problem("revokedCertificates", raw_revoked, "expected a list of serial numbers")
    return ()


def _subscriptions(sub: Reader) -> tuple[Subscription, ...]:
    subscriptions: list[Subscription] = []
    present, raw_subs = sub.raw("subscriptions")
    if not present or raw_subs is None:
        return ()
    if not isinstance(raw_subs, list):
        sub.problem("subscriptions", raw_subs, "expected a list")
    for i, raw_entry in enumerate(raw_subs if isinstance(raw_subs, list) else []):
        name = f"subscriptions[{i}]"
        if not isinstance(raw_entry, Mapping):
            sub.problem(name, raw_entry, "expected {database, table, publish, subscribe}")
            continue
        entry = sub.item(name, raw_entry)
        database = entry.string("database", "")
        table = entry.string("table", "")
        if not NAME_RE.match(database) or not NAME_RE.match(table):
            sub.problem(name, raw_entry, "database and table names are required")
        subscriptions.append(
            Subscription(
                database,
                table,
                entry.boolean("publish", False),
                entry.boolean("subscribe", False),
            )
        )
        entry.finish()
    return tuple(subscriptions)


def _parse_route(reader: Reader, index: int, item: object) -> Route | None:
    name = f"routes[{index}]"
    if isinstance(item, str):
        try:
            url_host, url_port, url_secure = parse_route_url(item)
        except ValueError as exc:
            reader.problem(name, item, str(exc))
            return None
        return Route(hostname=url_host, port=url_port, secure=url_secure)
    if not isinstance(item, Mapping):
        reader.problem(name, item, "expected a host name, a URL or a mapping")
        return None
    sub = reader.item(name, item)
    host: str | None = sub.optional_string("hostname") or sub.optional_string("host")
    url = sub.optional_string("url")
    port: int | None = None
    secure: bool | None = None
    if url:
        try:
            host, port, secure = parse_route_url(url)
        except ValueError as exc:
            sub.problem("url", url, str(exc))
            return None
    if not host:
        reader.problem(name, item, "a route needs hostname (or host, or url)")
        return None
    if not valid_hostname(host):
        sub.problem("hostname", host, "not a valid host name or address")
    present, _ = sub.raw("port")
    if present:
        port = sub.port("port", 0) or None
    route = Route(
        hostname=host,
        port=port,
        secure=secure,
        replicates=_replicates(sub),
        start_time=_start_time(sub),
        revoked_certificates=_revoked(sub),
        subscriptions=_subscriptions(sub),
    )
    sub.finish()
    return route


def _routes(reader: Reader, hostname: str) -> tuple[Route, ...]:
    """``replication.routes``: the peers this node dials, each once, never itself."""
    routes: list[Route] = []
    present, raw_routes = reader.raw("routes")
    if present and raw_routes is not None:
        if not isinstance(raw_routes, list):
            reader.problem("routes", raw_routes, "expected a list")
        else:
            for i, item in enumerate(raw_routes):
                route = _parse_route(reader, i, item)
                if route is not None:
                    routes.append(route)
    seen: set[str] = set()
    for route in routes:
        if route.hostname == hostname:
            reader.problem("routes", route.hostname, "a route names this node itself")
        if route.hostname in seen:
            reader.problem("routes", route.hostname, "the same peer is listed twice")
        seen.add(route.hostname)
    return tuple(routes)


# -- databases -------------------------------------------------------------------------------


def _parse_database(reader: Reader, index: int, item: object) -> ReplicatedDatabase | None:
    """One entry of ``replication.databases``: a name, ``'*'``, or
    ``{name, sharded, replicateTo}``."""
    name = f"databases[{index}]"
    if isinstance(item, str):
        if item != ALL_DATABASES and not NAME_RE.match(item):
            reader.problem(name, item, "not a valid database name")
            return None
        return ReplicatedDatabase(item)
    if not isinstance(item, Mapping):
        reader.problem(name, item, "expected a database name or {name, sharded, replicateTo}")
        return None
    entry = reader.item(name, item)
    read = read_section(ReplicatedDatabase, entry, name=entry.string("name", ""))
    database, sharded, replicate_to = read.name, read.sharded, read.replicate_to
    entry.finish()  # an unknown key is an error naming it
    if not NAME_RE.match(database) and database != ALL_DATABASES:
        entry.problem("name", database or None, "a database name is required")
        return None
    if database == ALL_DATABASES and sharded:
        entry.problem("sharded", sharded, "'*' cannot be sharded; list each sharded database")
        return None
    if database == ALL_DATABASES and replicate_to is not None:
        entry.problem("replicateTo", replicate_to, "'*' cannot have residents; name the database")
        return None
    if database == "system" and (sharded or replicate_to is not None):
        key, value = ("sharded", sharded) if sharded else ("replicateTo", replicate_to)
        entry.problem(key, value, "the system database always replicates to every node")
        return None
    return read


def _parse_databases(reader: Reader) -> tuple[ReplicatedDatabase, ...] | None:
    """``replication.databases``: ``'*'`` (None) or a list of entries."""
    present, raw = reader.raw("databases")
    if not present or raw is None or raw == ALL_DATABASES:
        return None
    if not isinstance(raw, list):
        reader.problem("databases", raw, "expected '*' or a list of database names or entries")
        return None
    entries = [_parse_database(reader, i, item) for i, item in enumerate(raw)]
    seen: set[str] = set()
    for entry in entries:
        if entry is not None and entry.name in seen:
            reader.problem("databases", entry.name, "the same database is listed twice")
        if entry is not None:
            seen.add(entry.name)
    return tuple(e for e in entries if e is not None)


# -- the section -----------------------------------------------------------------------------


def _advertised_url(reader: Reader, hostname: str) -> str | None:
    url = reader.optional_string("url")
    if url is None:
        return None
    try:
        host, _, _ = parse_route_url(url)
    except ValueError as exc:
        reader.problem("url", url, str(exc))
        return None
    if host != hostname:
        reader.problem("url", url, f"the host must be this node's name ({hostname!r})")
    return url


def _networks(reader: Reader, key: str) -> tuple[IPNetwork, ...]:
    """A list of IP addresses or networks (``10.0.0.0/8``, ``127.0.0.1``)."""
    present, raw = reader.raw(key)
    if not present or raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        reader.problem(key, raw, "expected a list of IP addresses or networks")
        return ()
    networks: list[IPNetwork] = []
    for item in raw:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            reader.problem(key, item, "not an IP address or network (e.g. 10.0.0.0/8)")
    return tuple(networks)


def _ports(reader: Reader) -> tuple[int | None, int | None]:
    """(port, securePort): the plain port is open only when asked for, or when there is
    no TLS port at all; one of them must be open."""
    present, raw_secure = reader.raw("securePort")
    secure_port: int | None = DEFAULT_REPLICATION_SECURE_PORT
    if present:
        secure_port = None if raw_secure is None else reader.port("securePort", 0) or None
    present, raw_port = reader.raw("port")
    port: int | None = None if secure_port is not None else DEFAULT_REPLICATION_PORT
    if present:
        port = None if raw_port is None else reader.port("port", 0) or None
    if port is None and secure_port is None:
        reader.problem(
            "port",
            raw_port,
            "replication.port and replication.securePort cannot both be null: the node"
            " would have no replication port",
        )
    return port, secure_port


def parse_replication(reader: Reader) -> ReplicationConfig:
    hostname = reader.string("hostname", socket.gethostname())
    if not valid_hostname(hostname):
        reader.problem("hostname", hostname, "not a valid host name or address")
    port, secure_port = _ports(reader)
    allowed_sources = _networks(reader, "allowedSources")
    routes = _routes(reader, hostname)
    config = read_section(
        ReplicationConfig,
        reader,
        hostname=hostname,
        port=port,
        secure_port=secure_port,
        allowed_sources=allowed_sources,
        routes=routes,
        databases=_parse_databases(reader),
        url=Later(lambda: _advertised_url(reader, hostname)),
    )
    if config.peer_timeout_s < 2 * config.heartbeat_interval_s:
        reader.problem(
            "peerTimeout",
            config.peer_timeout_s,
            "must be at least twice replication.heartbeatInterval",
        )
    resident = [d.name for d in config.databases or () if d.replicate_to is not None]
    if resident and not config.gossip:
        reader.problem(
            "gossip",
            False,
            f"{', '.join(resident)} {'has' if len(resident) == 1 else 'have'} replicateTo,"
            " which needs every node to dial every member (a relay never passes a record"
            " whole to its residents): keep replication.gossip true",
        )
    reader.finish()
    return config
