"""One Execute call: the node, the caller and the cluster, and the calls handlers make."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from services.admin import clusterwide
from services.admin.budget import Reservation
from services.admin.certificates import Certificates
from services.admin.cluster import Cluster
from services.admin.exchange import Exchange
from services.admin.node import CALL_TIMEOUT_S, AdminNode, Caller
from services.admin.nodes import Nodes
from services.admin.operations.body import Body, Json
from services.common.errors import ResourceExhausted, from_rpc_error

FORWARD_MARGIN_S = 0.25  # at most this much of an Execute deadline is kept to answer
RECORDS_ANSWER_FACTOR = 4  # memory per byte of records passed through to the answer
PARSED_ANSWER_FACTOR = 24  # ...of log entries parsed into objects (measured: up to ~20)

M = TypeVar("M")


def deadline_of(time_remaining: float | None) -> float | None:
    """The monotonic time an Execute call must have answered by (None: no deadline)."""
    return None if time_remaining is None else time.monotonic() + time_remaining


@dataclass
class Execute:
    """One Execute call: the node, the caller, and the cluster operations."""

    node: AdminNode
    caller: Caller
    cluster: Cluster
    nodes: Nodes
    certificates: Certificates
    exchange: Exchange
    deadline: float | None = None  # monotonic; the Execute call's own deadline
    reservation: Reservation | None = None  # its memory budget (budget.py), grown by answers

    def _timeout(self) -> float:
        """A storage call's timeout: the Execute call's time left, less a margin so that
        storage's answer (e.g. a write confirmation's DEADLINE_EXCEEDED, which storage
        gives shortly before its own deadline) comes back in time."""
        if self.deadline is None:
            return CALL_TIMEOUT_S
        left = self.deadline - time.monotonic()
        return max(0.01, min(CALL_TIMEOUT_S, left - min(FORWARD_MARGIN_S, left / 10)))

    async def storage(self, method: str, request: Any) -> Any:
        """A unary storage call with the caller's credentials (storage checks the role)."""
        return await self.node.call(
            getattr(self.node.storage, method),
            request,
            self.caller.metadata,
            deadline_s=self._timeout(),
        )

    async def storage_stream(self, method: str, request: Any, parsed: bool = False) -> list[Any]:
        """Every message of a streaming storage call, with the caller's credentials, up
        to what one Execute answer can carry (``storage.maxMessageBytes``): beyond it,
        RESOURCE_EXHAUSTED. Each message grows the call's memory reservation by its size
        times what it becomes here (``parsed``: JSON parsed into objects; else records
        passed through as they are)."""
        factor = PARSED_ANSWER_FACTOR if parsed else RECORDS_ANSWER_FACTOR
        limit = self.node.config.storage.max_message_bytes
        call = getattr(self.node.storage, method)(
            request, metadata=self.caller.metadata, timeout=CALL_TIMEOUT_S
        )
        chunks: list[Any] = []
        total = 0
        try:
            async for chunk in call:
                size = chunk.ByteSize()
                total += size
                if total > limit:
                    raise ResourceExhausted(
                        f"the answer is larger than the {limit} bytes an Execute answer"
                        " carries (storage.maxMessageBytes): ask for less at a time (limit"
                        " and offset, get_attributes), or use the typed streaming RPC",
                        reason="ANSWER_TOO_LARGE",
                    )
                if self.reservation is not None:
                    self.reservation.grow(factor * size, "this answer")
                chunks.append(chunk)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "storage") from exc
        finally:
            call.cancel()
        return chunks

    async def on_members(self, body: Body, result: dict[str, Any]) -> Json:
        """``result`` plus, for ``replicated``, each member's outcome of the same
        operation (the body as sent)."""
        names = await clusterwide.members(self.nodes, self.cluster)
        metadata = self.caller.member_metadata(f"{body.operation} with 'replicated'")
        results = await clusterwide.fan_out(self.node, names, body.data, metadata)
        return {**result, "replicated": [r.json() for r in results]}


@dataclass(frozen=True)
class Replicable(Generic[M]):
    """A request that, with ``replicated``, runs on every member too, as the same body."""

    message: M
    replicated: bool
    body: Body
