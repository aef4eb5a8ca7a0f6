"""The Prometheus endpoints of real node processes, scraped over HTTP and parsed."""

from __future__ import annotations

import importlib.metadata
import socket
import urllib.error
from typing import Any

import grpc
import pytest
from shoal.storage.v1 import storage_pb2 as pb

from services.storage.db import COLUMN_FAMILIES
from tests.conftest import MakeCluster, MakeNode
from tests.harness.node import Node
from tests.harness.wait import wait_for
from tests.monitoring.scrape import Scrape, scrape

STORAGE = "shoal.storage.v1.StorageService"
REPLICATOR = "shoal.replicator.v1.ReplicatorService"
STARTED = "grpc_server_call_started_total"
DURATION = "grpc_server_call_duration_seconds"


def check_histogram(result: Scrape, **labels: str) -> float:
    """Checks one duration histogram is well formed; returns its count."""
    buckets = result.find(f"{DURATION}_bucket", **labels)
    assert buckets, f"no histogram for {labels}"
    values = [b.value for b in sorted(buckets, key=lambda b: float(b.labels["le"]))]
    assert values == sorted(values), "bucket counts must be cumulative"
    assert buckets[-1].labels["le"] == "+Inf" or any(b.labels["le"] == "+Inf" for b in buckets)
    count = result.value(f"{DURATION}_count", **labels)
    assert count == values[-1]
    total = result.value(f"{DURATION}_sum", **labels)
    assert total is not None and total >= 0
    return count


def test_storage_endpoint_reports_calls_records_and_rocksdb(make_node: MakeNode) -> None:
    node = make_node()
    client = node.client()
    client.create_table("dev", "dog")
    before = scrape(node, "storage")
    assert before.content_type.startswith("text/plain")

    for start in range(0, 21, 3):
        client.insert(
            "dev", "dog", [{"id": i, "name": f"dog {i}"} for i in range(start, start + 3)]
        )
    client.delete("dev", "dog", [0])
    client.expect(
        grpc.StatusCode.ALREADY_EXISTS,
        "CreateTable",
        pb.CreateTableRequest(database="dev", table="dog"),
    )
    after = scrape(node, "storage")

    # Per-RPC metrics (gRFC A66), for Shoal's own methods only.
    insert = f"{STORAGE}/Insert"
    assert after.value(STARTED, grpc_method=insert) == 7
    assert check_histogram(after, grpc_method=insert, grpc_status="OK") == 7
    assert after.value(STARTED, grpc_method=f"{STORAGE}/Delete") == 1
    create = f"{STORAGE}/CreateTable"
    assert after.value(STARTED, grpc_method=create) == 2
    assert check_histogram(after, grpc_method=create, grpc_status="OK") == 1
    assert check_histogram(after, grpc_method=create, grpc_status="ALREADY_EXISTS") == 1
    methods = after.label_values(STARTED, "grpc_method")
    assert methods and all(m.startswith(f"{STORAGE}/") for m in methods), methods
    assert not any("health" in m.lower() or "reflection" in m.lower() for m in methods)

    # Storage metrics, read at scrape time.
    assert after.value("shoal_storage_records", database="dev", table="dog") == 20
    for name in ("shoal_storage_local_transactions_total", "shoal_storage_commits_total"):
        delta = (after.value(name) or 0) - (before.value(name) or 0)
        assert delta == 8, f"{name} grew by {delta}"
    assert after.value("shoal_storage_applied_transactions_total") == 0
    assert (after.value("shoal_storage_log_transactions") or 0) >= 8
    assert (after.value("shoal_storage_log_size_bytes") or 0) > 0
    for name in (
        "shoal_storage_rocksdb_live_data_bytes",
        "shoal_storage_rocksdb_sst_files_bytes",
        "shoal_storage_rocksdb_memtable_bytes",
        "shoal_storage_rocksdb_estimated_keys",
    ):
        assert after.label_values(name, "column_family") == set(COLUMN_FAMILIES), name
    assert (after.value("shoal_storage_rocksdb_estimated_keys", column_family="data") or 0) > 0
    assert (after.value("shoal_storage_data_directory_bytes") or 0) > 0
    size = after.value("shoal_storage_filesystem_size_bytes") or 0
    free = after.value("shoal_storage_filesystem_free_bytes") or 0
    assert size >= free > 0

    # Build and process information; no _created series.
    version = importlib.metadata.version("shoal")
    assert after.value("shoal_build_info", service="storage", version=version) == 1
    assert (after.value("process_resident_memory_bytes") or 0) > 0
    assert not [s.name for s in after.samples if s.name.endswith("_created")]


