"""Loopback addresses for test nodes: every node gets its own 127.x.y.z, so nodes use
Shoal's default ports exactly as a real cluster does, and parallel test workers never
collide."""

from __future__ import annotations

import itertools
import os
import random
import socket

_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_SECOND = 100 + (int(_worker) if _worker.isdigit() else 0) % 100
_counter = itertools.count(random.Random(os.getpid()).randrange(0, 40) * 1000)


def _free(address: str) -> bool:
    """No process (another test run, a leftover node) listens on Shoal's ports there."""
    for port in (9925, 9926, 9932):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


def next_address() -> str:
    """A fresh loopback address for one node, skipping addresses already in use."""
    while True:
        n = next(_counter)
        third, fourth = divmod(n, 250)
        address = f"127.{_SECOND}.{third % 250}.{fourth + 2}"
        if _free(address):
            return address
