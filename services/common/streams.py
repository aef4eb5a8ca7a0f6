"""Limits on connections and on streamed responses, so that clients that open streams
and never read them cannot take a process's memory or other clients' turn.

* **Connections and streams per connection** are gRPC's own limits
  (``grpc.max_allowed_incoming_connections``: a connection beyond it is closed as it is
  accepted; ``grpc.max_concurrent_streams``: HTTP/2 makes the client queue calls beyond
  it on its side).
* **Open streamed responses** (searches, log reads) are admitted by ``StreamGuard``: at
  most ``max_streams`` at once in the process and ``max_streams_per_client`` per source
  address (``services.common.sources.source_key``; behind the admin service, the address
  it vouches for), so one client cannot take every slot. A stream beyond either limit
  is refused at once with RESOURCE_EXHAUSTED and a RetryInfo. The node's own processes
  (node-internal identity: the replicator's Subscribe, Snapshot and Backup) are not
  counted.
* **Idle streams.** A response message not taken by the transport within
  ``idle_timeout_s`` means the client stopped reading (HTTP/2 flow control holds the
  message back): the stream ends with RESOURCE_EXHAUSTED saying why (the client sees it
  after the messages it has not read yet), its handler is cancelled and its slot freed.
* **Bounded bytes per stream.** Handlers produce one message at a time and wait until
  the transport took it, so the process holds about two messages per stream; their
  size is bounded by the caller (``storage.streamChunkBytes`` for storage). What the
  transport took sits in the kernel's socket buffers and the client's window, outside
  the process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.errors import ResourceExhausted
from services.common.sources import source_key

log = logging.getLogger("shoal.streams")

RETRY_AFTER_S = 1.0  # a refused stream: try again in about this long


@dataclass(frozen=True)
class StreamLimits:
    """How many connections and streams one server accepts, and how long a stream may
    wait for its client to read."""

    max_connections: int = 1000
    max_streams_per_connection: int = 100
    max_streams: int = 64
    max_streams_per_client: int = 8
    idle_timeout_s: float = 60.0
    config_prefix: str = "storage"  # where the keys live, for messages

    def server_options(self) -> list[tuple[str, Any]]:
        """gRPC server options enforcing the connection and per-connection limits."""
        return [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
        ]


class _Slot:
    """One admitted stream; released once, whichever way it ends."""

    __slots__ = ("_guard", "key", "released")

    def __init__(self, guard: StreamGuard, key: str) -> None:
        self._guard = guard
        self.key = key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._guard._release(self.key)


class StreamGuard:
    """Admission and idle timeout of the streamed responses of one server (event loop
    only, no lock)."""

    def __init__(self, limits: StreamLimits, service: str) -> None:
        self.limits = limits
        self._service = service
        self._open = 0
        self._per_client: dict[str, int] = {}
        self._refused = {"node": 0, "client": 0}
        self._idle_closed = 0
        self._aborting: set[asyncio.Task[None]] = set()

    @property
    def open(self) -> int:
        return self._open

    def admit(self, source: str) -> _Slot:
        """A slot for a new stream from ``source``; ResourceExhausted when none is free."""
        key = source_key(source)
        limits = self.limits
        prefix = limits.config_prefix
        if self._open >= limits.max_streams:
            self._refused["node"] += 1
            raise ResourceExhausted(
                f"this node is serving {self._open} streamed responses, its limit"
                f" ({prefix}.maxStreams): try again in a second, and read streams to their end",
                reason="TOO_MANY_STREAMS",
                retry_after_s=RETRY_AFTER_S,
            )
        if self._per_client.get(key, 0) >= limits.max_streams_per_client:
            self._refused["client"] += 1
            raise ResourceExhausted(
                f"{key} already has {limits.max_streams_per_client} streamed responses open"
                f" on this node ({prefix}.maxStreamsPerClient): read or cancel one first,"
                " then try again",
                reason="TOO_MANY_STREAMS",
                retry_after_s=RETRY_AFTER_S,
            )
        self._open += 1
        self._per_client[key] = self._per_client.get(key, 0) + 1
        return _Slot(self, key)

    def _release(self, key: str) -> None:
        self._open -= 1
        left = self._per_client.get(key, 1) - 1
        if left > 0:
            self._per_client[key] = left
        else:
            self._per_client.pop(key, None)

    async def guarded(
        self,
        items: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        source: str,
        method: str,
    ) -> AsyncIterator[Any]:
        """``items`` within a slot (admitted before the first item is produced), each
        one given ``idle_timeout_s`` to be taken by the transport."""
        slot = self.admit(source)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            async for item in items:
                timer = loop.call_later(
                    self.limits.idle_timeout_s, self._idle, task, context, slot, method
                )
                try:
                    yield item
                finally:
                    timer.cancel()
        finally:
            slot.release()

    def _idle(
        self,
        task: asyncio.Task[Any] | None,
        context: grpc.aio.ServicerContext[Any, Any],
        slot: _Slot,
        method: str,
    ) -> None:
        """The client has not read for ``idle_timeout_s``: end the stream with a status it
        sees once it reads again, cancel the handler (it waits on the transport) and free
        the slot now."""
        self._idle_closed += 1
        timeout = self.limits.idle_timeout_s
        log.warning(
            "closing a %s stream of %s: the client read nothing for %.0fs (%s.streamIdleTimeout)",
            method.rsplit("/", 1)[-1],
            slot.key,
            timeout,
            self.limits.config_prefix,
        )
        error = ResourceExhausted(
            f"this stream was closed: the client read nothing of it for {timeout:.0f}s"
            f" ({self.limits.config_prefix}.streamIdleTimeout); read responses as they come,"
            " or ask for fewer at a time (limit and offset)",
            reason="STREAM_IDLE",
        )
        aborting = asyncio.get_running_loop().create_task(_abort(context, error, task))
        self._aborting.add(aborting)  # a task nobody holds may be collected mid-way
        aborting.add_done_callback(self._aborting.discard)
        slot.release()

    def collect(self) -> list[Metric]:
        """``shoal_<service>_streams_open``, ``..._streams_refused_total{reason}`` and
        ``..._streams_idle_closed_total``."""
        prefix = f"shoal_{self._service}_streams"
        opened = GaugeMetricFamily(
            f"{prefix}_open", "Streamed responses being served to clients (not node-internal)."
        )
        opened.add_metric([], self._open)
        refused = CounterMetricFamily(
            f"{prefix}_refused",
            "Streamed responses refused: over the node's limit, or over the client's.",
            labels=["reason"],
        )
        for reason, count in sorted(self._refused.items()):
            refused.add_metric([reason], count)
        idle = CounterMetricFamily(
            f"{prefix}_idle_closed",
            "Streamed responses closed because the client read nothing for streamIdleTimeout.",
        )
        idle.add_metric([], self._idle_closed)
        return [opened, refused, idle]


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    error: ResourceExhausted,
    task: asyncio.Task[Any] | None,
) -> None:
    """Send ``error`` as the stream's status (queued behind the unread messages), then
    cancel the handler waiting on the transport."""
    try:
        await context.abort_with_status(error.to_status())
    except grpc.aio.AbortError:
        pass
    except Exception:  # the call ended meanwhile
        log.debug("could not send the idle stream's status", exc_info=True)
    finally:
        if task is not None and not task.done():
            task.cancel()
