"""Every operation of docs/operations.md that changes data or membership, run in sequence
on three TLS nodes (joined by add_node) while a steady writer writes to two of them: after
each operation the cluster's digests (replicated schema and rows, the system database
included) are equal.

Users and roles are local to each node by design and set_configuration changes no data,
so they are not part of the sequence. The writer pauses at each check (it holds no
transaction open), so the check waits on a condition that becomes true and stays true."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from shoal.storage.v1 import storage_pb2 as spb

from tests.conftest import MakeCluster
from tests.harness.certs import self_signed
from tests.harness.cluster import Cluster
from tests.harness.joined import joined_mesh
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster


class SteadyWriter:
    """Upserts one row at a time into live.ticks, alternating between two nodes, until
    stopped; ``pause`` returns once no write is in flight."""

    def __init__(self, nodes: list[Node]) -> None:
        self.clients = [node.client() for node in nodes]
        self.written: set[int] = set()
        self.failures = 0
        self._go = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._go.set()
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if not self._go.is_set():
                self._idle.set()
                self._go.wait(0.05)
                continue
            self._idle.clear()
            if not self._go.is_set():
                continue
            client = self.clients[n % len(self.clients)]
            try:
                client.upsert("live", "ticks", [{"id": n, "n": n}])
                self.written.add(n)
                n += 1
            except grpc.RpcError:
                self.failures += 1  # a restarting service: the same row is written again
                self._stop.wait(0.05)
            self._stop.wait(0.01)
        self._idle.set()

    def pause(self) -> None:
        self._go.clear()
        self._idle.clear()
        if not self._idle.wait(30):
            raise AssertionError("the steady writer did not pause")

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        self._thread.join(30)


def databases(nodes: list[Node]) -> list[str]:
    names: set[str] = {"system"}
    for node in nodes:
        reply = node.internal_client().call("DescribeAll", spb.DescribeAllRequest())
        names |= {d.name for d in reply.databases}
    return sorted(names)


def backup_path(node: Node, name: str) -> Path:
    return Path(node.config["rootPath"]) / "backups" / f"{name}.tar.gz"


def dogs(node: Node, database: str = "dev") -> dict[Any, dict[str, Any]]:
    return {r["id"]: r for r in node.client().all_records(database, "dog")}


def test_every_operation_keeps_the_cluster_convergent(make_cluster: MakeCluster) -> None:
    cluster: Cluster = joined_mesh(make_cluster)
    a, b, c = cluster
    a.client().create_table("live", "ticks")
    cluster.wait_converged(["live"])
    writer = SteadyWriter([a, b])
    writer.start()
    checked: list[str] = []

    def check(label: str, nodes: list[Node] | None = None) -> str:
        members = nodes or list(cluster)
        writer.pause()
        try:
            digest = wait_for(
                lambda: cluster.wait_converged(databases(members), timeout=5, nodes=members),
                90,
                f"the digests to be equal after {label}",
            )
            ticks = {r["id"] for r in members[0].client().all_records("live", "ticks")}
            assert writer.written <= ticks, f"writes lost after {label}"
        finally:
            writer.resume()
        checked.append(label)
        return digest

    try:
        admin_a, admin_b, admin_c = a.admin(), b.admin(), c.admin()
        # -- data and schema ------------------------------------------------------------
        created = admin_a.ok(
            {"operation": "create_database", "database": "dev", "replicated": True}
        )
        assert all(r["ok"] for r in created["replicated"]), created
        admin_b.ok(
            {"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"}
        )
        # On c once b's table has reached it (NOT_FOUND until then changes nothing).
        wait_for(
            lambda: admin_c.ok(
                {
                    "operation": "create_attribute",
                    "database": "dev",
                    "table": "dog",
                    "attribute": "breed",
                    "indexed": True,
                }
            ),
            30,
            "create_attribute on c",
        )
        check("create_database, create_table, create_attribute")

        admin_a.ok(
            {
                "operation": "insert",
                "database": "dev",
                "table": "dog",
                "records": [
                    {"id": i, "name": f"dog{i}", "breed": "pug", "age": i} for i in range(1, 7)
                ],
            }
        )
        admin_b.ok(
            {
                "operation": "update",
                "database": "dev",
                "table": "dog",
                "records": [{"id": 2, "age": 20}],
            }
        )
        admin_c.ok(
            {
                "operation": "upsert",
                "database": "dev",
                "table": "dog",
                "records": [{"id": 7, "name": "Rex"}],
            }
        )
        deleted = c.client().delete("dev", "dog", [3])
        check("insert, update, upsert, delete")

        loaded = admin_b.job(
            {
                "operation": "csv_data_load",
                "database": "dev",
                "table": "dog",
                "action": "upsert",
                "data": "id,name,age\n8,Pip,1\n1,Penny,5\n",
            }
        )
        assert loaded["status"] == "COMPLETE" and loaded["result"]["written"] == 2
        check("csv_data_load")

        admin_a.ok(
            {
                "operation": "revert_transaction",
                "database": "dev",
                "origin": c.name,
                "version": str(deleted.version),
            }
        )
        check("revert_transaction")
        assert dogs(c)[3]["name"] == "dog3"

        # -- backups ----------------------------------------------------------------------
        admin_a.ok({"operation": "get_backup", "database": "dev", "name": "b1"})
        at_b1 = dogs(a)
        for node in (b, c):
            backup_path(node, "b1").parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(backup_path(a, "b1"), backup_path(node, "b1"))
        admin_b.ok({"operation": "restore_backup", "backup": "b1", "database": "dev_copy"})
        check("restore_backup under another name")
        assert dogs(c, "dev_copy") == at_b1

        admin_a.ok(
            {
                "operation": "update",
                "database": "dev",
                "table": "dog",
                "records": [{"id": 5, "age": 50}],
            }
        )
        cluster.wait_converged(["dev"], timeout=60)
        admin_c.ok({"operation": "drop_database", "database": "dev"})
        admin_c.ok({"operation": "restore_backup", "backup": "b1", "database": "dev"})
        check("drop_database and restore_backup over a replicated database")
        assert dogs(c)[5]["age"] == 50

        # -- schema drops and log purges ---------------------------------------------------
        dropped = admin_a.ok(
            {
                "operation": "drop_attribute",
                "database": "dev",
                "table": "dog",
                "attribute": "age",
                "replicated": True,
            }
        )
        assert all(r["ok"] for r in dropped["replicated"]), dropped
        check("drop_attribute (replicated)")

        admin_b.job(
            {
                "operation": "delete_audit_logs_before",
                "database": "dev",
                "table": "dog",
                "timestamp": int(time.time() * 1000),
            }
        )
        check("delete_audit_logs_before")

        # -- certificates ----------------------------------------------------------------
        _, certificate = self_signed("partner.example", ["partner.example"])
        admin_b.ok(
            {"operation": "add_certificate", "name": "partner", "certificate": certificate.decode()}
        )
        check("add_certificate")
        admin_c.ok({"operation": "remove_certificate", "name": "partner"})
        check("remove_certificate")

        # -- membership --------------------------------------------------------------------
        admin_a.ok(
            {
                "operation": "set_node_replication",
                "hostname": c.name,
                "subscriptions": [
                    {"database": "dev", "table": "dog", "publish": True, "subscribe": True}
                ],
            }
        )
        admin_b.ok(
            {
                "operation": "upsert",
                "database": "dev_copy",
                "table": "dog",
                "records": [{"id": 99, "name": "while narrowed"}],
            }
        )
        admin_a.ok({"operation": "update_node", "hostname": c.name, "subscriptions": []})
        check("update_node / set_node_replication (narrowed, then cleared)")
        assert dogs(c, "dev_copy")[99]["name"] == "while narrowed"

        admin_b.ok({"operation": "remove_node", "hostname": c.name})
        wait_for(lambda: c.status().removed, 30, "c to learn it was removed")
        check("remove_node", [a, b])
        admin_a.ok({"operation": "add_node", "hostname": c.name})
        wait_for(
            lambda: all(x.connected(y.name) for x in cluster for y in cluster if x is not y),
            30,
            "every node connected again",
        )
        check("add_node (a removed node added back)")

        configured = admin_a.ok(
            {
                "operation": "configure_cluster",
                "connections": [{"hostname": b.name}, {"hostname": c.name}],
            }
        )
        assert configured["removed"] == []
        check("configure_cluster")

        admin_a.ok({"operation": "cluster_set_routes", "routes": [{"host": b.name, "port": 9933}]})
        check("cluster_set_routes")
        admin_a.ok({"operation": "cluster_delete_routes", "routes": [{"host": b.name}]})
        check("cluster_delete_routes")

        admin_a.ok({"operation": "rebalance"})
        check("rebalance")

        admin_b.ok_within({"operation": "restart_service", "service": "replicator"}, 90)
        check("restart_service replicator")

        # -- cluster-wide drops -----------------------------------------------------------
        for operation in (
            {"operation": "drop_table", "database": "dev_copy", "table": "dog", "replicated": True},
            {"operation": "drop_database", "database": "dev", "replicated": True},
        ):
            result = admin_c.ok(operation)
            assert all(r["ok"] for r in result["replicated"]), result
            check(f"{operation['operation']} (replicated)")
    finally:
        writer.stop()

    assert len(checked) == 20
    assert len(writer.written) > 0
    for node in cluster:
        assert {r["id"] for r in node.client().all_records("live", "ticks")} == writer.written
