"""Nodes with source addresses of their own, in Linux network namespaces.

On plain loopback every dial leaves from 127.0.0.1 whatever address it goes to (and gRPC
cannot bind a channel's source address), so tests of IP-based authentication need
nodes whose outgoing connections carry their own address. A ``Subnet`` gives each such
node a network namespace joined to this (the root) namespace by a veth pair:

    root namespace                         namespace i
      127.200.S.1 (on lo, as all of 127/8)   lo up (127.0.0.1)
      veth i  ── route 127.200.S.i/32 ─────  veth peer 127.200.S.i/24
               (src 127.200.S.1, local       route 127.200.S.0/24 via the peer
                table, so it beats 127/8)    (local table, so it beats 127/8)

``route_localnet`` is set on the veth devices (and in the namespaces), never on the root
namespace's ``all``: loopback addresses may then travel over the veth. The test process
(root namespace) reaches every namespaced node, and a node in the root namespace on
127.200.S.1 reaches them too, from 127.200.S.1. Namespaces do not reach each other.

Needs root (``ip netns``); ``unavailable()`` says why not. ``Subnet.close()`` stops every
process left in its namespaces and deletes the namespaces and links, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness.node import MODULES, REPO, Node

IP = "ip"
TIMEOUT_S = 10


def _run(*command: str) -> str:
    done = subprocess.run(
        list(command), capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces are a Linux feature"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    try:
        _run(IP, "netns", "list")
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"the ip command cannot manage namespaces: {exc}"
    return None


def _subnet_free(third: int) -> bool:
    prefix = f"127.200.{third}."
    if prefix in _run(IP, "route", "show", "table", "all"):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((f"{prefix}1", 9932))
        except OSError:
            return False
    return True


class Subnet:
    """127.200.S.0/24: 127.200.S.1 in the root namespace, one namespace per other address."""

    def __init__(self) -> None:
        chooser = random.Random(os.getpid())
        for _ in range(50):
            third = chooser.randrange(1, 250)
            if _subnet_free(third):
                break
        else:
            raise RuntimeError("no free 127.200.x.0/24 subnet")
        self.prefix = f"127.200.{third}"
        self.root_address = f"{self.prefix}.1"
        self._tag = f"{os.getpid() % 100000}{third % 10}"
        self.namespaces: list[str] = []
        self._links: list[str] = []

    def add(self) -> tuple[str, str]:
        """A new namespace joined to the root one: (its name, its address)."""
        index = len(self.namespaces) + 2
        address = f"{self.prefix}.{index}"
        namespace = f"shoal-test-{self._tag}-{index}"
        outer, inner = f"sh{self._tag}o{index}", f"sh{self._tag}i{index}"
        _run(IP, "netns", "add", namespace)
        self.namespaces.append(namespace)
        _run(IP, "link", "add", outer, "type", "veth", "peer", "name", inner)
        self._links.append(outer)
        _run(IP, "link", "set", inner, "netns", namespace)
        _run("sysctl", "-qw", f"net.ipv4.conf.{outer}.route_localnet=1")
        _run(IP, "link", "set", outer, "up")
        _run(IP, "route", "add", f"{address}/32", "dev", outer, "src", self.root_address,
             "table", "local")  # fmt: skip
        inside = (IP, "netns", "exec", namespace)
        _run(*inside, IP, "link", "set", "lo", "up")
        _run(*inside, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        _run(*inside, "sysctl", "-qw", f"net.ipv4.conf.{inner}.route_localnet=1")
        _run(*inside, IP, "addr", "add", f"{address}/24", "dev", inner)
        _run(*inside, IP, "link", "set", inner, "up")
        _run(*inside, IP, "route", "add", f"{self.prefix}.0/24", "dev", inner, "src", address,
             "table", "local")  # fmt: skip
        return namespace, address

    def close(self) -> None:
        """Stop what still runs in the namespaces, then delete them and their links."""
        for namespace in self.namespaces:
            with contextlib.suppress(Exception):
                for pid in _run(IP, "netns", "pids", namespace).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        for link in self._links:
            with contextlib.suppress(Exception):
                _run(IP, "link", "del", link)
        for namespace in self.namespaces:
            with contextlib.suppress(Exception):
                _run(IP, "netns", "del", namespace)
        self.namespaces.clear()
        self._links.clear()

    def leftovers(self) -> list[str]:
        """Namespaces or links of this subnet that still exist (empty after close)."""
        found = [n for n in _run(IP, "netns", "list").split() if self._tag in n]
        links = _run(IP, "-o", "link", "show")
        found += [f"link {link}" for link in self._links if f" {link}@" in links]
        return found


class NamespacedNode(Node):
    """A node whose processes run in a network namespace (``ip netns exec``)."""

    def __init__(self, workdir: Path, namespace: str, **kwargs: Any) -> None:
        self.namespace = namespace
        super().__init__(workdir, **kwargs)

    def start_service(
        self, service: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> None:
        running = self.processes.get(service)
        if running is not None and running.poll() is None:
            raise RuntimeError(f"{service} of {self.name} is already running")
        log = self.log_path(service).open("ab")
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # `ip netns exec` enters the namespace and execs the command: same process.
        self.processes[service] = subprocess.Popen(
            [
                *(IP, "netns", "exec", self.namespace),
                *(sys.executable, "-m", MODULES[service], "--config", str(self.config_path)),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
        log.close()
        if wait:
            self.wait_ready(service)
