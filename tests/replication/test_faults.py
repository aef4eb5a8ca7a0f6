"""Faults under load: kill -9 of any process never loses an acknowledged write; a stopped
node does not make the others' memory grow, and it catches up."""

from __future__ import annotations

import random
import signal
import threading
import time

import grpc
import orjson
import psutil
import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.cluster import Cluster
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class Load:
    """Writers inserting unique keys on every node, remembering what was acknowledged."""

    def __init__(self, cluster: Cluster, rate_per_node: float) -> None:
        self.cluster = cluster
        self.interval = 1 / rate_per_node
        self.acked: set[str] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in cluster]

    def _run(self, node: Node) -> None:
        client = node.client()
        n = 0
        while not self.stop.is_set():
            key = f"{node.name}-{n}"
            n += 1
            try:
                client.call(
                    "Insert",
                    pb.InsertRequest(
                        database="load", table="t", records=[orjson.dumps({"id": key, "n": n})]
                    ),
                    timeout=5,
                )
            except grpc.RpcError:
                continue  # not acknowledged: the node is down
            with self.lock:
                self.acked.add(key)
            time.sleep(self.interval)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_kill_9_under_load_loses_no_acknowledged_write(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3)
    cluster[0].client().create_table("load", "t")
    cluster.wait_converged()
    chooser = random.Random(7)
    with Load(cluster, rate_per_node=40) as load:
        for _ in range(6):
            node = chooser.choice(cluster.nodes)
            service = chooser.choice(["storage", "replicator"])
            wait_for(lambda: len(load.acked) > 0, 10, "some acknowledged writes")
            node.kill(service, signal.SIGKILL)
            if service == "storage":
                node.stop("replicator")  # it reconnects on its own; restart both cleanly
                node.start_service("storage")
                node.start_service("replicator")
            else:
                node.start_service("replicator")
            time.sleep(0.5)  # let load run between faults (pacing, not synchronization)
    cluster.wait_converged(timeout=120)
    held = {r["id"] for r in cluster[0].client().all_records("load", "t")}
    lost = load.acked - held
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:5]}"
    assert len(load.acked) > 100


def _rss(node: Node, service: str) -> int:
    return int(psutil.Process(node.processes[service].pid).memory_info().rss)


# What a stopped peer must not make grow: the replicators hold at most a window per
# stream. Storage grows with what is written, whoever receives it: RocksDB keeps up to
# 64 MB per column family in memtables before flushing, and the log, its index and the
# records are written here.
REPLICATOR_GROWTH_MB = 60
STORAGE_GROWTH_MB = 3 * 64 + 60


def test_stopped_node_keeps_others_bounded_and_catches_up(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3)
    a, b, c = cluster[0], cluster[1], cluster[2]
    a.client().create_table("load", "t")
    cluster.wait_converged()
    for node in (c,):
        for service in ("storage", "replicator"):
            node.kill(service, signal.SIGSTOP)
    # The silent peer is detected (peerTimeout) and its connections torn down.
    wait_for(lambda: not a.connection(c.name).connected, 20, "a to notice c is silent")
    watched = [(node, service) for node in (a, b) for service in ("storage", "replicator")]
    baseline = {w: _rss(*w) for w in watched}
    peak = dict(baseline)
    try:
        client = a.client()
        deadline = time.monotonic() + 10
        n = 0
        while time.monotonic() < deadline:
            client.insert("load", "t", [{"id": f"s{n + i}", "pad": "y" * 200} for i in range(200)])
            n += 200
            for w in watched:
                peak[w] = max(peak[w], _rss(*w))
    finally:
        for service in ("storage", "replicator"):
            c.kill(service, signal.SIGCONT)
    growth = {f"{node.name} {service}": (peak[node, service] - baseline[node, service]) / 1e6
              for node, service in watched}  # fmt: skip
    limits = {"replicator": REPLICATOR_GROWTH_MB, "storage": STORAGE_GROWTH_MB}
    over = {k: round(v) for k, v in growth.items() if v >= limits[k.split()[1]]}
    assert not over, f"grew too much (MB) while a node was stopped: {over}; all: {growth}"
    cluster.wait_converged(timeout=120)
    assert len(c.client().all_records("load", "t")) == n


def test_write_acked_just_before_a_crash_reaches_peers_after_restart(
    make_cluster: MakeCluster,
) -> None:
    # Harper issue #1949: a write acknowledged just before its node crashed must reach the
    # peers once the node is back, without any newer write to carry it along.
    cluster = make_cluster(size=2)
    a, b = cluster[0], cluster[1]
    a.client().create_table("db", "t")
    cluster.wait_converged()
    a.kill("replicator", signal.SIGKILL)  # nothing leaves a from here on
    reply = a.client().insert("db", "t", [{"id": "last-words"}])
    assert list(reply.inserted_ids) == [b'"last-words"']
    a.kill("storage", signal.SIGKILL)
    a.start_service("storage")
    a.start_service("replicator")
    wait_for(
        lambda: b.client().get("db", "t", ["last-words"]) == [{"id": "last-words"}],
        30,
        "the acknowledged write on b",
    )
