"""Replication benchmark: starts its own clusters (real processes, TLS between peers) and
prints `name value` lines.

    python bench/replication.py [--records N] [--lag-seconds S] [--offline-seconds S]

Figures:
  replicated_records_per_s  records written on A (1,000 per request) until all are on B
  lag_p50_ms, lag_p99_ms    3 nodes, 1,000 single-record writes/s on A (--rate): from the
                            writer's acknowledgement to committed on both other nodes
  lag_write_rate_per_s      the write rate the writer actually achieved meanwhile
  copy_records_per_s        200,000 records (~200 B) copied into an empty node
  catchup_s                 a node offline for 60 s under 1,000 writes/s: seconds from its
                            restart until it holds everything
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from services.common.auth import basic_metadata, bearer_metadata
from services.common.hlc import version_from_ms
from tests.harness.cluster import Cluster, mesh
from tests.harness.node import PASSWORD, Node
from tests.harness.wait import wait_for

PAD = "x" * 150


def record(i: int) -> bytes:
    return orjson.dumps({"id": i, "name": f"name-{i}", "pad": PAD})


def count(node: Node, table: str) -> int:
    try:
        return int(node.client().describe("bench", table).record_count)
    except grpc.RpcError:
        return 0


def insert_batches(node: Node, table: str, start: int, total: int) -> None:
    client = node.client()
    for s in range(start, start + total, 1000):
        client.call(
            "Insert",
            pb.InsertRequest(
                database="bench", table=table, records=[record(i) for i in range(s, s + 1000)]
            ),
            timeout=120,
        )


def replicated_records_per_s(workdir: Path, records: int) -> float:
    cluster = Cluster(workdir / "throughput", size=2).start()
    try:
        a, b = cluster[0], cluster[1]
        a.client().create_table("bench", "t")
        wait_for(
            lambda: b.client().call("DescribeAll", pb.DescribeAllRequest()).databases,
            30,
            "schema on B",
        )
        started = time.perf_counter()
        insert_batches(a, "t", 0, records)
        wait_for(lambda: count(b, "t") >= records, 600, "all records on B", interval=0.05)
        return records / (time.perf_counter() - started)
    finally:
        cluster.close()


class Arrivals:
    """Watches a node's log (storage Subscribe) and notes when each version commits."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.seen: dict[int, float] = {}
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        channel = self.node.socket_channel("storage")
        stub = storage_pb2_grpc.StorageNodeServiceStub(channel)
        # From now on: a watcher wants new commits, not a history (which a node that got
        # the database by a copy does not have, and says so with LOG_TRUNCATED).
        since = version_from_ms(int(time.time() * 1000) - 1000)
        stream = stub.Subscribe(
            pb.SubscribeRequest(
                databases=["bench"], heartbeat_interval_ms=200, default_version=since
            ),
            metadata=bearer_metadata(self.node.node_secret()),
        )
        try:
            for reply in stream:
                now = time.perf_counter()
                for txn in reply.transactions:
                    self.seen.setdefault(txn.version, now)
                self.ready.set()
                if self.stop.is_set():
                    break
        except grpc.RpcError as exc:
            if not self.stop.is_set():
                print(f"# watching {self.node.name} failed: {exc}", file=sys.stderr)
        finally:
            stream.cancel()
            channel.close()


