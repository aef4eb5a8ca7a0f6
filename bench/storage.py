"""Storage benchmark: starts its own node (a real storage process), prints `name value`.

    python bench/storage.py [--records N] [--seconds S]

Figures:
  insert_rpc_per_s              single-record Insert calls, 8 concurrent clients
  batched_insert_records_per_s  Insert with 1,000 records per request (no secondary index)
  batched_insert_indexed_records_per_s
                                the same into a table with one secondary index
  get_by_id_per_s               single-id SearchById calls, 8 concurrent clients
  search_by_value_per_s         indexed SearchByValue calls (one match), 8 concurrent clients
  apply_records_per_s           Apply of transactions from another origin, 1,000 records each
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc, types_pb2

from services.common.auth import basic_metadata, bearer_metadata
from services.common.grpcserver import channel_options
from tests.harness.node import PASSWORD, Node

CONCURRENCY = 8
PAD = "x" * 120


def record(i: int) -> bytes:
    return orjson.dumps({"id": i, "name": f"name-{i}", "group": i % 1000, "pad": PAD})


async def concurrent_calls(make_call: Callable[[int], Awaitable[None]], seconds: float) -> float:
    """Calls per second of `CONCURRENCY` loops issuing `make_call(i)` for `seconds`."""
    deadline = time.perf_counter() + seconds
    counter = [0]

    async def loop(worker: int) -> None:
        i = worker
        while time.perf_counter() < deadline:
            await make_call(i)
            counter[0] += 1
            i += CONCURRENCY

    start = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(CONCURRENCY)))
    return counter[0] / (time.perf_counter() - start)


async def run(
    address: str, socket: str, secret: str, records: int, seconds: float
) -> dict[str, float]:
    """``address``: the storage port; ``socket``: its node-local socket (for Apply)."""
    channel = grpc.aio.insecure_channel(address, options=channel_options())
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    node_channel = grpc.aio.insecure_channel(socket, options=channel_options())
    node_stub = storage_pb2_grpc.StorageNodeServiceStub(node_channel)
    md = basic_metadata("admin", PASSWORD)
    internal = bearer_metadata(secret)
    await stub.CreateTable(pb.CreateTableRequest(database="bench", table="rpc"), metadata=md)
    await stub.CreateTable(pb.CreateTableRequest(database="bench", table="batch"), metadata=md)
    await stub.CreateTable(
        pb.CreateTableRequest(database="bench", table="indexed", indexed_attributes=["group"]),
        metadata=md,
    )
    results: dict[str, float] = {}

    async def insert_one(i: int) -> None:
        await stub.Insert(
            pb.InsertRequest(database="bench", table="rpc", records=[record(i)]), metadata=md
        )

    results["insert_rpc_per_s"] = await concurrent_calls(insert_one, seconds)

    for table, figure in (
        ("batch", "batched_insert_records_per_s"),
        ("indexed", "batched_insert_indexed_records_per_s"),
    ):
        batches = [
            pb.InsertRequest(
                database="bench", table=table, records=[record(i) for i in range(s, s + 1000)]
            )
            for s in range(0, records, 1000)
        ]
        start = time.perf_counter()
        for request in batches:
            await stub.Insert(request, metadata=md, timeout=60)
        results[figure] = records / (time.perf_counter() - start)

    async def get_one(i: int) -> None:
        request = pb.SearchByIdRequest(
            database="bench", table="indexed", ids=[str(i % records).encode()]
        )
        async for _ in stub.SearchById(request, metadata=md):
            pass

    results["get_by_id_per_s"] = await concurrent_calls(get_one, seconds)

    async def search_one(i: int) -> None:
        request = pb.SearchByValueRequest(
            database="bench",
            table="indexed",
            attribute="group",
            value=str(i % 1000).encode(),
            limit=1,
        )
        async for _ in stub.SearchByValue(request, metadata=md):
            pass

    results["search_by_value_per_s"] = await concurrent_calls(search_one, seconds)

    base = (time.time_ns() // 1_000_000 - 60_000) << 16
    txns = []
    for n, s in enumerate(range(0, records, 1000)):
        txn = types_pb2.Transaction(
            origin="bench-peer", version=base + n, user="bench", database="bench"
        )
        txn.tables.add(name="applied", primary_key="id", replicate=True)
        for i in range(s, s + 1000):
            txn.writes.add(
                table="applied",
                kind=types_pb2.WRITE_KIND_PUT,
                operation=types_pb2.OPERATION_INSERT,
                id=str(i).encode(),
                value=record(i),
            )
        txns.append(txn)
    start = time.perf_counter()
    for txn in txns:
        await node_stub.Apply(pb.ApplyRequest(transactions=[txn]), metadata=internal, timeout=60)
    results["apply_records_per_s"] = records / (time.perf_counter() - start)
    await channel.close()
    await node_channel.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        node = Node(Path(tmp), name="bench-node")
        try:
            node.start("storage")
            results = asyncio.run(
                run(
                    node.storage_address,
                    node.socket_address("storage"),
                    node.node_secret(),
                    args.records,
                    args.seconds,
                )
            )
        finally:
            node.close()
    for name, value in results.items():
        print(f"{name} {value:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
