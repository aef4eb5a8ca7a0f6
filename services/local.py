"""Running Shoal's processes on this machine: one node (``shoal node start``) or a whole
local cluster on loopback addresses (``shoal local up``, what ``make run`` does).

Each service is its own process (``python -m services.<name> --config shoal.yaml``); the
supervisor starts them in order (storage first), waits until each reports SERVING on the
gRPC health service (its plaintext health port, or its main port when health ports are
off), restarts one that dies (with backoff), and on Ctrl-C or SIGTERM stops them all in
reverse order, waiting for each to finish.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import certs
from services.common.auth import write_private_file
from services.common.backoff import Backoff
from services.common.config import ShoalConfig, load_config
from services.common.node_tls import prepare
from services.common.tls import verifying_channel_credentials

SERVICES = ("storage", "replicator", "admin")
LOCAL_CA_DIR = "ca"
LOCAL_CA_NAME = "Shoal-Local-CA"
READY_TIMEOUT_S = 60.0
SUPERVISE_INTERVAL_S = 0.2  # how often the supervisor looks for exited services
CLI_CONFIG_FILE = "cli.yaml"


def service_address(config: ShoalConfig, service: str) -> str:
    """Where the supervisor asks ``service`` whether it serves without a health port: the
    client port of storage and admin, the node-local socket of the replicator."""
    if service == "storage":
        return config.local_address(config.storage.port)
    if service == "admin":
        return config.local_address(config.operations_api.port)
    return config.socket_address("replicator")


@dataclass(frozen=True)
class Probe:
    """Where the supervisor asks a service whether it serves."""

    address: str
    credentials: grpc.ChannelCredentials | None = None
    server_name: str | None = None  # grpc.ssl_target_name_override, when needed


def probe(config: ShoalConfig, service: str) -> Probe:
    """The service's health port; without health ports, its main port (over TLS, trusting
    the node's CA, when that port serves TLS)."""
    if config.health.enabled:
        return Probe(config.local_address(config.health.port(service)))
    address = service_address(config, service)
    if service == "replicator":
        return Probe(address)
    node = prepare(config)
    if node.material is None or not node.serves_tls(service):
        return Probe(address)
    credentials = verifying_channel_credentials(node.material.certificate_authority)
    return Probe(address, credentials, node.target_name_override(address))


def pid_path(config: ShoalConfig) -> Path:
    """Where `shoal node start` records its process id (for `shoal node stop`)."""
    return config.root_path / "shoal.pid"


def serving_on(channel: grpc.Channel) -> bool:
    """Whether the process at the other end of ``channel`` answers SERVING on
    grpc.health.v1 (False when it cannot be reached)."""
    try:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def healthy(address: str | Probe) -> bool:
    """Whether the process at ``address`` (plaintext, or as the probe says) answers
    SERVING on grpc.health.v1."""
    target = address if isinstance(address, Probe) else Probe(address)
    options = []
    if target.server_name is not None:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    if target.credentials is not None:
        channel = grpc.secure_channel(target.address, target.credentials, options=options)
    else:
        channel = grpc.insecure_channel(target.address)
    with channel:
        return serving_on(channel)


