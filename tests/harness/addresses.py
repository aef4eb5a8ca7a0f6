"""Loopback addresses for test nodes: every node gets its own 127.x.y.z, so nodes use
Shoal's default ports exactly as a real cluster does, and parallel test workers never
collide."""

from __future__ import annotations

import itertools
import os
import random

_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
_SECOND = 100 + (int(_worker) if _worker.isdigit() else 0) % 100
_counter = itertools.count(random.Random(os.getpid()).randrange(0, 40) * 1000)


def next_address() -> str:
    """A fresh loopback address for one node."""
    n = next(_counter)
    third, fourth = divmod(n, 250)
    return f"127.{_SECOND}.{third % 250}.{fourth + 2}"
