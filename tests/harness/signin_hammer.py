"""Wrong passwords as fast as they are answered: ``python -m tests.harness.signin_hammer``.

It signs in over one connection per port, alternating between the storage port
(``Authenticate``) and the admin port (``Execute`` of ``user_info``), with a new wrong
password each time, as user ``--user`` or, with ``--spray``, as a new user name each time.
It stops after ``--count`` sign-ins or ``--seconds`` seconds, then prints one JSON line:
the status codes seen per port, the RetryInfo delays of refusals, and the first message
of each code per port (``"admin RESOURCE_EXHAUSTED"``). ``--password`` sends that
password once more at the end from the same address (its code is ``last``). Run it with
``ip netns exec`` to sign in from another source address.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any

import grpc
import orjson
from shoal.admin.v1 import admin_pb2, admin_pb2_grpc
from shoal.storage.v1 import storage_pb2, storage_pb2_grpc

from services.common.auth import basic_metadata
from tests.harness.status import retry_delay_s


def _attempt(stubs: dict[str, Any], port: str, user: str, password: str) -> grpc.RpcError | None:
    metadata = basic_metadata(user, password)
    try:
        if port == "storage":
            stubs[port].Authenticate(
                storage_pb2.AuthenticateRequest(), metadata=metadata, timeout=30
            )
        else:
            operation = orjson.dumps({"operation": "user_info"})
            stubs[port].Execute(
                admin_pb2.ExecuteRequest(operation=operation), metadata=metadata, timeout=30
            )
    except grpc.RpcError as error:
        return error
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--spray", action="store_true")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--password")
    args = parser.parse_args(argv)
    channels = {
        "storage": grpc.insecure_channel(f"{args.host}:9926"),
        "admin": grpc.insecure_channel(f"{args.host}:9925"),
    }
    stubs: dict[str, Any] = {
        "storage": storage_pb2_grpc.StorageServiceStub(channels["storage"]),
        "admin": admin_pb2_grpc.AdminServiceStub(channels["admin"]),
    }
    codes: dict[str, Counter[str]] = {"storage": Counter(), "admin": Counter()}
    delays: list[float] = []
    messages: dict[str, str] = {}
    deadline = time.monotonic() + args.seconds
    for i in range(args.count):
        if time.monotonic() >= deadline:
            break
        port = ("storage", "admin")[i % 2]
        user = f"{args.user}-{i}" if args.spray else args.user
        error = _attempt(stubs, port, user, f"wrong-{i}")
        code = "OK" if error is None else error.code().name
        codes[port][code] += 1
        if error is not None:
            messages.setdefault(f"{port} {code}", error.details() or "")
            delay = retry_delay_s(error)
            if delay is not None:
                delays.append(delay)
    last = None
    if args.password is not None:
        error = _attempt(stubs, "storage", args.user, args.password)
        last = "OK" if error is None else error.code().name
    for channel in channels.values():
        channel.close()
    summary = {
        "codes": {port: dict(counter) for port, counter in codes.items()},
        "delays": delays,
        "messages": messages,
        "last": last,
    }
    print(orjson.dumps(summary).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
