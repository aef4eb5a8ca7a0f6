"""A Shoal node as real processes: one per service, on its own loopback address, with
its own RocksDB directory under the test's temporary folder.

Every process is started with ``subprocess`` (never fork after gRPC exists), logs to a
file next to its config, and is stopped by ``close()`` even when the test fails: first
SIGTERM with a deadline, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness.addresses import next_address
from tests.harness.admin import AdminClient
from tests.harness.client import StorageClient
from tests.harness.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
MODULES = {
    "storage": "services.storage",
    "replicator": "services.replicator",
    "admin": "services.admin",
}
PASSWORD = "test-password"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Node:
    """One node's processes and clients."""

    def __init__(
        self,
        workdir: Path,
        name: str | None = None,
        host: str | None = None,
        config: dict[str, Any] | None = None,
        services: tuple[str, ...] = ("storage",),
    ) -> None:
        self.host = host or next_address()
        self.name = name or self.host
        self.root = workdir / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "shoal.yaml"
        self.services = services
        self.config: dict[str, Any] = deep_merge(
            {
                "rootPath": str(self.root / "data"),
                "host": self.host,
                "replication": {"hostname": self.name},
                "admin": {"username": "admin", "password": PASSWORD},
                "logging": {"level": "info"},
            },
            config or {},
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._clients: list[StorageClient | AdminClient] = []
        self.write_config()

    # -- configuration ---------------------------------------------------------------

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def update_config(self, extra: dict[str, Any]) -> None:
        self.config = deep_merge(self.config, extra)
        self.write_config()

    @property
    def storage_address(self) -> str:
        return f"{self.host}:{self.config.get('storage', {}).get('port', 9926)}"

    def log_path(self, service: str) -> Path:
        return self.root / f"{service}.log"

    # -- processes ---------------------------------------------------------------------

    def start(self, *services: str, wait: bool = True) -> Node:
        for service in services or self.services:
            self.start_service(service, wait=wait)
        return self

    def start_service(
        self, service: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> None:
        running = self.processes.get(service)
        if running is not None and running.poll() is None:
            raise RuntimeError(f"{service} of {self.name} is already running")
        log = self.log_path(service).open("ab")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", MODULES[service], "--config", str(self.config_path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        log.close()
        if wait:
            self.wait_ready(service)

    def address_of(self, service: str) -> str:
        if service == "storage":
            return self.storage_address
        if service == "admin":
            port = self.config.get("operationsApi", {}).get("network", {}).get("port", 9925)
            return f"{self.host}:{port}"
        return f"{self.host}:{self.config.get('replication', {}).get('port', 9932)}"

    def health(self, service: str) -> bool:
        with grpc.insecure_channel(self.address_of(service)) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(self, service: str, timeout: float = 30.0) -> None:
        process = self.processes[service]

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"{service} of {self.name} exited with {process.returncode}:\n"
                    + self.log_tail(service)
                )
            return self.health(service)

        try:
            wait_for(ready, timeout, f"{service} of {self.name} to serve")
        except AssertionError as exc:
            if "exited with" in str(exc):
                raise
            raise AssertionError(f"{exc}\n{self.log_tail(service)}") from exc

    def running(self, service: str) -> bool:
        process = self.processes.get(service)
        return process is not None and process.poll() is None

    def kill(self, service: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal (SIGKILL by default) and, for fatal ones, reap the process."""
        process = self.processes[service]
        process.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            process.wait(timeout=15)

    def stop(self, *services: str) -> None:
        """SIGTERM, then SIGKILL after a deadline; all services in reverse start order."""
        for service in services or tuple(reversed(self.processes)):
            process = self.processes.get(service)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def restart(self, service: str) -> None:
        self.stop(service)
        self.start_service(service)

    def log_tail(self, service: str, lines: int = 40) -> str:
        path = self.log_path(service)
        if not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(f"  [{self.name} {service}] {line}" for line in text[-lines:])

    # -- clients -----------------------------------------------------------------------

    def node_secret(self) -> str:
        return (Path(self.config["rootPath"]) / "keys" / "node.secret").read_text().strip()

    def client(self, username: str = "admin", password: str = PASSWORD) -> StorageClient:
        client = StorageClient.basic(self.storage_address, username, password)
        self._clients.append(client)
        return client

    def admin(self, username: str = "admin", password: str = PASSWORD) -> AdminClient:
        client = AdminClient(self.address_of("admin"), username, password)
        self._clients.append(client)
        return client

    def internal_client(self) -> StorageClient:
        client = StorageClient.bearer(self.storage_address, self.node_secret())
        self._clients.append(client)
        return client

    def status(self) -> Any:
        """The replicator's Status (as the admin service would read it)."""
        from shoal.replicator.v1 import replicator_pb2, replicator_pb2_grpc

        from services.common.auth import bearer_metadata

        address = f"{self.host}:{self.config['replication'].get('port', 9932)}"
        with grpc.insecure_channel(address) as channel:
            stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
            return stub.Status(
                replicator_pb2.StatusRequest(),
                metadata=bearer_metadata(self.node_secret()),
                timeout=5,
            )

    def connection(self, peer: str) -> Any:
        """This node's status entry for ``peer`` (None when unknown)."""
        for connection in self.status().connections:
            if connection.peer == peer:
                return connection
        return None

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self.stop()
