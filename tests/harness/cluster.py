"""A cluster of real nodes (storage + replicator processes each) on loopback addresses,
with TLS between replicators by default, and a digest to compare nodes row by row."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from shoal.storage.v1 import storage_pb2 as pb

from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority
from tests.harness.client import StorageClient
from tests.harness.node import Node
from tests.harness.wait import wait_for

FAST_REPLICATION = {
    "heartbeatInterval": 0.5,
    "peerTimeout": 3,
    "reconnectDelay": 0.1,
    "reconnectMaxDelay": 1,
}


def canonical_state(raw: bytes) -> bytes:
    """A record state with sorted keys, so equal states have equal bytes."""
    return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)


def mesh(names: Sequence[str]) -> dict[str, list[str]]:
    """Every node routes to every other node."""
    return {n: [m for m in names if m != n] for n in names}


def line(names: Sequence[str]) -> dict[str, list[str]]:
    """A-B-C-...: each node routes to the next one."""
    return {n: ([names[i + 1]] if i + 1 < len(names) else []) for i, n in enumerate(names)}


def star(names: Sequence[str]) -> dict[str, list[str]]:
    """Every other node routes to the first (the hub)."""
    return {n: ([] if i == 0 else [names[0]]) for i, n in enumerate(names)}


class Cluster:
    """Nodes that replicate with each other."""

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        topology: Any = mesh,
        tls: bool = True,
        config: dict[str, Any] | None = None,
        node_config: dict[int, dict[str, Any]] | None = None,
        services: tuple[str, ...] = ("storage", "replicator"),
        gossip: bool | None = None,
    ) -> None:
        """``gossip`` (dial every member of system.hdb_nodes) defaults to on for a mesh
        and off for other topologies, which would otherwise become a mesh."""
        self.workdir = workdir
        self.ca = CertificateAuthority.create() if tls else None
        names = [next_address() for _ in range(size)]
        routes = topology(names) if callable(topology) else topology
        if gossip is None:
            gossip = topology is mesh
        self.routes: dict[str, list[str]] = routes
        self.nodes: list[Node] = []
        for i, name in enumerate(names):
            extra: dict[str, Any] = {
                "replication": {**FAST_REPLICATION, "routes": routes[name], "gossip": gossip}
            }
            if self.ca is not None:
                extra["tls"] = self.ca.write_node_files(workdir / name / "tls", name, [name])
            node = Node(workdir, name=name, host=name, config=extra, services=services)
            if config:
                node.update_config(config)
            if node_config and i in node_config:
                node.update_config(node_config[i])
            self.nodes.append(node)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def __iter__(self) -> Any:
        return iter(self.nodes)

    def start(self) -> Cluster:
        """Start each service on every node at once, one service after the other
        (storage, then replicator, then admin)."""
        for service in self.nodes[0].services:
            for node in self.nodes:
                node.start_service(service, wait=False)
            for node in self.nodes:
                node.wait_ready(service)
        return self

    def close(self) -> None:
        """Stop every node: all are asked at once, then each is waited for."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.close()

    # -- comparing nodes -----------------------------------------------------------------

    @staticmethod
    def digest(node: Node, databases: Iterable[str] | None = None) -> str:
        """SHA-256 over a node's replicated schema and every replicated row (key, versions,
        values, tombstones)."""
        client = node.internal_client()
        try:
            names = databases
            if names is None:
                reply = client.call("DescribeAll", pb.DescribeAllRequest())
                names = [d.name for d in reply.databases]
            h = hashlib.sha256()
            for database in sorted(names):
                for chunk in client.stream("Snapshot", pb.SnapshotRequest(database=database)):
                    for table in sorted(chunk.tables, key=lambda t: t.name):
                        indexed = ",".join(sorted(table.indexed_attributes))
                        h.update(
                            f"{database}.{table.name}:{table.primary_key}:{indexed}\n".encode()
                        )
                    for row in chunk.rows:
                        h.update(
                            database.encode() + b"\x00" + row.table.encode() + b"\x00" + row.id
                        )
                        h.update(b"\x00" + canonical_state(row.state) + b"\n")
            return h.hexdigest()
        finally:
            client.close()

    def digests(self, databases: Iterable[str] | None = None) -> list[str]:
        names = list(databases) if databases is not None else None
        return [self.digest(node, names) for node in self.nodes]

    def wait_converged(
        self,
        databases: Iterable[str] | None = None,
        timeout: float = 60.0,
        nodes: Sequence[Node] | None = None,
    ) -> str:
        """Wait until the given nodes (default: all) hold identical data; returns the digest."""
        names = list(databases) if databases is not None else None
        members = list(nodes) if nodes is not None else self.nodes

        def same() -> str | None:
            values = {self.digest(node, names) for node in members}
            return values.pop() if len(values) == 1 else None

        return wait_for(same, timeout, "the nodes to converge", interval=0.1)

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Wait until both ends of every route show a connected session.

        Tests of steady-state replication call this before their first write: a database
        created while a session's handshake is in flight reaches the peer by a copy, and a
        copied database is not yet passed on to that peer's other peers (a known gap)."""
        by_name = {node.name: node for node in self.nodes}
        for name, peers in self.routes.items():
            for peer in peers:
                for here, there in ((by_name[name], peer), (by_name[peer], name)):

                    def connected(here: Node = here, there: str = there) -> bool:
                        view = here.connection(there)
                        return bool(view is not None and view.connected)

                    wait_for(connected, timeout, f"{here.name} connected to {there}")

    def wait_members(self, timeout: float = 30.0) -> None:
        """Wait until every node's system.hdb_nodes lists every node (each node writes its
        own row when its replicator starts; the rows replicate like any other)."""
        names = {node.name for node in self.nodes}

        def listed(node: Node) -> bool:
            rows = node.internal_client().all_records("system", "hdb_nodes", "name")
            return {r["name"] for r in rows} == names

        for node in self.nodes:
            wait_for(partial(listed, node), timeout, f"{node.name} to list every member")

    def clients(self) -> list[StorageClient]:
        return [node.client() for node in self.nodes]
