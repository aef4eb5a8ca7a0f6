"""Readers that never read: starts its own node (a real storage process, TLS on its
client port), fills a table, opens ``--readers`` connections that each start a search
stream over the whole table and never read it, then times ordinary inserts from another
client meanwhile. Prints ``name value`` lines.

    python bench/idle_readers.py [--readers 500] [--records 200000] [--inserts 200]

Figures:
  storage_rss_mb_before       storage's resident memory with the table loaded
  storage_rss_mb_readers      the highest it reached while the readers held their streams
  streams_started_s           how long until every stream had reached the server
  streams_open                streams the server was serving at once (the rest were refused)
  streams_refused             streams refused at once (RESOURCE_EXHAUSTED, over the limits)
  insert_p50_ms, insert_p99_ms
                              one-record Insert calls, one after another, meanwhile
  streams_idle_closed         streams closed by storage.streamIdleTimeout by the end
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.storage.v1 import storage_pb2 as pb

from services.common.auth import basic_metadata
from tests.harness.client import StorageClient, cond
from tests.harness.node import PASSWORD, Node
from tests.harness.wait import wait_for
from tests.monitoring.scrape import scrape

PAD = "x" * 150
MIB = 1024 * 1024
SEARCH = "shoal.storage.v1.StorageService/SearchByConditions"


def _fill(client: StorageClient, records: int) -> None:
    client.create_table("bench", "wide")
    for start in range(0, records, 5000):
        batch = [{"id": i, "n": i, "pad": PAD} for i in range(start, min(records, start + 5000))]
        client.insert("bench", "wide", batch)


def _rss(node: Node) -> int:
    return int(psutil.Process(node.processes["storage"].pid).memory_info().rss)


def _stream_metrics(node: Node) -> dict[str, float]:
    """Started search calls, and the stream-limit counters when the node has them."""
    result = scrape(node, "storage")
    figures = {"started": result.value("grpc_server_call_started_total", grpc_method=SEARCH) or 0}
    for name in ("shoal_storage_streams_open", "shoal_storage_streams_idle_closed_total"):
        figures[name] = result.value(name) or 0
    figures["refused"] = sum(s.value for s in result.find("shoal_storage_streams_refused_total"))
    return figures


def idle_readers(node: Node, readers: int) -> tuple[list[Any], list[grpc.Channel]]:
    """``readers`` connections, each with a search stream it never reads."""
    calls: list[Any] = []
    channels: list[grpc.Channel] = []
    request = pb.SearchByConditionsRequest(
        database="bench", table="wide", conditions=[cond("n", "greater_than_equal", 0)]
    )
    address, credentials, options = node.channel_args("storage")
    # A connection of its own each (local subchannel pool, in channel_args), with gRPC's
    # fixed initial window (no BDP probing), so that this one process can hold 500 of
    # them: otherwise every connection's window grows to megabytes of unread data here.
    options = [*options, ("grpc.http2.bdp_probe", 0)]
    for _ in range(readers):
        if credentials is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, credentials, options=options)
        client = StorageClient(node.storage_address, basic_metadata("admin", PASSWORD), channel)
        calls.append(client.stub.SearchByConditions(request, metadata=client.metadata, timeout=600))
        channels.append(channel)
    return calls, channels


def run(node: Node, readers: int, records: int, inserts: int) -> dict[str, float]:
    client = node.client()
    _fill(client, records)
    results: dict[str, float] = {"storage_rss_mb_before": _rss(node) / MIB}
    started_before = _stream_metrics(node)["started"]
    calls, channels = idle_readers(node, readers)
    opening = time.monotonic()
    wait_for(
        lambda: _stream_metrics(node)["started"] - started_before >= readers,
        900,
        "every stream to reach the server",
    )
    results["streams_started_s"] = time.monotonic() - opening
    peak = [_rss(node)]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], _rss(node))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(2.0)  # let the streams fill their windows
    latencies = []
    writer = node.client()
    for i in range(inserts):
        start = time.perf_counter()
        writer.insert("bench", "wide", [{"id": records + i, "n": -1, "pad": "fresh"}])
        latencies.append((time.perf_counter() - start) * 1000)
    stop.set()
    watcher.join()
    figures = _stream_metrics(node)
    results["storage_rss_mb_readers"] = peak[0] / MIB
    results["streams_open"] = figures["shoal_storage_streams_open"]
    results["streams_refused"] = figures["refused"]
    results["insert_p50_ms"] = statistics.median(latencies)
    results["insert_p99_ms"] = statistics.quantiles(latencies, n=100)[98]
    results["streams_idle_closed"] = figures["shoal_storage_streams_idle_closed_total"]
    for call in calls:
        call.cancel()
    for channel in channels:
        channel.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=500)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--inserts", type=int, default=200)
    parser.add_argument("--config", default="{}", help="shoal.yaml keys to add, as JSON")
    args = parser.parse_args()
    config = {"replication": {"securePort": 9933}, **orjson.loads(args.config)}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        node = Node(Path(tmp), name="bench-node", config=config)
        try:
            node.start("storage")
            results = run(node, args.readers, args.records, args.inserts)
        finally:
            node.close()
    for name, value in results.items():
        print(f"{name} {value:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
