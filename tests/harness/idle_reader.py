"""Search streams that are never read: ``python -m tests.harness.idle_reader``.

It opens ``--streams`` connections to a storage port, starts on each a search over the
whole of ``--database``.``--table`` and never reads it, prints ``ready`` once every call
is started, and holds them until it is killed (or ``--hold`` seconds pass). Run it with
``ip netns exec`` to hold them from another source address.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import grpc
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from services.common.auth import basic_metadata
from tests.harness.client import cond


def open_idle_streams(
    address: str, count: int, database: str, table: str, password: str, user: str = "admin"
) -> list[tuple[grpc.Channel, Any]]:
    """``count`` (channel, call) pairs, each call a search stream nobody reads."""
    request = pb.SearchByConditionsRequest(
        database=database, table=table, conditions=[cond("id", "greater_than_equal", 0)]
    )
    opened = []
    for _ in range(count):
        # A connection of its own: channels otherwise share one to the same address.
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        call = stub.SearchByConditions(
            request, metadata=basic_metadata(user, password), timeout=600
        )
        opened.append((channel, call))
    return opened


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--database", default="dev")
    parser.add_argument("--table", default="wide")
    parser.add_argument("--password", required=True)
    parser.add_argument("--hold", type=float, default=120.0)
    args = parser.parse_args(argv)
    opened = open_idle_streams(args.address, args.streams, args.database, args.table, args.password)
    print("ready", flush=True)
    time.sleep(args.hold)
    for channel, _ in opened:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
