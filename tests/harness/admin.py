"""A small synchronous admin client for tests: Execute with JSON, and the typed stub."""

from __future__ import annotations

import time
from typing import Any

import grpc
import orjson
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc

from services.common.auth import basic_metadata


class AdminClient:
    """Calls to one node's admin service with fixed credentials, on ``channel`` (a TLS
    channel from ``Node.channel`` when the port serves TLS) or a plaintext one."""

    def __init__(
        self, address: str, username: str, password: str, channel: grpc.Channel | None = None
    ) -> None:
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.metadata = basic_metadata(username, password)

    def close(self) -> None:
        self.channel.close()

    def execute(self, operation: dict[str, Any], timeout: float = 30.0) -> tuple[Any, int]:
        """(Harper JSON result, gRPC code: 0 on success)."""
        reply = self.stub.Execute(
            apb.ExecuteRequest(operation=orjson.dumps(operation)),
            metadata=self.metadata,
            timeout=timeout,
        )
        return orjson.loads(reply.result), reply.code

    def ok(self, operation: dict[str, Any]) -> Any:
        """Execute an operation that must succeed; returns its result."""
        result, code = self.execute(operation)
        assert code == 0, f"{operation['operation']} failed ({code}): {result}"
        return result

    def job(self, operation: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """Run an operation Harper runs as a job (a CSV load): its answer must be
        Harper's ``{"message": "Starting job with id <id>", "job_id"}``; returns the job
        (``get_job``) once it is no longer IN_PROGRESS."""
        started = self.ok(operation)
        job_id = started.get("job_id")
        assert started == {"message": f"Starting job with id {job_id}", "job_id": job_id}
        give_up = time.monotonic() + timeout
        while True:
            (job,) = self.ok({"operation": "get_job", "id": job_id})
            if job["status"] != "IN_PROGRESS":
                return dict(job)
            assert time.monotonic() < give_up, f"job {job_id} still running: {job}"
            time.sleep(0.05)

    def ok_within(self, operation: dict[str, Any], timeout: float) -> Any:
        """Like ``ok``, for a long operation (a rolling restart)."""
        result, code = self.execute(operation, timeout)
        assert code == 0, f"{operation['operation']} failed ({code}): {result}"
        return result

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
