"""Write confirmation benchmark: starts its own 3-node cluster (real processes, TLS
between peers) and prints `name value` lines.

    python bench/confirmation.py [--writes N]

One client on node A writes single-record Inserts one after another, in rounds of
BLOCK writes with `replicated_confirmation` 0, then 1, then 2 (so the three see the same
machine load over time), and times each call from request to answer. Rounds rather than
alternating single writes: an unconfirmed write's replication still in flight would
delay the confirmed write after it, which is not what a client of one kind sees.

Figures:
  write_latency_p50_ms, write_latency_p99_ms                      no confirmation
  write_latency_confirmed1_p50_ms, write_latency_confirmed1_p99_ms  confirmation 1
  write_latency_confirmed2_p50_ms, write_latency_confirmed2_p99_ms  confirmation 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.storage.v1 import storage_pb2 as pb

from tests.harness.cluster import Cluster, mesh

LEVELS = (0, 1, 2)
BLOCK = 50
WARM_UP = 50
PAD = "x" * 150


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * fraction) - 1)]


def latencies(workdir: Path, writes: int) -> dict[int, list[float]]:
    cluster = Cluster(workdir / "confirmation", size=3, topology=mesh).start()
    try:
        cluster.wait_connected()
        client = cluster[0].client()
        client.create_table("bench", "confirm")
        cluster.wait_converged(["bench"])
        times: dict[int, list[float]] = {level: [] for level in LEVELS}
        for i in range(writes + WARM_UP):
            level = LEVELS[(i // BLOCK) % len(LEVELS)]
            request = pb.InsertRequest(
                database="bench",
                table="confirm",
                records=[orjson.dumps({"id": i, "pad": PAD})],
                replicated_confirmation=level,
            )
            started = time.perf_counter()
            client.call("Insert", request, timeout=30)
            if i >= WARM_UP:  # the first writes warm up channels and caches
                times[level].append((time.perf_counter() - started) * 1000)
        return times
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=3000, help="writes in all (3 levels)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        times = latencies(Path(tmp), args.writes)
    for level in LEVELS:
        name = "write_latency" if level == 0 else f"write_latency_confirmed{level}"
        print(f"{name}_p50_ms {statistics.median(times[level]):.2f}", flush=True)
        print(f"{name}_p99_ms {percentile(times[level], 0.99):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
