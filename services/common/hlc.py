"""Hybrid logical clock.

A version is one unsigned 64-bit integer: the upper 48 bits are Unix time in
milliseconds, the lower 16 bits a logical counter. Because the counter is the low part of
one integer, "increment the counter, carrying into the milliseconds on overflow" is just
``+ 1``, and versions compare as plain integers.

Rules (Kulkarni et al., simplified to a single integer):
  * local event:  v = max(physical_now << 16, last + 1)
  * receive r:    v = max(physical_now << 16, last + 1, r + 1)
Both are strictly increasing, so a node never issues the same version twice; restoring
``last`` from disk at start-up keeps that true across restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
MAX_VERSION = (1 << 64) - 1


def wall_clock_ms(offset_ms: int = 0) -> Callable[[], int]:
    """A physical clock in Unix milliseconds, shifted by ``offset_ms`` (for skew tests)."""

    def now() -> int:
        return time.time_ns() // 1_000_000 + offset_ms

    return now


def version_ms(version: int) -> int:
    """The physical part of a version, in Unix milliseconds."""
    return version >> LOGICAL_BITS


def version_from_ms(ms: int) -> int:
    """The smallest version at Unix time ``ms``."""
    return max(0, ms) << LOGICAL_BITS


def version_as_ms(version: int) -> float:
    """A version as Harper shows times: Unix milliseconds, the counter as the fraction
    (counter / 65536). A double cannot hold all 64 bits, so close versions may share a
    value; the integer version is the exact name."""
    return version_ms(version) + (version & LOGICAL_MASK) / (LOGICAL_MASK + 1)


def format_version(version: int) -> str:
    """Human form: ``<unix ms>.<counter>``."""
    return f"{version >> LOGICAL_BITS}.{version & LOGICAL_MASK}"


class HybridClock:
    """A hybrid logical clock for one node. Not thread-safe; used from one event loop."""

    def __init__(self, physical_ms: Callable[[], int], last: int = 0) -> None:
        self._physical_ms = physical_ms
        self._last = last

    @property
    def last(self) -> int:
        """The most recent version issued or observed."""
        return self._last

    def physical_ms(self) -> int:
        """The physical clock now, in Unix milliseconds."""
        return self._physical_ms()

    def peek(self) -> int:
        """The clock's current reading without issuing a version."""
        return max(self._physical_ms() << LOGICAL_BITS, self._last)

    def now(self) -> int:
        """A new version for a local event, greater than every earlier one."""
        self._last = max(self._physical_ms() << LOGICAL_BITS, self._last + 1)
        return self._last

    def observe(self, remote: int) -> int:
        """Receive rule: move past a version seen from another node, then tick."""
        self._last = max(self._physical_ms() << LOGICAL_BITS, self._last + 1, remote + 1)
        return self._last

    def ahead_ms(self, version: int) -> int:
        """How far ``version`` is ahead of the physical clock, in ms (negative if behind)."""
        return (version >> LOGICAL_BITS) - self._physical_ms()
