"""Restores in a replicating cluster (three TLS nodes): a database restored under another
name reaches every peer whole and identical, and a restore over a replicated database
converges with the peers without a restart, newer peer data winning by last-writer-wins
(the restored node's own later writes included)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from shoal.admin.v1 import admin_pb2 as apb

from tests.conftest import MakeCluster
from tests.harness.admin import AdminClient
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

ALL = ("storage", "replicator", "admin")
CHUNK = 64 * 1024


def records(node: Node, database: str) -> list[dict[str, Any]]:
    return node.client().all_records(database, "dog")


def backup_file(node: Node, name: str) -> Path:
    return Path(node.config["rootPath"]) / "backups" / f"{name}.tar.gz"


def restore_typed(admin: AdminClient, archive: bytes, database: str) -> apb.RestoreBackupResponse:
    def requests() -> Any:
        yield apb.RestoreBackupRequest(header=apb.RestoreBackupHeader(database=database))
        for start in range(0, len(archive), CHUNK):
            yield apb.RestoreBackupRequest(chunk=archive[start : start + CHUNK])

    response: apb.RestoreBackupResponse = admin.stub.RestoreBackup(
        requests(), metadata=admin.metadata, timeout=60
    )
    return response


def test_restores_converge_across_the_cluster(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(services=ALL)
    a, b, c = cluster
    cluster.wait_connected()
    ca, cb, cc = a.client(), b.client(), c.client()
    ca.create_table("dev", "dog")
    ca.insert(
        "dev",
        "dog",
        [{"id": i, "name": f"dog{i}", "age": i, "owner": "alice"} for i in (1, 2, 3, 4)],
    )
    cluster.wait_converged(["dev"])
    # Writes of every origin: an update on a, a delete on b, its revert on c, an update on b.
    ca.update("dev", "dog", [{"id": 1, "age": 10}])
    cluster.wait_converged(["dev"])
    deleted = cb.delete("dev", "dog", [2])
    cluster.wait_converged(["dev"])
    c.admin().ok(
        {
            "operation": "revert_transaction",
            "database": "dev",
            "origin": b.name,
            "version": str(deleted.version),
        }
    )
    cluster.wait_converged(["dev"])
    cb.update("dev", "dog", [{"id": 4, "owner": "bob"}])
    cluster.wait_converged(["dev"])

    a.admin().ok({"operation": "get_backup", "database": "dev", "name": "b1"})
    at_b1 = records(a, "dev")
    cc.update("dev", "dog", [{"id": 1, "owner": "carol"}])
    cluster.wait_converged(["dev"])
    until = int(time.time() * 1000)
    wait_for(lambda: time.time() * 1000 > until + 1, 5, "the clock to pass the restore time")
    ca.update("dev", "dog", [{"id": 1, "age": 99, "owner": "mallory"}])
    ca.update("dev", "dog", [{"id": 2, "age": 3}])
    cc.delete("dev", "dog", [3])  # c's own write after b1
    cb.insert("dev", "dog", [{"id": 10, "name": "late-b"}])
    ca.insert("dev", "dog", [{"id": 11, "name": "late-a"}])
    cluster.wait_converged(["dev"])
    a.admin().ok({"operation": "get_backup", "database": "dev", "name": "b2"})
    final = records(a, "dev")

    # 1. Restored under another name, on a (point in time) and on b (typed): every peer
    # gets the whole database, identical to the restoring node's.
    a.admin().ok(
        {
            "operation": "restore_backup",
            "backup": "b1",
            "log_backup": "b2",
            "until": until,
            "database": "dev_pitr",
        }
    )
    expected_pitr = [
        {**r, "owner": "carol"} if r["id"] == 1 else r for r in at_b1
    ]  # b1 plus c's update, before `until`
    assert records(a, "dev_pitr") == expected_pitr
    restore_typed(b.admin(), backup_file(a, "b1").read_bytes(), "dev_copy")
    cluster.wait_converged(["dev_pitr", "dev_copy"], timeout=30)
    for node in cluster:
        assert records(node, "dev_pitr") == expected_pitr
        assert records(node, "dev_copy") == at_b1

    # 2. Restored over the replicated database on c: c converges with its peers at once,
    # and newer writes win wherever they were made (c's own delete of id 3 included).
    c.admin().ok({"operation": "drop_database", "database": "dev"})
    backups = backup_file(c, "b1")
    backups.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copyfile(backup_file(a, "b1"), backups)
    c.admin().ok({"operation": "restore_backup", "backup": "b1", "database": "dev"})
    cluster.wait_converged(["dev"], timeout=30)
    for node in cluster:
        assert records(node, "dev") == final
    assert [r["id"] for r in final] == [1, 2, 4, 10, 11]
    # The cluster keeps replicating that database both ways.
    cc.insert("dev", "dog", [{"id": 12, "name": "after-restore"}])
    ca.insert("dev", "dog", [{"id": 13, "name": "after-restore"}])
    cluster.wait_converged(["dev", "dev_pitr", "dev_copy"], timeout=30)
    assert [r["id"] for r in records(b, "dev")] == [1, 2, 4, 10, 11, 12, 13]
