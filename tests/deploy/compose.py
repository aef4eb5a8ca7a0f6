"""deploy/docker-compose.yml run without Docker: every container becomes a local process.

Only the Compose features that file uses are supported, and anything else is refused
with an error naming it. How the container world maps onto this machine:

- **Network namespaces.** A service that others join with ``network_mode: service:X``
  holds a node's namespace; it becomes one loopback address (``next_address()``) and is
  not run (it only holds the namespace). Its service name and ``hostname`` resolve to
  that address: each whole-word occurrence in commands, environment values and volume
  subpaths is replaced by it. Services in the namespace get ``SHOAL_HOST=<address>``
  (in a container they listen on 0.0.0.0 of their own namespace).
- **Volumes and configs.** A named volume is a folder of the run, ``volume.subpath`` a
  folder in it (which must exist, as Docker requires), a mount inside another mount a
  symlink in the outer folder, and a ``configs`` entry its file as it is. Container
  paths in commands and environment values are rewritten to those folders, and Shoal's
  ``rootPath`` (read from the service's config) is passed as ``SHOAL_ROOTPATH``.
- **The image** is this checkout: the Dockerfile's ENTRYPOINT (unless the service sets
  its own) runs with the virtualenv's bin folder first on PATH (the image's
  /opt/shoal/bin), in an environment holding only the service's variables plus PATH.
- **Ordering.** ``depends_on`` conditions are waited on: ``service_started``,
  ``service_healthy`` (the service's healthcheck command, run until it exits 0, failing
  after ``start_period`` plus ``retries`` failures) and
  ``service_completed_successfully`` (exit 0).
- **Stopping.** Reverse start order: SIGTERM, then SIGKILL after ``stop_grace_period``.

Not emulated: publishing ``ports`` on the host, ``build`` (the checkout is the image),
``restart`` policies and ``init``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.harness.addresses import next_address

SUPPORTED_KEYS = {
    "image",
    "build",
    "restart",
    "stop_grace_period",
    "configs",
    "entrypoint",
    "command",
    "init",
    "hostname",
    "ports",
    "network_mode",
    "environment",
    "volumes",
    "depends_on",
    "healthcheck",
}
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ComposeError(Exception):
    """The file uses something this runner does not support, or a service failed."""


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}`` and ``${VAR?error}``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3) or ""
        present = name in env
        empty = not env.get(name)
        if operator in (":-", ":?"):
            missing = empty
        elif operator in ("-", "?"):
            missing = not present
        else:
            return env.get(name, "")
        if not missing:
            return env[name]
        if operator.endswith("?"):
            raise ComposeError(f"required variable {name} is missing: {argument}")
        return argument

    return _VARIABLE.sub(replace, value)


def _interpolate_all(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_all(value, env) for key, value in node.items()}
    return node


def duration(value: str | None, default: float) -> float:
    """Seconds of a Compose duration such as ``5s``, ``1m30s`` or ``500ms``."""
    if value is None:
        return default
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ComposeError(f"not a duration: {value!r}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def _argv(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(str(item) for item in value)


@dataclass(frozen=True)
class Mount:
    """A named volume (or a subpath of it) at a container path."""

    volume: str
    target: str
    subpath: str = ""
    read_only: bool = False


@dataclass(frozen=True)
class Healthcheck:
    """A healthcheck command and its timings."""

    test: tuple[str, ...]
    interval_s: float
    timeout_s: float
    retries: int
    start_period_s: float


@dataclass(frozen=True)
class Service:
    """One service of the file, as this runner understands it."""

    name: str
    entrypoint: tuple[str, ...] | None
    command: tuple[str, ...] | None
    environment: dict[str, str]
    network: str | None
    mounts: tuple[Mount, ...]
    configs: tuple[tuple[str, Path], ...]  # (container path, file)
    depends_on: dict[str, str]
    healthcheck: Healthcheck | None
    stop_grace_s: float
    hostname: str | None


def _mount(entry: Any, service: str) -> Mount:
    if isinstance(entry, str):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or parts[0].startswith((".", "/")):
            raise ComposeError(f"{service}: only named volumes are supported, not {entry!r}")
        return Mount(parts[0], parts[1], read_only=len(parts) == 3 and parts[2] == "ro")
    if entry.get("type") != "volume":
        raise ComposeError(f"{service}: only volume mounts are supported, not {entry!r}")
    return Mount(
        entry["source"],
        entry["target"],
        (entry.get("volume") or {}).get("subpath", ""),
        bool(entry.get("read_only", False)),
    )


def _healthcheck(raw: dict[str, Any] | None) -> Healthcheck | None:
    if not raw or raw.get("disable"):
        return None
    test = raw["test"]
    if isinstance(test, str):
        argv: tuple[str, ...] = ("/bin/sh", "-c", test)
    elif test[0] == "CMD":
        argv = tuple(test[1:])
    elif test[0] == "CMD-SHELL":
        argv = ("/bin/sh", "-c", test[1])
    else:
        raise ComposeError(f"unsupported healthcheck test {test!r}")
    return Healthcheck(
        argv,
        duration(raw.get("interval"), 30.0),
        duration(raw.get("timeout"), 30.0),
        int(raw.get("retries", 3)),
        duration(raw.get("start_period"), 0.0),
    )


def image_entrypoint(dockerfile: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ENTRYPOINT, CMD) of the Dockerfile's last stage, both in exec form."""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        instruction, _, rest = line.partition(" ")
        if instruction == "FROM":
            entrypoint, cmd = (), ()
        elif instruction in ("ENTRYPOINT", "CMD"):
            try:
                value = tuple(json.loads(rest))
            except json.JSONDecodeError as exc:
                raise ComposeError(f"{instruction} is not in exec form: {rest}") from exc
            if instruction == "ENTRYPOINT":
                entrypoint = value
            else:
                cmd = value
    return entrypoint, cmd


