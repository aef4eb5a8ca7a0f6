"""The admin service's memory budget for Execute: a cost estimated from the request's
bytes before any parsing, reserved for the whole call, per request and per process.

Parsing JSON costs far more memory than the text: an empty object is 2 bytes of text and
about 150 bytes once parsed, re-encoded and forwarded to storage. ``estimate`` bounds what
a request will take from its bytes alone, in one pass of ``bytes.count``: every JSON value
follows ``[``, ``,`` or ``:`` (or is the whole document), so their number is at most one
more than those characters (counted inside strings too, which only overestimates), and
each value costs at most ``VALUE_BYTES``, plus ``TEXT_FACTOR`` times the text (strings:
the parsed copy, the forwarded copy, the encoded message).

``MemoryBudget`` admits a request whose estimate is at most ``request_bytes``
(``operationsApi.maxRequestMemory``; above it: RESOURCE_EXHAUSTED, no retry helps) while
the estimates of the calls in progress stay within ``process_bytes``
(``operationsApi.maxMemory``; otherwise RESOURCE_EXHAUSTED with a RetryInfo at once: a
waiting request would hold its bytes meanwhile). Answers read from storage grow the
reservation as they arrive (``Reservation.grow``), under the same two limits. Measured on
400,000 one-attribute records (5.7 MiB): estimated 151 MiB, taken 130 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import ResourceExhausted

VALUE_BYTES = 160  # the most one JSON value costs parsed, re-encoded and forwarded
TEXT_FACTOR = 8  # copies of the text: gRPC's, the request's, parsed, re-encoded, forwarded
MIB = 1024 * 1024
RETRY_AFTER_S = 1.0


def estimate(raw: bytes) -> int:
    """The memory an Execute request may take, from its bytes (see the module comment)."""
    values = 1 + raw.count(b"[") + raw.count(b",") + raw.count(b":")
    return VALUE_BYTES * values + TEXT_FACTOR * len(raw)


def _mib(size: int) -> str:
    return f"{size / MIB:.0f} MiB"


@dataclass(frozen=True)
class BudgetSettings:
    """``operationsApi.maxRequestMemory`` and ``maxMemory``."""

    request_bytes: int = 384 * MIB
    process_bytes: int = 512 * MIB


class Reservation:
    """What one call holds of the budget; ``release`` gives it back (once)."""

    def __init__(self, budget: MemoryBudget, size: int) -> None:
        self._budget = budget
        self.size = size
        self._released = False

    def grow(self, extra: int, what: str) -> None:
        """Hold ``extra`` more (an answer arriving), without waiting; ResourceExhausted
        when the request or the process would go over its limit."""
        self._budget._grow(self, extra, what)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._release(self.size)


class MemoryBudget:
    """The estimates of the Execute calls in progress in this process (event loop only)."""

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self.used = 0

    def reserve(self, size: int) -> Reservation:
        """Room for a request estimated at ``size`` bytes (see the module comment)."""
        limit = self.settings.request_bytes
        if size > limit:
            raise ResourceExhausted(
                f"this request would take about {_mib(size)} of memory to parse and forward,"
                f" more than the {_mib(limit)} one request may use"
                " (operationsApi.maxRequestMemory): send fewer records or values per request",
                reason="REQUEST_TOO_LARGE",
            )
        if self.used + size > self.settings.process_bytes:
            raise self._busy(size)
        self.used += size
        return Reservation(self, size)

    def _busy(self, size: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the admin service is busy with other large requests ({_mib(self.used)} of its"
            f" {_mib(self.settings.process_bytes)}, operationsApi.maxMemory, in use; this one"
            f" needs about {_mib(size)}): try again in a second",
            reason="ADMIN_BUSY",
            retry_after_s=RETRY_AFTER_S,
        )

    def _grow(self, reservation: Reservation, extra: int, what: str) -> None:
        limit = self.settings.request_bytes
        if reservation.size + extra > limit:
            raise ResourceExhausted(
                f"{what} would take more than the {_mib(limit)} of memory one request may use"
                " (operationsApi.maxRequestMemory): ask for less at a time (limit and offset,"
                " get_attributes), or use the typed streaming RPC",
                reason="ANSWER_TOO_LARGE",
            )
        if self.used + extra > self.settings.process_bytes:
            raise self._busy(extra)
        reservation.size += extra
        self.used += extra

    def _release(self, size: int) -> None:
        self.used -= size