@dataclass
class Supervised:
    """One service process under supervision."""

    node: str
    service: str
    config_path: Path
    log_path: Path | None
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 10.0))
    restart_at: float = 0.0

    def start(self) -> None:
        out = self.log_path.open("ab") if self.log_path else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.service}", "--config", str(self.config_path)],
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env={**os.environ, **self.env},
        )
        if out:
            out.close()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Supervisor:
    """Starts services, keeps them running (restarting one that exits, with a backoff,
    from the moment they all started), stops them on a signal."""

    def __init__(self) -> None:
        self.children: list[Supervised] = []
        self._stopping = False
        self._done = threading.Event()  # set by stop_all: restart nothing more
        self._lock = threading.Lock()  # one restart pass, or stop_all, at a time
        self._watcher: threading.Thread | None = None

    def add(self, child: Supervised) -> None:
        self.children.append(child)

    def start_all(self, addresses: dict[tuple[str, str], Probe]) -> None:
        for child in self.children:
            child.start()
            address = addresses[(child.node, child.service)]
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not healthy(address):
                if child.process is not None and child.process.poll() is not None:
                    raise SystemExit(
                        f"{child.service} of {child.node} exited with {child.process.returncode}"
                        + (f"; see {child.log_path}" if child.log_path else "")
                    )
                if time.monotonic() > deadline:
                    raise SystemExit(f"{child.service} of {child.node} did not become ready")
                time.sleep(0.1)

    def supervise(self) -> None:
        """Restart exited services from now on, in a background thread, whatever the
        caller does meanwhile (``shoal node clone`` follows the copy); until stop_all."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self._done.wait(SUPERVISE_INTERVAL_S):
            self._restart_exited()

    def _restart_exited(self) -> None:
        with self._lock:
            if self._done.is_set():
                return
            now = time.monotonic()
            for child in self.children:
                process = child.process
                if process is None or process.poll() is None:
                    continue
                if child.restart_at == 0.0:
                    delay = child.backoff.next()
                    child.restart_at = now + delay
                    print(
                        f"{child.service} of {child.node} exited ({process.returncode});"
                        f" restarting in {delay:.1f}s",
                        file=sys.stderr,
                    )
                elif now >= child.restart_at:
                    child.restart_at = 0.0
                    child.start()

    def run_until_signalled(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self._stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        self.supervise()
        while not self._stopping:
            time.sleep(SUPERVISE_INTERVAL_S)
        self.stop_all()

    def stop_all(self) -> None:
        self._done.set()
        with self._lock:  # a restart pass under way ends first; none starts after
            pass
        for child in reversed(self.children):
            child.stop()


def local_cluster_configs(data: Path, nodes: int, tls: bool = True) -> list[Path]:
    """Write (once) the configs of a loopback cluster: node i on 127.0.0.i, full mesh.

    With ``tls`` (the default), a new config gets a certificate signed by the cluster's
    own CA (made once in ``<data>/ca``): ``<data>/node<i>/keys/node.key`` (0600),
    ``node.crt`` (CN and IP SAN 127.0.0.i) and ``ca.crt``; replication is on the mutual-TLS
    port only. Without, a new config is in insecure mode (``replication.securePort:
    null``, the plain port open to ``allowedSources: [127.0.0.1]``). Existing configs are
    kept as they are."""
    hosts = [f"127.0.0.{i}" for i in range(1, nodes + 1)]
    paths = []
    for i, host in enumerate(hosts, start=1):
        directory = data / f"node{i}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "shoal.yaml"
        if not path.exists():
            replication: dict[str, Any] = {
                "hostname": host,
                "routes": [h for h in hosts if h != host],
            }
            if not tls:
                # Insecure mode: plaintext everywhere. Every node of one machine dials from
                # 127.0.0.1, which is allowed to speak for any of them (and so is any
                # process of this machine: development only).
                replication["securePort"] = None
                replication["allowedSources"] = ["127.0.0.1"]
            config: dict[str, Any] = {
                "rootPath": ".",
                "host": host,
                "replication": replication,
                "logging": {"level": "info"},
            }
            if tls:
                authority = certs.ensure_authority(data / LOCAL_CA_DIR, LOCAL_CA_NAME)
                files = certs.ensure_node_files(directory / "keys", authority, host, replace=True)
                config["tls"] = {
                    "certificate": str(files.certificate.relative_to(directory)),
                    "privateKey": str(files.private_key.relative_to(directory)),
                    "certificateAuthority": str(files.certificate_authority.relative_to(directory)),
                }
            path.write_text(
                "# A node of the local cluster made by `shoal local up`.\n"
                + yaml.safe_dump(config, sort_keys=False)
            )
        paths.append(path)
    return paths


def write_cli_config(
    data: Path, password: str, tls: bool, host: str = "127.0.0.1", username: str = "admin"
) -> Path:
    """Write ``<data>/cli.yaml`` (0600): what the ``shoal`` CLI needs to use the local
    cluster (``export SHOAL_CLI_CONFIG=<data>/cli.yaml``): node, user, password and, when
    the nodes serve TLS, the cluster's CA (``ca:``, relative to the file)."""
    values: dict[str, str] = {"node": host, "username": username, "password": password}
    if tls:
        values["ca"] = f"{LOCAL_CA_DIR}/{certs.CA_CERT_FILE}"
    path = data / CLI_CONFIG_FILE
    text = "# The local cluster, for the shoal CLI (made by `shoal local up`).\n"
    write_private_file(path, text + yaml.safe_dump(values, sort_keys=False))
    return path


