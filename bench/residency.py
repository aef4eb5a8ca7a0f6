"""Residency benchmark: disk used per node in a 4-node cluster with `replicateTo: 2`
against full replication. Starts its own clusters (real processes, TLS between peers)
and prints `name value` lines.

    python bench/residency.py [--records N] [--payload BYTES]

Figures, for full replication (`full_`) and `replicateTo: 2` (`residency2_`):
  <mode>_node<i>_bytes, <mode>_total_bytes   each node's storage directory (RocksDB
                                            files and write-ahead log) once every node
                                            counts every record and storage stopped
  <mode>_node<i>_record_bytes               the record states it holds (whole records and
                                            stubs), without log, indexes or overhead
  residency2_vs_full                        total disk, residency2 / full
  residency2_vs_full_records                total record bytes, residency2 / full

and, on a separate cluster of four nodes with `replicateTo: 2` holding
``--rebalance-records`` records, to which a fifth node is added:
  rebalance_records                         records in the table
  rebalance_rehomed                         residencies the rebalance moved (all nodes)
  rebalance_pass_seconds                    from the replicated `rebalance` call until
                                            every node finished its pass
  rebalance_seconds                         from the replicated `rebalance` call until
                                            every node finished its pass and every record
                                            is whole on exactly its new residents
  rebalance_records_per_s                   rebalance_records / rebalance_seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.storage.v1 import storage_pb2 as pb

from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

DB = "bench"
TABLE = "docs"


def record(i: int, payload: int) -> bytes:
    # Random bytes as hex: RocksDB's compression must not make the payload free.
    return orjson.dumps({"id": i, "group": i % 16, "body": os.urandom(payload // 2).hex()})


def count(node: Node) -> int:
    try:
        return int(node.client().describe(DB, TABLE).record_count)
    except grpc.RpcError:
        return 0


def caught_up(node: Node, records: int) -> bool:
    return count(node) == records


def record_bytes(node: Node) -> int:
    """Bytes of the record states a node holds (whole records and stubs), from its
    storage's Snapshot: the data alone, without the log, indexes or RocksDB overhead."""
    client = node.internal_client()
    chunks = client.stream("Snapshot", pb.SnapshotRequest(database=DB, tables=[TABLE]))
    return sum(len(row.state) for chunk in chunks for row in chunk.rows)


def has_table(node: Node) -> bool:
    try:
        node.client().describe(DB, TABLE)
        return True
    except grpc.RpcError:
        return False


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def fill(
    workdir: Path, name: str, records: int, payload: int, config: dict[str, Any]
) -> tuple[list[int], list[int]]:
    """(disk bytes, record-state bytes) per node after filling a 4-node cluster."""
    cluster = Cluster(workdir / name, size=4, config=config).start()
    try:
        cluster.wait_connected()
        cluster.wait_members()
        cluster[0].client().create_table(DB, TABLE, indexed=["group"])
        for node in cluster:
            wait_for(partial(has_table, node), 30, f"{node.name} to have the table")
        batch = 500
        for n, start in enumerate(range(0, records, batch)):
            cluster[n % 4].client().call(
                "Insert",
                pb.InsertRequest(
                    database=DB,
                    table=TABLE,
                    records=[record(i, payload) for i in range(start, min(records, start + batch))],
                ),
            )
        for node in cluster:
            wait_for(partial(caught_up, node, records), 300, f"{node.name} to catch up")
        logical = [record_bytes(node) for node in cluster]
        for node in cluster:
            node.stop()
        disk = [directory_bytes(Path(node.config["rootPath"]) / "database") for node in cluster]
        return disk, logical
    finally:
        cluster.close()


def _insert(node: Node, start: int, end: int, payload: int) -> None:
    node.client().call(
        "Insert",
        pb.InsertRequest(
            database=DB, table=TABLE, records=[record(i, payload) for i in range(start, end)]
        ),
        timeout=120,
    )


def _rebalanced(node: Node) -> dict[str, Any] | None:
    status = node.admin().ok({"operation": "cluster_status"})["residency"]["rebalance"]
    return status if status["passes"] and not status["running"] else None


