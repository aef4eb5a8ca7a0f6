"""A Shoal node as real processes: one per service, on its own loopback address, with
its own RocksDB directory under the test's temporary folder.

Every process is started with ``subprocess`` (never fork after gRPC exists), logs to a
file next to its config, and is stopped by ``close()`` even when the test fails: first
SIGTERM with a deadline, then SIGKILL.

A node made without ``tls`` in its config runs in insecure mode (``replication.securePort:
null``: plaintext everywhere, the plain replication port open to 127.0.0.1, where every
node of this machine dials from) unless the test sets ``replication.securePort`` itself,
in which case the node generates its certificates on its first start. ``channel``,
``client`` and ``admin`` speak TLS to a port that serves it, trusting the node's CA;
``internal_client`` and ``status`` use the node-local sockets (in a short folder of their
own: a Unix socket path is limited to 107 bytes); ``health`` probes the plaintext health
ports.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpcserver import channel_options
from services.common.node_tls import names_host
from tests.harness.addresses import next_address
from tests.harness.admin import AdminClient
from tests.harness.client import StorageClient
from tests.harness.wait import GiveUp, wait_for

REPO = Path(__file__).resolve().parents[2]
MODULES = {
    "storage": "services.storage",
    "replicator": "services.replicator",
    "admin": "services.admin",
}
PASSWORD = "test-password"
HEALTH_PORTS = {"storage": 9936, "replicator": 9937, "admin": 9935}
HEALTH_KEYS = {"storage": "storagePort", "replicator": "replicatorPort", "admin": "adminPort"}


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
        self.sockets = Path(tempfile.mkdtemp(prefix="shoal-"))
        self.config: dict[str, Any] = deep_merge(
            {
                "rootPath": str(self.root / "data"),
                "socketsPath": str(self.sockets),
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

    def written_config(self) -> dict[str, Any]:
        """The config as written: without ``tls`` and ``replication.securePort``, in
        insecure mode (``securePort: null``, plain port open to ``allowedSources``
        127.0.0.1 unless the test says otherwise)."""
        config = copy.deepcopy(self.config)
        replication = config["replication"]
        if "tls" not in config:
            replication.setdefault("securePort", None)
        if replication.get("securePort", 9933) is None:
            replication.setdefault("allowedSources", ["127.0.0.1"])
        return config

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.written_config(), sort_keys=False))

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
        """Start ``services`` (default: all of the node's): storage first, then the
        others at once (they reach storage on its socket, so they need it serving)."""
        chosen = services or self.services
        later = [service for service in chosen if service != "storage"]
        if "storage" in chosen:
            self.start_service("storage", wait=wait)
        for service in later:
            self.start_service(service, wait=False)
        if wait:
            for service in later:
                self.wait_ready(service)
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
        replication = self.written_config()["replication"]
        plain = 9932 if replication.get("securePort", 9933) is None else None
        port = replication.get("port", plain)
        assert port is not None, f"the plain replication port of {self.name} is closed"
        return f"{self.host}:{port}"

    def socket_address(self, service: str) -> str:
        """The node-local socket of ``service`` (its node-internal RPCs)."""
        return f"unix:{self.sockets / (service + '.sock')}"

    def socket_channel(self, service: str) -> grpc.Channel:
        """A channel to the node-local socket of ``service``."""
        options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        return grpc.insecure_channel(self.socket_address(service), options=options)

    # -- TLS ---------------------------------------------------------------------------

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else Path(self.config["rootPath"]) / path

    @property
    def keys_path(self) -> Path:
        return Path(self.config["rootPath"]) / "keys"

    def certificate_files(self) -> tuple[Path, Path] | None:
        """(certificate, CA) of the node's TLS: the ``tls.*`` files, or the ones it
        generates under keys/ (once started); None in insecure mode."""
        tls = self.config.get("tls") or {}
        if tls.get("certificate"):
            certificate = self._path(tls["certificate"])
            ca = tls.get("certificateAuthority")
            return certificate, self._path(ca) if ca else certificate
        if self.written_config()["replication"].get("securePort", 9933) is None:
            return None
        return self.keys_path / "node.crt", self.keys_path / "ca.crt"

    def serves_tls(self, service: str) -> bool:
        """Whether the main port of ``service`` serves TLS (the replicator's never does)."""
        if self.certificate_files() is None or service == "replicator":
            return False
        if service == "storage":
            return self.config.get("storage", {}).get("tls", True) is not False
        return self.config.get("operationsApi", {}).get("tls", True) is not False

    def ca_pem(self) -> bytes:
        """The CA certificate(s) clients of this node trust."""
        files = self.certificate_files()
        assert files is not None, f"{self.name} runs without TLS"
        return files[1].read_bytes()

    def channel_args(
        self, service: str
    ) -> tuple[str, grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
        """(address, credentials or None for plaintext, options) of the main port of
        ``service``: TLS trusting the node's CA when the port serves TLS, checking the
        node's name when the dialed host is not in its certificate."""
        address = self.address_of(service)
        # A channel of its own connection: gRPC otherwise shares connections between
        # channels to one address, so a client made right after a restart could inherit
        # the reconnect backoff (and "connection refused") of a channel that saw the
        # process die, although the new process already serves.
        options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]
        if not self.serves_tls(service):
            return address, None, options
        files = self.certificate_files()
        assert files is not None
        if not names_host(files[0].read_bytes(), self.host):
            options.append(("grpc.ssl_target_name_override", self.name))
        return address, grpc.ssl_channel_credentials(root_certificates=self.ca_pem()), options

    def channel(self, service: str) -> grpc.Channel:
        """A channel to the main port of ``service`` (see ``channel_args``)."""
        address, credentials, options = self.channel_args(service)
        if credentials is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, credentials, options=options)

    def aio_channel(self, service: str) -> grpc.aio.Channel:
        """An asyncio channel to the main port of ``service`` (see ``channel_args``)."""
        address, credentials, options = self.channel_args(service)
        if credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, credentials, options=options)

    def health_address(self, service: str) -> str:
        port = self.config.get("health", {}).get(HEALTH_KEYS[service], HEALTH_PORTS[service])
        return f"{self.host}:{port}"

    def health(self, service: str) -> bool:
        """Whether ``service`` reports SERVING: on its health port, or on its main port
        when the node has no health ports."""
        if self.config.get("health", {}).get("enabled", True) is not False:
            channel = grpc.insecure_channel(self.health_address(service))
        elif service == "replicator":
            channel = self.socket_channel(service)  # its plain port may be closed
        else:
            channel = self.channel(service)
        with channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(self, service: str, timeout: float = 30.0) -> None:
        process = self.processes[service]

        def ready() -> bool:
            if process.poll() is not None:
                raise GiveUp(
                    f"{service} of {self.name} exited with {process.returncode}:\n"
                    + self.log_tail(service)
                )
            return self.health(service)

        try:
            wait_for(ready, timeout, f"{service} of {self.name} to serve", max_interval=0.1)
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

    def terminate(self) -> None:
        """Ask every running service to stop (SIGTERM) without waiting: ``stop`` or
        ``close`` then waits for each."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()

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
        client = StorageClient.basic(
            self.storage_address, username, password, self.channel("storage")
        )
        self._clients.append(client)
        return client

    def admin(self, username: str = "admin", password: str = PASSWORD) -> AdminClient:
        client = AdminClient(self.address_of("admin"), username, password, self.channel("admin"))
        self._clients.append(client)
        return client

    def internal_client(self) -> StorageClient:
        """The node identity on storage's node-local socket (StorageNodeService and
        StorageService), as the node's replicator and admin call it."""
        client = StorageClient.bearer(
            self.socket_address("storage"), self.node_secret(), self.socket_channel("storage")
        )
        self._clients.append(client)
        return client

    def status(self) -> Any:
        """The replicator's Status (as the admin service would read it)."""
        from shoal.replicator.v1 import replicator_pb2, replicator_pb2_grpc

        from services.common.auth import bearer_metadata

        with self.socket_channel("replicator") as channel:
            stub = replicator_pb2_grpc.ReplicatorNodeServiceStub(channel)
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

    def connected(self, peer: str) -> bool:
        """Whether this node's replicator has a live session with ``peer``."""
        connection = self.connection(peer)
        return connection is not None and bool(connection.connected)

    def last_error(self, peer: str) -> str:
        """The last connection error this node shows for ``peer`` ("" when none)."""
        connection = self.connection(peer)
        return str(connection.last_connection_error) if connection is not None else ""

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        try:
            self.stop()
        finally:
            shutil.rmtree(self.sockets, ignore_errors=True)