def local_username(config: ShoalConfig) -> str:
    """The super user a new local node creates: $SHOAL_ADMIN_USERNAME, or the configured
    ``admin.username`` (storage's bootstrap makes the same choice)."""
    return os.environ.get("SHOAL_ADMIN_USERNAME") or config.admin.username


def local_password(data: Path) -> str:
    """The local cluster's admin password: $SHOAL_ADMIN_PASSWORD, or one generated once."""
    if os.environ.get("SHOAL_ADMIN_PASSWORD"):
        return os.environ["SHOAL_ADMIN_PASSWORD"]
    path = data / ".admin-password"
    if path.exists():
        return path.read_text().strip()
    data.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


class PortsTaken(Exception):
    """Addresses the services would listen on are already in use."""


def listening_addresses(config: ShoalConfig, service: str) -> list[tuple[str, str, int]]:
    """(what, host, port) of every TCP port ``service`` of this node listens on."""
    host = config.host or "0.0.0.0"
    found: list[tuple[str, str, int]] = []
    if service == "storage":
        found.append(("storage", host, config.storage.port))
    elif service == "admin":
        found.append(("admin", host, config.operations_api.port))
    else:
        for port in (config.replication.port, config.replication.secure_port):
            if port is not None:
                found.append(("replication", host, port))
    if config.health.enabled:
        found.append((f"{service} health", host, config.health.port(service)))
    if config.metrics.enabled:
        found.append(
            (f"{service} metrics", config.metrics.host or host, config.metrics.port(service))
        )
    return found


def _in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port (a bind without SO_REUSEPORT fails, even
    against a gRPC server that set it; SO_REUSEADDR ignores connections in TIME_WAIT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


def check_ports_free(configs: list[ShoalConfig], services: tuple[str, ...]) -> None:
    """Refuse to start when an address a service would listen on is taken (most often by
    the same nodes already running), naming each one."""
    taken = [
        f"{what} of {config.node_name} on {host}:{port}"
        for config in configs
        for service in services
        for what, host, port in listening_addresses(config, service)
        if _in_use(host, port)
    ]
    if taken:
        raise PortsTaken(
            f"cannot start: {len(taken)} address(es) the services would listen on are"
            f" already in use: {', '.join(taken)}. A Shoal cluster (or another program) may"
            " already be running there; stop it first (or change the ports in shoal.yaml)."
        )


def run_services(
    config_paths: list[Path], services: tuple[str, ...], env: dict[str, str], logs: bool
) -> Supervisor:
    """Start the services (refusing with PortsTaken when an address they listen on is
    taken) and return their supervisor, which restarts any that exits from then on."""
    supervisor = Supervisor()
    addresses: dict[tuple[str, str], Probe] = {}
    configs = [(path, load_config(path)) for path in config_paths]
    check_ports_free([config for _, config in configs], services)
    for service in services:
        for path, config in configs:
            log_path = path.parent / f"{service}.log" if logs else None
            supervisor.add(Supervised(config.node_name, service, path, log_path, env))
            addresses[(config.node_name, service)] = probe(config, service)
    try:
        supervisor.start_all(addresses)
    except BaseException:
        supervisor.stop_all()
        raise
    supervisor.supervise()
    return supervisor
