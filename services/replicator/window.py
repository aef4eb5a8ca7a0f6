"""The sender's window of unacknowledged batches: bounded in count and bytes, so the
memory a slow or stopped peer can make us hold is fixed, however far behind it is."""

from __future__ import annotations

import asyncio
from collections import OrderedDict


class Window:
    """Batches sent and not yet acknowledged; ``acquire`` waits while the window is full."""

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._sent: OrderedDict[int, tuple[int, int]] = OrderedDict()  # seq -> (bytes, txns)
        self._bytes = 0
        self._changed = asyncio.Condition()

    @property
    def used_percent(self) -> float:
        by_count = len(self._sent) / self.max_batches
        by_bytes = self._bytes / self.max_bytes
        return round(100.0 * min(1.0, max(by_count, by_bytes)), 1)

    @property
    def transactions(self) -> int:
        return sum(t for _, t in self._sent.values())

    def _has_room(self) -> bool:
        # A single batch larger than the window is still let through when it is alone.
        return not self._sent or (
            len(self._sent) < self.max_batches and self._bytes < self.max_bytes
        )

    async def acquire(self, sequence: int, size: int, transactions: int) -> None:
        """Wait for room, then count a batch as in flight."""
        async with self._changed:
            await self._changed.wait_for(self._has_room)
            self._sent[sequence] = (size, transactions)
            self._bytes += size

    async def release_through(self, sequence: int) -> None:
        """Acknowledge every batch up to ``sequence`` (acks are cumulative)."""
        async with self._changed:
            while self._sent:
                first = next(iter(self._sent))
                if first > sequence:
                    break
                size, _ = self._sent.pop(first)
                self._bytes -= size
            self._changed.notify_all()

    async def reset(self) -> None:
        """Forget everything in flight (a new subscription generation)."""
        async with self._changed:
            self._sent.clear()
            self._bytes = 0
            self._changed.notify_all()
