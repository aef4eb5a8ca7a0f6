"""Last-writer-wins: concurrent writes of the same keys on every node converge to the
write with the greatest (version, node name) among the acknowledged ones."""

from __future__ import annotations

import threading

import orjson
import pytest

from tests.conftest import MakeCluster
from tests.harness.node import Node

pytestmark = pytest.mark.cluster

KEYS = 200


def test_lww_register(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(size=3)
    cluster[0].client().create_table("lww", "reg")
    cluster.wait_converged(["lww"])
    acked: list[tuple[int, str, str, int]] = []  # (version, origin, key, seq)
    lock = threading.Lock()

    def writer(node: Node) -> None:
        client = node.client()
        for round_ in range(3):
            for start in range(0, KEYS, 20):
                batch = [
                    {"id": f"k{i}", "by": node.name, "seq": round_}
                    for i in range(start, start + 20)
                ]
                reply = client.upsert("lww", "reg", batch)
                with lock:
                    for raw in reply.upserted_ids:
                        acked.append((reply.version, node.name, orjson.loads(raw), round_))

    threads = [threading.Thread(target=writer, args=(node,)) for node in cluster]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cluster.wait_converged(["lww"], timeout=90)
    winners: dict[str, tuple[int, str, int]] = {}
    for version, origin, key, seq in acked:
        if key not in winners or (version, origin) > winners[key][:2]:
            winners[key] = (version, origin, seq)
    assert len(winners) == KEYS
    for node in cluster:
        held = {r["id"]: (r["by"], r["seq"]) for r in node.client().all_records("lww", "reg")}
        assert held == {k: (w[1], w[2]) for k, w in winners.items()}