def test_failed_sign_in_is_counted_by_status(make_node: MakeNode) -> None:
    node = make_node()
    node.client().create_table("dev", "dog")
    intruder = node.client(password="not-the-password")
    intruder.expect(
        grpc.StatusCode.UNAUTHENTICATED,
        "Insert",
        pb.InsertRequest(database="dev", table="dog", records=[b'{"id": 1}']),
    )
    result = scrape(node, "storage")
    insert = f"{STORAGE}/Insert"
    assert result.value(STARTED, grpc_method=insert) == 1
    assert check_histogram(result, grpc_method=insert, grpc_status="UNAUTHENTICATED") == 1
    assert not result.find(f"{DURATION}_count", grpc_method=insert, grpc_status="OK")
    assert result.value("shoal_storage_records", database="dev", table="dog") == 0


def test_metrics_can_be_turned_off(make_node: MakeNode) -> None:
    node = make_node(config={"metrics": {"enabled": False}})
    node.client().create_table("dev", "dog")
    with pytest.raises(urllib.error.URLError):
        scrape(node, "storage")


def test_metrics_port_can_be_moved(make_node: MakeNode) -> None:
    node = make_node(config={"metrics": {"storagePort": 9951}})
    node.client().create_table("dev", "dog")
    assert scrape(node, "storage").value("shoal_storage_records", database="dev", table="dog") == 0


def test_a_taken_metrics_port_stops_the_service(make_node: MakeNode) -> None:
    node = make_node(start=False)
    with socket.socket() as taken:
        taken.bind((node.host, 9941))
        taken.listen()
        node.start_service("storage", wait=False)
        code = node.processes["storage"].wait(timeout=60)
    assert code == 1
    log = node.log_path("storage").read_text()
    assert "cannot serve metrics" in log and f"{node.host}:9941" in log


@pytest.mark.cluster
def test_replication_metrics_of_a_two_node_cluster(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    cluster.wait_members()  # the nodes' own membership rows are local writes
    local_before = scrape(b, "storage").value("shoal_storage_local_transactions_total") or 0
    client = a.client()
    client.create_table("db", "t")
    for start in range(0, 50, 10):
        client.insert("db", "t", [{"id": i} for i in range(start, start + 10)])

    def records_on_b() -> bool:
        return scrape(b, "storage").value("shoal_storage_records", database="db", table="t") == 50

    wait_for(records_on_b, 30, "b's records gauge to show a's 50 records")
    b_storage = scrape(b, "storage")
    assert (b_storage.value("shoal_storage_applied_transactions_total") or 0) >= 6
    local_after = b_storage.value("shoal_storage_local_transactions_total") or 0
    assert local_after == local_before  # a's writes were applied on b, not committed there

    def settled(node: Node, peer: str) -> Scrape | None:
        result = scrape(node, "replicator")
        backlog = result.value("shoal_replication_backlog_transactions", peer=peer, database="db")
        ok = (
            result.value("shoal_replication_connected", peer=peer) == 1
            and (result.value("shoal_replication_latency_seconds", peer=peer) or 0) > 0
            and backlog == 0
        )
        return result if ok else None

    on_a = wait_for(lambda: settled(a, b.name), 30, "a's view of b to settle")
    on_b = wait_for(lambda: settled(b, a.name), 30, "b's view of a to settle")

    for result, peer in ((on_a, b.name), (on_b, a.name)):
        # Peer names only (never addresses or keys), bounded by the cluster.
        assert result.label_values("shoal_replication_connected", "peer") == {peer}
        ratio = result.value("shoal_replication_back_pressure_ratio", peer=peer)
        assert ratio is not None and 0 <= ratio <= 1
        assert result.value("shoal_build_info", service="replicator") == 1
        assert not [s.name for s in result.samples if s.name.endswith("_created")]

    lag = on_b.value("shoal_replication_lag_seconds", peer=a.name, database="db")
    assert lag is not None and lag >= 0
    assert (on_b.value("shoal_replication_received_transactions_total", peer=a.name) or 0) >= 6
    assert (on_b.value("shoal_replication_received_bytes_total", peer=a.name) or 0) > 0
    received_at = on_b.value(
        "shoal_replication_last_received_timestamp_seconds", peer=a.name, database="db"
    )
    assert received_at is not None and received_at > 1.6e9
    assert (on_a.value("shoal_replication_sent_transactions_total", peer=b.name) or 0) >= 6
    assert (on_a.value("shoal_replication_sent_bytes_total", peer=b.name) or 0) > 0

    # The Replicate stream is served (and counted) by the node that accepted it.
    replicate = f"{REPLICATOR}/Replicate"
    streams: Any = sum(r.value(STARTED, grpc_method=replicate) or 0 for r in (on_a, on_b))
    assert streams >= 1
