"""Write confirmation (``replicated_confirmation: N`` on a write request).

A confirmed write goes:

    1. validate N (0 to the possible recipients); ask the node's replicator which peers
       can receive the write (ListRecipients) and refuse N larger than that, before
       anything is written;
    2. commit locally as any write;
    3. ask the replicator to wait until N distinct peers acknowledged committing the
       transaction (WaitReplicated), until shortly before the call's deadline.

Storage is the replicator's server for everything else; this is the one call in the other
direction, on the replicator's plain port of this host with the node-internal identity.
A replicator that cannot be reached fails step 1 (UNAVAILABLE, nothing written); in step
3 the wait is retried with backoff until the time is up, then ends like any other timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc

from services.common.auth import bearer_metadata
from services.common.backoff import Backoff
from services.common.config import ShoalConfig
from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.common.node_tls import node_channel

DEFAULT_WAIT_S = 30.0  # when the call has no deadline
MAX_WAIT_S = 3600.0  # the replicator's bound on one wait
ANSWER_MARGIN_S = 0.5  # at most this much of the deadline is kept to answer in time
RECIPIENTS_TIMEOUT_S = 5.0
RPC_SLACK_S = 1.0  # WaitReplicated's gRPC deadline beyond its own timeout
REASON = "REPLICATION_NOT_CONFIRMED"


def requested(value: int) -> int:
    """The validated ``replicated_confirmation`` of a request."""
    if value < 0:
        raise InvalidArgument(
            f"replicated_confirmation must be 0 or a positive number of peers, not {value}"
        )
    return value


def wait_budget(time_remaining: float | None) -> float:
    """Seconds to wait for confirmations: the call's time left minus a margin to answer
    before the caller's own deadline fires (a tenth, at most ANSWER_MARGIN_S), or
    DEFAULT_WAIT_S without a deadline."""
    if time_remaining is None:
        return DEFAULT_WAIT_S
    return min(MAX_WAIT_S, max(0.0, time_remaining - min(ANSWER_MARGIN_S, time_remaining / 10)))


def not_confirmed(version: int, count: int, peers: list[str], waited_s: float) -> DeadlineExceeded:
    """The error of a confirmed write whose confirmations did not all arrive in time."""
    missing = count - len(peers)
    by = f" (confirmed by {', '.join(peers)})" if peers else ""
    return DeadlineExceeded(
        f"the write is committed locally (version {version}) and will still replicate, but"
        f" {missing} of {count} replication confirmations are missing after"
        f" {waited_s:.1f}s{by}",
        reason=REASON,
        metadata={"version": str(version), "confirmed": str(len(peers)), "missing": str(missing)},
    )


class ReplicatorClient:
    """This node's replicator, for write confirmation (node-internal identity)."""

    def __init__(self, config: ShoalConfig, node_secret: str) -> None:
        self.address = config.socket_address("replicator")
        self._config = config
        self._metadata = bearer_metadata(node_secret)
        self._channel: grpc.aio.Channel | None = None
        self._stub: replicator_pb2_grpc.ReplicatorNodeServiceAsyncStub | None = None

    def _replicator(self) -> replicator_pb2_grpc.ReplicatorNodeServiceAsyncStub:
        if self._stub is None:  # created on first use, inside the event loop
            max_bytes = self._config.storage.max_message_bytes
            self._channel = node_channel(self._config, "replicator", max_bytes)
            self._stub = replicator_pb2_grpc.ReplicatorNodeServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def check_recipients(self, database: str, tables: Iterable[str], count: int) -> None:
        """InvalidArgument when fewer than ``count`` peers can receive the write;
        Unavailable when the replicator cannot say."""
        names = sorted(set(tables))
        try:
            reply = await self._replicator().ListRecipients(
                rpb.ListRecipientsRequest(database=database, tables=names),
                metadata=self._metadata,
                timeout=RECIPIENTS_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"cannot confirm replication: this node's replicator at {self.address} is"
                f" unavailable ({exc.details() or exc.code().name}); nothing was written"
            ) from exc
        peers = list(reply.peers)
        if count > len(peers):
            where = f"{database}.{','.join(names)}"
            known = f" ({', '.join(peers)})" if peers else ""
            raise InvalidArgument(
                f"replicated_confirmation {count} is more than the {len(peers)} peers that"
                f" can receive writes to {where}{known}; nothing was written"
            )

    async def status(self, timeout_s: float) -> rpb.StatusResponse:
        """The replicator's Status (raises the AioRpcError when it does not answer)."""
        reply: rpb.StatusResponse = await self._replicator().Status(
            rpb.StatusRequest(), metadata=self._metadata, timeout=timeout_s
        )
        return reply

    async def fetch(
        self,
        database: str,
        table: str,
        ids: list[bytes],
        residents: tuple[str, ...],
        budget_s: float,
        states: bool = False,
    ) -> rpb.FetchRecordsResponse:
        """Whole records from their residents (residency read-through); Unavailable, with
        the replicator's sentence naming the residents, when none answered."""
        try:
            reply: rpb.FetchRecordsResponse = await self._replicator().FetchRecords(
                rpb.FetchRecordsRequest(
                    database=database,
                    table=table,
                    ids=ids,
                    residents=residents,
                    timeout_ms=max(1, int(budget_s * 1000)),
                    states=states,
                ),
                metadata=self._metadata,
                timeout=budget_s + RPC_SLACK_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details():
                raise Unavailable(exc.details() or "") from exc
            raise Unavailable(
                f"cannot read {database}.{table} records held by {', '.join(residents)}: this"
                f" node's replicator at {self.address} did not answer"
                f" ({exc.details() or exc.code().name})"
            ) from exc
        return reply

    async def wait(self, database: str, version: int, count: int, budget_s: float) -> None:
        """Wait until ``count`` peers committed ``version``; DeadlineExceeded (saying the
        write is committed locally) when ``budget_s`` runs out first."""
        started = time.monotonic()
        deadline = started + budget_s
        backoff = Backoff(0.05, 1.0)
        peers: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = await self._replicator().WaitReplicated(
                    rpb.WaitReplicatedRequest(
                        database=database,
                        version=version,
                        count=count,
                        timeout_ms=max(1, int(left * 1000)),
                    ),
                    metadata=self._metadata,
                    timeout=left + RPC_SLACK_S,
                )
            except grpc.aio.AioRpcError:
                # The replicator is restarting: try again while there is time.
                await asyncio.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))
                continue
            peers = list(reply.confirmed_peers)
            if len(peers) >= count:
                return
            break
        raise not_confirmed(version, count, peers, time.monotonic() - started)