async def paced_writes(
    node: Node, rate: int, seconds: float, table: str, start: int
) -> list[tuple[int, float]]:
    """Single-record inserts at `rate` per second; returns (version, ack time)."""
    channel = node.aio_channel("storage")
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    md = basic_metadata("admin", PASSWORD)
    acks: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    total = int(rate * seconds)
    in_flight: set[asyncio.Task[None]] = set()

    limit = asyncio.Semaphore(64)  # a writer that falls behind queues here, not in gRPC

    async def one(i: int) -> None:
        async with limit:
            request = pb.InsertRequest(database="bench", table=table, records=[record(i)])
            reply = await stub.Insert(request, metadata=md, timeout=30)
            acks.append((reply.version, time.perf_counter()))

    for n in range(total):
        due = t0 + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        in_flight.add(asyncio.create_task(one(start + n)))
    results = await asyncio.gather(*in_flight, return_exceptions=True)
    await channel.close()
    achieved = len(acks) / (time.perf_counter() - t0)
    errors = [r for r in results if isinstance(r, BaseException)]
    print(
        f"# paced writes: {len(acks)} acknowledged, {achieved:.0f}/s, {len(errors)} failed",
        file=sys.stderr,
    )
    for error in errors[:3]:
        detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else repr(error)
        print(f"#   {detail}", file=sys.stderr)
    return acks


def lag(workdir: Path, seconds: float, rate: int = 1000) -> tuple[float, float, float]:
    cluster = Cluster(workdir / "lag", size=3, topology=mesh).start()
    try:
        a, b, c = cluster[0], cluster[1], cluster[2]
        cluster.wait_connected()
        a.client().create_table("bench", "lag")
        cluster.wait_converged(["bench"])
        watchers = [Arrivals(b), Arrivals(c)]
        for w in watchers:
            w.thread.start()
            w.ready.wait(10)
        started = time.perf_counter()
        acks = asyncio.run(paced_writes(a, rate, seconds, "lag", 0))
        achieved = len(acks) / (time.perf_counter() - started)
        last = max(v for v, _ in acks)
        wait_for(lambda: all(last in w.seen for w in watchers), 300, "every write on B and C")
        for w in watchers:
            w.stop.set()
        lags = sorted((max(w.seen[v] for w in watchers) - t) * 1000 for v, t in acks)
        p99 = lags[int(len(lags) * 0.99) - 1]
        return statistics.median(lags), p99, achieved
    finally:
        cluster.close()


def copy_records_per_s(workdir: Path, records: int) -> float:
    cluster = Cluster(workdir / "copy", size=2, topology=lambda n: {n[0]: [], n[1]: [n[0]]})
    try:
        a, b = cluster[0], cluster[1]
        a.start("storage", "replicator")
        a.client().create_table("bench", "copy")
        insert_batches(a, "copy", 0, records)
        b.start_service("storage")
        b.start_service("replicator", wait=False)
        wait_for(lambda: b.health("replicator"), 60, "B's replicator to serve", interval=0.01)
        started = time.perf_counter()  # the copy starts now: B dials A, copies, then tails
        wait_for(lambda: count(b, "copy") >= records, 600, "the copy on B", interval=0.05)
        return records / (time.perf_counter() - started)
    finally:
        cluster.close()


def catchup_s(workdir: Path, offline: float) -> float:
    cluster = Cluster(workdir / "catchup", size=3).start()
    try:
        a, c = cluster[0], cluster[2]
        a.client().create_table("bench", "catchup")
        cluster.wait_converged(["bench"])
        c.stop("replicator", "storage")
        asyncio.run(paced_writes(a, 1000, offline, "catchup", 0))
        total = count(a, "catchup")
        started = time.perf_counter()
        c.start_service("storage")
        c.start_service("replicator")
        wait_for(lambda: count(c, "catchup") >= total, 600, "C caught up", interval=0.05)
        return time.perf_counter() - started
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--lag-seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=1000, help="writes/s for the lag figures")
    parser.add_argument("--offline-seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        work = Path(tmp)
        print(
            f"replicated_records_per_s {replicated_records_per_s(work, args.records):.0f}",
            flush=True,
        )
        p50, p99, achieved = lag(work, args.lag_seconds, args.rate)
        print(f"lag_p50_ms {p50:.1f}", flush=True)
        print(f"lag_p99_ms {p99:.1f}", flush=True)
        print(f"lag_write_rate_per_s {achieved:.0f}", flush=True)
        print(f"copy_records_per_s {copy_records_per_s(work, args.records):.0f}", flush=True)
        print(f"catchup_s {catchup_s(work, args.offline_seconds):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
