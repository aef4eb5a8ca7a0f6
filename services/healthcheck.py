"""``python -m services.healthcheck --port PORT``: a container health probe.

Calls ``grpc.health.v1.Health/Check`` on one of this node's services over plaintext gRPC
and exits 0 when it answers SERVING, 1 otherwise (NOT_SERVING, unreachable, no answer
within ``--timeout``), with one line on stderr saying why. Docker healthchecks and
Compose use it; Kubernetes uses its native gRPC probes on the same ports instead.

Ports: the health ports (``health.adminPort`` 9935, ``health.storagePort`` 9936,
``health.replicatorPort`` 9937), or a service's main port when that port is plaintext.
The address is ``--host``, else the node's own address as its services reach each other:
``SHOAL_HOST`` when set (``0.0.0.0`` and ``::`` meaning this machine), else 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
ANY_ADDRESS = ("", "0.0.0.0", "::")


def default_host() -> str:
    """Where this node's services are reached from inside the node (see the module doc)."""
    host = os.environ.get("SHOAL_HOST", "").strip()
    return "127.0.0.1" if host in ANY_ADDRESS else host


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str | None:
    """None when ``service`` at ``address`` is SERVING, else why not (one sentence)."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        return f"{address}: health check failed: {code}: {details}"
    if reply.status != SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"{address}: {service or 'the process'} is {status}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.healthcheck",
        description="Exit 0 when a Shoal service answers SERVING on grpc.health.v1.",
    )
    parser.add_argument("--port", type=int, required=True, help="the gRPC port to probe")
    parser.add_argument(
        "--host", default=None, help="address (default: $SHOAL_HOST, else 127.0.0.1)"
    )
    parser.add_argument(
        "--service", default="", help="service name to check (default: the whole process)"
    )
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535 (got {args.port})")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive (got {args.timeout})")
    host = args.host or default_host()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    problem = check(f"{host}:{args.port}", args.service, args.timeout)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