@dataclass
class Running:
    """A started service process and what is known of its health."""

    service: Service
    process: subprocess.Popen[bytes]
    started_at: float
    healthy: bool = False
    failures: int = 0
    next_check: float = 0.0


@dataclass
class ComposeProject:
    """The services of one Compose file, run as local processes under ``workdir``."""

    path: Path
    workdir: Path
    services: dict[str, Service]
    addresses: dict[str, str]  # namespace-holding service -> its address
    entrypoint: tuple[str, ...]
    default_command: tuple[str, ...]
    health_ports: dict[str, str] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)
    completed: dict[str, int] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    @classmethod
    def load(
        cls,
        path: Path,
        dockerfile: Path,
        workdir: Path,
        env: Mapping[str, str],
        health_ports: Mapping[str, str] | None = None,
    ) -> ComposeProject:
        """Parse and interpolate ``path``. ``health_ports`` maps a healthcheck's
        ``--port`` value to another port (for a service that serves health elsewhere)."""
        document = _interpolate_all(yaml.safe_load(path.read_text(encoding="utf-8")), env)
        configs = {
            name: (path.parent / entry["file"]).resolve()
            for name, entry in (document.get("configs") or {}).items()
        }
        services: dict[str, Service] = {}
        for name, raw in document["services"].items():
            unknown = set(raw) - SUPPORTED_KEYS
            if unknown:
                raise ComposeError(f"{name}: unsupported keys {sorted(unknown)}")
            network = raw.get("network_mode")
            if network is not None and not network.startswith("service:"):
                raise ComposeError(f"{name}: unsupported network_mode {network!r}")
            depends = {
                dep: (cond or {}).get("condition", "service_started")
                for dep, cond in (
                    raw.get("depends_on", {}).items()
                    if isinstance(raw.get("depends_on"), dict)
                    else ((d, None) for d in raw.get("depends_on", []))
                )
            }
            for dep, condition in depends.items():
                if condition not in CONDITIONS:
                    raise ComposeError(f"{name}: unsupported condition {condition!r} on {dep}")
            environment = raw.get("environment") or {}
            if isinstance(environment, list):
                environment = dict(item.split("=", 1) for item in environment)
            services[name] = Service(
                name=name,
                entrypoint=_argv(raw.get("entrypoint")),
                command=_argv(raw.get("command")),
                environment={str(k): str(v) for k, v in environment.items()},
                network=network.removeprefix("service:") if network else None,
                mounts=tuple(_mount(entry, name) for entry in raw.get("volumes") or []),
                configs=tuple(
                    (entry["target"], configs[entry["source"]]) for entry in raw.get("configs", [])
                ),
                depends_on=depends,
                healthcheck=_healthcheck(raw.get("healthcheck")),
                stop_grace_s=duration(raw.get("stop_grace_period"), 10.0),
                hostname=raw.get("hostname"),
            )
        holders = {s.network for s in services.values() if s.network is not None}
        addresses = {holder: next_address() for holder in sorted(holders)}
        entrypoint, cmd = image_entrypoint(dockerfile)
        return cls(path, workdir, services, addresses, entrypoint, cmd, dict(health_ports or {}))

    # -- the container world ---------------------------------------------------------

    def address(self, name: str) -> str:
        """The address a node's service name resolves to."""
        return self.addresses[name]

    def resolve_names(self, text: str) -> str:
        """Every whole-word service name or hostname of a namespace, as its address."""
        for holder, address in self.addresses.items():
            names = {holder, self.services[holder].hostname or holder}
            for name in names:
                text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", address, text)
        return text

    def volume_path(self, mount: Mount) -> Path:
        root = self.workdir / "volumes" / mount.volume
        root.mkdir(parents=True, exist_ok=True)
        if not mount.subpath:
            return root
        path = root / self.resolve_names(mount.subpath)
        if not path.is_dir():
            raise ComposeError(f"volume {mount.volume} has no subpath {mount.subpath!r}")
        return path

    def path_map(self, service: Service) -> list[tuple[str, Path]]:
        """Container path -> host path for a service's mounts and configs, longest first;
        a mount inside another becomes a symlink in the outer one's folder."""
        mapping = [(mount.target, self.volume_path(mount)) for mount in service.mounts]
        mapping += list(service.configs)
        mapping.sort(key=lambda item: len(item[0]), reverse=True)
        for target, host in mapping:
            for outer, outer_host in mapping:
                if target != outer and target.startswith(outer.rstrip("/") + "/"):
                    link = outer_host / target[len(outer) :].lstrip("/")
                    if not link.is_symlink():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(host, target_is_directory=host.is_dir())
                    break
        return mapping

    @staticmethod
    def translate(text: str, mapping: list[tuple[str, Path]]) -> str:
        for container, host in mapping:
            text = re.sub(rf"(?<![\w.-]){re.escape(container)}(?![\w.-])", str(host), text)
        return text

    def argv(self, service: Service) -> list[str]:
        entrypoint = service.entrypoint if service.entrypoint is not None else self.entrypoint
        if service.command is not None:
            command = service.command
        else:
            command = self.default_command if service.entrypoint is None else ()
        mapping = self.path_map(service)
        return [self.translate(self.resolve_names(arg), mapping) for arg in (*entrypoint, *command)]

    def environment(self, service: Service) -> dict[str, str]:
        mapping = self.path_map(service)
        bin_dir = str(Path(sys.executable).parent)
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.workdir),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for key, value in service.environment.items():
            env[key] = self.translate(self.resolve_names(value), mapping)
        if service.network is not None:
            env["SHOAL_HOST"] = self.addresses[service.network]
        for target, config in service.configs:
            root = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("rootPath")
            if target.endswith(".yaml") and isinstance(root, str) and root.startswith("/"):
                env["SHOAL_ROOTPATH"] = self.translate(root, mapping)
        return env

    def health_argv(self, service: Service) -> list[str]:
        assert service.healthcheck is not None
        mapping = self.path_map(service)
        args = [self.translate(self.resolve_names(a), mapping) for a in service.healthcheck.test]
        for i in range(len(args) - 1):
            if args[i] == "--port" and args[i + 1] in self.health_ports:
                args[i + 1] = self.health_ports[args[i + 1]]
        return args

    def log_path(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_path(name)
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(f"  [{name}] {line}" for line in text[-lines:])

    # -- up and down -----------------------------------------------------------------

    def _start(self, service: Service) -> None:
        self.log_path(service.name).parent.mkdir(parents=True, exist_ok=True)
        cwd = self.workdir / "cwd" / service.name
        cwd.mkdir(parents=True, exist_ok=True)
        with self.log_path(service.name).open("ab") as log:
            process = subprocess.Popen(
                self.argv(service),
                cwd=cwd,
                env=self.environment(service),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.running[service.name] = Running(service, process, time.monotonic())
        self.order.append(service.name)

    def _satisfied(self, name: str, condition: str) -> bool:
        if name in self.addresses:
            return True  # a namespace holder: its address stands for the started container
        if condition == "service_completed_successfully":
            return self.completed.get(name) == 0
        running = self.running.get(name)
        if running is None:
            return False
        return condition == "service_started" or running.healthy

    def _check(self, running: Running, now: float) -> None:
        """Reap a one-shot, fail on any other exit, run a due healthcheck."""
        name = running.service.name
        code = running.process.poll()
        if code is not None:
            if code != 0 or name not in self.one_shots:
                raise ComposeError(f"{name} exited with {code}:\n{self.log_tail(name)}")
            self.completed[name] = code
            return
        health = running.service.healthcheck
        if health is None or running.healthy or now < running.next_check:
            return
        try:
            probe = subprocess.run(
                self.health_argv(running.service),
                env=self.environment(running.service),
                capture_output=True,
                timeout=health.timeout_s,
                check=False,
            )
            passed = probe.returncode == 0
        except subprocess.TimeoutExpired:
            passed = False
        running.healthy = passed
        # Docker waits `interval` between checks; polling faster only shortens the test.
        running.next_check = now + min(health.interval_s, 0.2)
        if not passed and now - running.started_at > health.start_period_s:
            running.failures += 1
            if running.failures >= health.retries:
                raise ComposeError(f"{name} is unhealthy:\n{self.log_tail(name)}")

    @property
    def one_shots(self) -> set[str]:
        """Services others wait on to complete (they are expected to exit 0)."""
        return {
            dep
            for service in self.services.values()
            for dep, condition in service.depends_on.items()
            if condition == "service_completed_successfully"
        }

    def up(self, timeout_s: float = 90.0) -> None:
        """Start every service in dependency order; returns once all are started, every one
        with a healthcheck is healthy and every one-shot has exited 0."""
        pending = [name for name in self.services if name not in self.addresses]
        deadline = time.monotonic() + timeout_s
        while True:
            for name in list(pending):
                service = self.services[name]
                if all(self._satisfied(d, c) for d, c in service.depends_on.items()):
                    self._start(service)
                    pending.remove(name)
            now = time.monotonic()
            for running in list(self.running.values()):
                if running.service.name not in self.completed:
                    self._check(running, now)
            waiting = [
                name
                for name, running in self.running.items()
                if (running.service.healthcheck is not None and not running.healthy)
                or (name in self.one_shots and name not in self.completed)
            ]
            if not pending and not waiting:
                return
            if now > deadline:
                raise ComposeError(
                    f"not up after {timeout_s:.0f}s: not started {pending}, waiting for"
                    f" {waiting}\n" + "\n".join(self.log_tail(n) for n in self.running)
                )
            time.sleep(0.05)

    def down(self) -> dict[str, int]:
        """Stop every running service in reverse start order (SIGTERM, then SIGKILL after
        its stop_grace_period); returns each process's exit code."""
        codes: dict[str, int] = {}
        for name in reversed(self.order):
            running = self.running[name]
            process = running.process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=running.service.stop_grace_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            codes[name] = process.returncode
        return codes
