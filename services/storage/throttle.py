"""Sign-in throttling: failed sign-ins counted per (user name, source) and per source,
with exponential backoff, decided before any scrypt work.

A *source* is the caller's address (``services.common.sources.source_key``: an IPv4
address or an IPv6 /64), so an attacker hammering one user name from its address slows
down only that name from that address: the real user signing in from elsewhere is not
affected.

* **Per (name, source).** After ``attempts`` consecutive failures, the pair is *blocked*
  for ``initial_backoff_s``; each further failure doubles the wait, up to
  ``max_backoff_s``. While blocked, every sign-in of that name from that source is refused
  with RESOURCE_EXHAUSTED and a RetryInfo saying when to retry, the right password too, and
  without checking it. A success clears the pair.
* **Per source.** Failures from one source under any names (spraying names) are counted
  the same way against ``source_attempts``; a success does not clear them.
* **Concurrent guesses.** Verifications in flight count as failures until they end, so
  sending guesses in parallel gets no more of them checked.
* **Forgetting.** An entry that saw no failure and no block for ``max_backoff_s`` is
  forgotten.
* **Bounded.** At most ``capacity`` entries. When full, forgotten and then the oldest
  unblocked entries make room (their counts restart); a blocked entry is never
  evicted. When every entry is blocked, a sign-in that would need a new entry is
  refused (RESOURCE_EXHAUSTED, retry when the first block ends) and a warning logged.

Everything runs on the event loop, so there is no lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import ResourceExhausted

log = logging.getLogger("shoal.storage.throttle")
T = TypeVar("T")

SOURCE_ONLY = ""  # the name part of a source's own entry
BUSY_RETRY_S = 1.0  # when only parallel guesses are in the way: about one scrypt check


@dataclass(frozen=True)
class ThrottleSettings:
    """``authentication.*``: when sign-ins slow down (0 attempts: never)."""

    attempts: int = 5
    source_attempts: int = 100
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    capacity: int = 100_000


@dataclass
class _Entry:
    failures: int = 0
    in_flight: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """A sign-in being verified: its entries hold one in-flight count each until it
    ends (``SignInThrottle.ended``)."""

    name: str
    source: str


class SignInThrottle:
    """The failure counters of one storage process (see the module comment)."""

    def __init__(
        self, settings: ThrottleSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._full_until = 0.0  # until then, every entry is blocked (see _make_room)

    def __len__(self) -> int:
        return len(self._entries)

    def _limit(self, name: str) -> int:
        return self.settings.source_attempts if name == SOURCE_ONLY else self.settings.attempts

    def _refusal(self, name: str, entry: _Entry, now: float, new: bool) -> float | None:
        """Seconds to wait before this entry lets a sign-in through (None: it does);
        ``new``: the sign-in needs a verification of its own (in-flight ones count)."""
        limit = self._limit(name)
        if not limit:
            return None
        if entry.blocked_until > now:
            return entry.blocked_until - now
        # Once an entry was blocked and its wait is over: one try at a time.
        allowed = max(1, limit - entry.failures)
        return BUSY_RETRY_S if new and entry.in_flight >= allowed else None

    def check(self, name: str, source: str, new: bool = False) -> None:
        """Refuse (ResourceExhausted with the wait) a sign-in of ``name`` from ``source``
        that must wait; called before anything else, so a refusal costs nothing.
        ``new``: it needs a verification of its own, so those in flight count too."""
        now = self._clock()
        for key in self._keys(name, source):
            entry = self._entries.get(key)
            if entry is None:
                continue
            if self._forgettable(entry, now):
                del self._entries[key]
                continue
            wait = self._refusal(key[0], entry, now, new)
            if wait is not None:
                raise self._throttled(key[0], source, wait)

    def begin(self, name: str, source: str) -> Attempt:
        """Count a verification in flight (after ``check``); ResourceExhausted when an
        entry cannot be made."""
        self.check(name, source, new=True)
        for key in self._keys(name, source):
            self._entry(key).in_flight += 1
        return Attempt(name, source)

    def ended(self, attempt: Attempt, failed: bool | None) -> None:
        """The verification ended: count a failure (maybe blocking), clear the pair after
        a success, or only end the attempt when nothing was checked (None)."""
        now = self._clock()
        for key in self._keys(attempt.name, attempt.source):
            entry = self._entries.get(key)
            if entry is None:  # cleared meanwhile (the user was changed)
                continue
            entry.in_flight = max(0, entry.in_flight - 1)
            if failed:
                self._failed(key, entry, now)
            elif failed is False and key[0] != SOURCE_ONLY and entry.blocked_until <= now:
                entry.failures = 0
            if entry.in_flight == 0 and entry.failures == 0 and entry.blocked_until <= now:
                del self._entries[key]

    def succeeded(self, name: str, source: str) -> None:
        """A sign-in of ``name`` from ``source`` succeeded without a verification of its
        own (remembered credentials): clear the pair, as a verified success does."""
        entry = self._entries.get((name, source))
        if entry is not None and entry.in_flight == 0 and entry.blocked_until <= self._clock():
            del self._entries[(name, source)]

    def forget_name(self, name: str) -> None:
        """Clear every entry of a user name (its password or state changed)."""
        for key in [k for k in self._entries if k[0] == name]:
            del self._entries[key]

    def _failed(self, key: tuple[str, str], entry: _Entry, now: float) -> None:
        entry.failures += 1
        entry.last_failure = now
        self._entries.move_to_end(key)
        limit = self._limit(key[0])
        if not limit or entry.failures < limit:
            return
        wait = min(
            self.settings.max_backoff_s,
            self.settings.initial_backoff_s * 2.0 ** min(entry.failures - limit, 64),
        )
        entry.blocked_until = now + wait
        if entry.failures == limit:
            what = f"user name {key[0]!r}" if key[0] != SOURCE_ONLY else "any user name"
            log.warning(
                "sign-ins of %s from %s slowed down after %d failures: next try in %.0fs,"
                " doubling with each failure up to %.0fs",
                what,
                key[1],
                limit,
                wait,
                self.settings.max_backoff_s,
            )

    def _entry(self, key: tuple[str, str]) -> _Entry:
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        if len(self._entries) >= self.settings.capacity:
            self._make_room()
        entry = self._entries[key] = _Entry()
        return entry

    def _forgettable(self, entry: _Entry, now: float) -> bool:
        """No failure, no block and nothing in flight for ``max_backoff_s``."""
        quiet_since = max(entry.last_failure, entry.blocked_until)
        return entry.in_flight == 0 and now - quiet_since >= self.settings.max_backoff_s

    def _keys(self, name: str, source: str) -> list[tuple[str, str]]:
        """The entries a sign-in counts on (none for a rule that is off)."""
        keys = [(name, source)] if self.settings.attempts else []
        return [*keys, (SOURCE_ONLY, source)] if self.settings.source_attempts else keys

    def _make_room(self) -> None:
        """Evict the entry that failed longest ago and is neither blocked nor busy (never
        a blocked one or one with a verification in flight); ResourceExhausted when there
        is none, remembered until the first block ends, so a full table is not scanned
        again for every refused sign-in."""
        now = self._clock()
        if now < self._full_until:
            raise self._full(now)
        for key, entry in self._entries.items():  # oldest failure first
            if entry.in_flight == 0 and entry.blocked_until <= now:
                del self._entries[key]
                return
        self._full_until = max(
            now + BUSY_RETRY_S, min((e.blocked_until for e in self._entries.values()), default=now)
        )
        log.warning(
            "refusing sign-ins that would need a new entry for %.0fs: all %d tracked"
            " entries are blocked or busy (authentication.trackedFailures)",
            self._full_until - now,
            len(self._entries),
        )
        raise self._full(now)

    def _full(self, now: float) -> ResourceExhausted:
        wait = self._full_until - now
        return ResourceExhausted(
            f"too many failed sign-ins on this node right now: try again in {_seconds(wait)}",
            reason="SIGN_IN_THROTTLED",
            retry_after_s=wait,
        )

    def _throttled(self, name: str, source: str, wait: float) -> ResourceExhausted:
        what = "this user name" if name != SOURCE_ONLY else "any user name"
        return ResourceExhausted(
            f"too many failed sign-ins of {what} from {source}: try again in"
            f" {_seconds(wait)} (the wait doubles with each failure; see"
            " authentication.lockoutAttempts)",
            reason="SIGN_IN_THROTTLED",
            retry_after_s=wait,
        )


def _seconds(wait: float) -> str:
    whole = max(1, round(wait + 0.49))
    return f"{whole} second{'s' if whole != 1 else ''}"


class VerificationSlots:
    """At most ``slots`` scrypt checks at once, on threads of their own (each check takes
    16 MiB and most of a core for tens of milliseconds, and the C library keeps freed
    memory per thread, so the number of threads that ever ran one bounds the memory
    too); at most ``queue`` sign-ins wait for a slot, each for at most ``wait_s``. Beyond
    that: ResourceExhausted, retry in a second."""

    def __init__(self, slots: int, queue: int, wait_s: float) -> None:
        self._semaphore = asyncio.Semaphore(slots)
        self._executor = concurrent.futures.ThreadPoolExecutor(slots, "scrypt")
        self._queue = queue
        self._wait_s = wait_s
        self._waiting = 0

    async def run(self, check: Callable[[], T]) -> T:
        """Run ``check`` in a slot (ResourceExhausted when none comes free in time)."""
        async with self._slot():
            return await asyncio.get_running_loop().run_in_executor(self._executor, check)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._waiting >= self._queue:
            raise _busy()
        self._waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self._wait_s)
        except TimeoutError:
            raise _busy() from None
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._semaphore.release()


def _busy() -> ResourceExhausted:
    return ResourceExhausted(
        "too many sign-ins are being checked on this node right now: try again in 1 second"
        " (authentication.maxConcurrentVerifications)",
        reason="SIGN_IN_BUSY",
        retry_after_s=BUSY_RETRY_S,
    )