def _placed(cluster: Cluster, records: int) -> bool:
    """Every record whole on exactly its residents, as every node lists them."""
    whole: dict[Any, set[str]] = {}
    listed: dict[Any, tuple[str, ...]] = {}
    for node in cluster:
        client = node.internal_client()
        request = pb.SnapshotRequest(database=DB, tables=[TABLE])
        for chunk in client.stream("Snapshot", request, timeout=300):
            for row in chunk.rows:
                state = orjson.loads(row.state)
                residents = tuple(state[5][2])
                if listed.setdefault(row.id, residents) != residents:
                    return False
                if node.name in residents and not state[5][3]:
                    whole.setdefault(row.id, set()).add(node.name)
    return len(listed) == records and all(
        whole.get(pk, set()) == set(residents) for pk, residents in listed.items()
    )


def rebalance(workdir: Path, records: int, payload: int) -> tuple[float, float, int]:
    """(seconds until every node's pass finished, seconds until every record is placed,
    residencies moved) for a rebalance after a fifth node joins four."""
    config = {"replication": {"databases": [{"name": DB, "replicateTo": 2}]}}
    cluster = Cluster(
        workdir / "rebalance", size=5, config=config, services=("storage", "replicator", "admin")
    )
    try:
        first = cluster.nodes[:4]
        for node in first:
            node.start()
        writer = first[0].client()
        names = {n.name for n in first}
        wait_for(
            lambda: {r["name"] for r in writer.all_records("system", "hdb_nodes", "name")} >= names,
            60,
            "the first four members",
        )
        writer.create_table(DB, TABLE, indexed=["group"])
        for node in first:
            wait_for(partial(has_table, node), 30, f"{node.name} to have the table")
        batch = 2000
        for n, start in enumerate(range(0, records, batch)):
            _insert(first[n % 4], start, min(records, start + batch), payload)
        for node in first:
            wait_for(partial(caught_up, node, records), 600, f"{node.name} to catch up")
        cluster[4].start()
        cluster.wait_members(timeout=60)
        wait_for(partial(caught_up, cluster[4], records), 600, "the new node to catch up")
        started = time.monotonic()
        cluster[0].admin().ok({"operation": "rebalance", "database": DB})
        done = [wait_for(partial(_rebalanced, n), 1800, f"{n.name}'s rebalance") for n in cluster]
        passes = time.monotonic() - started
        wait_for(partial(_placed, cluster, records), 1800, "every record on its residents", 1.0)
        return passes, time.monotonic() - started, sum(int(d["rehomed"]) for d in done)
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=1000)
    parser.add_argument("--rebalance-records", type=int, default=100_000)
    parser.add_argument("--rebalance-payload", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        workdir = Path(tmp)
        full, full_data = fill(workdir, "full", args.records, args.payload, {})
        residency = {"replication": {"databases": [{"name": DB, "replicateTo": 2}]}}
        resident, resident_data = fill(workdir, "residency2", args.records, args.payload, residency)
        passes, seconds, rehomed = rebalance(
            workdir, args.rebalance_records, args.rebalance_payload
        )
    for label, sizes, data in (
        ("full", full, full_data),
        ("residency2", resident, resident_data),
    ):
        for i, size in enumerate(sizes):
            print(f"{label}_node{i + 1}_bytes {size}")
        print(f"{label}_total_bytes {sum(sizes)}")
        for i, size in enumerate(data):
            print(f"{label}_node{i + 1}_record_bytes {size}")
    print(f"residency2_vs_full {sum(resident) / sum(full):.3f}")
    print(f"residency2_vs_full_records {sum(resident_data) / sum(full_data):.3f}")
    print(f"rebalance_records {args.rebalance_records}")
    print(f"rebalance_rehomed {rehomed}")
    print(f"rebalance_pass_seconds {passes:.1f}")
    print(f"rebalance_seconds {seconds:.1f}")
    print(f"rebalance_records_per_s {args.rebalance_records / seconds:.0f}")


if __name__ == "__main__":
    main()
