"""Write confirmation (``replicated_confirmation: N`` on a write request).

N asks that the write be whole on N + 1 nodes when the call answers: this node and N
peers that durably committed it. In a table with residents (``replicateTo``), only nodes
that hold the whole write count, which are the residents of the records it wrote: this
node when it is a resident of a record (and does not hold it as a stub), and peers that
are residents of it. A node holding a stub never counts, so records this node holds only
as stubs need N + 1 of their residents. Records are grouped by their residents; each
group must reach its count, and records without residents need N peers of any kind.

A confirmed write goes:

    1. validate N (0 to the possible recipients); ask the node's replicator which peers
       can receive the write (ListRecipients) and refuse N larger than that, before
       anything is written;
    2. in the synchronous step that commits, once the records' residents are known:
       refuse the write (nothing is written) when a group's residents that can receive
       it are fewer than the group needs (``plan``);
    3. commit locally as any write;
    4. ask the replicator to wait until the peers confirmed as ``plan`` says
       (WaitReplicated), until shortly before the call's deadline.

Storage is the replicator's server for everything else; this is the one call in the other
direction, on the replicator's node socket with the node-internal identity. A
replicator that cannot be reached fails step 1 (UNAVAILABLE, nothing written); in step
4 the wait is retried with backoff until the time is up, then ends like any other timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
REASON_IMPOSSIBLE = "CONFIRMATION_IMPOSSIBLE"  # refused before anything is written


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


@dataclass(frozen=True)
class ResidentGroup:
    """Records of a write whose residents are ``residents``: ``count`` of ``peers`` (the
    residents that can receive the write, this node excluded) must confirm."""

    residents: tuple[str, ...]
    peers: tuple[str, ...]
    count: int
    here: bool  # this node holds these records whole (it counts as one)
    tables: tuple[str, ...]


@dataclass(frozen=True)
class Need:
    """What confirms one write: ``count`` peers of any kind (records without residents)
    and, for each group of records with residents, the group's count of its peers."""

    count: int
    groups: tuple[ResidentGroup, ...] = ()

    def missing(self, peers: Iterable[str]) -> list[tuple[int, int, ResidentGroup | None]]:
        """(missing, needed, group) for each requirement ``peers`` do not meet yet."""
        confirmed = set(peers)
        out: list[tuple[int, int, ResidentGroup | None]] = []
        if len(confirmed) < self.count:
            out.append((self.count - len(confirmed), self.count, None))
        for group in self.groups:
            have = len(confirmed & set(group.peers))
            if have < group.count:
                out.append((group.count - have, group.count, group))
        return out

    @property
    def total(self) -> int:
        return self.count + sum(g.count for g in self.groups)


def plan(
    node: str,
    count: int,
    database: str,
    recipients: Sequence[str],
    written: Iterable[tuple[str, tuple[str, ...], bool]],
) -> Need:
    """What confirms a write of ``count`` (N) from ``node``, from each record it writes as
    (table, residents, whether ``node`` holds it whole after the commit); InvalidArgument
    when a group cannot be confirmed by the residents that can receive the write."""
    reachable = set(recipients)
    anyone = False
    grouped: dict[tuple[tuple[str, ...], bool], set[str]] = {}
    for table, residents, whole in written:
        if not residents:
            anyone = True
            continue
        grouped.setdefault((tuple(sorted(residents)), whole), set()).add(table)
    groups = []
    for (residents, here), tables in sorted(grouped.items()):
        peers = tuple(r for r in residents if r != node and r in reachable)
        needed = count if here else count + 1
        if needed > len(peers):
            where = f"{database}.{','.join(sorted(tables))}"
            them = ", ".join(peers) if peers else "none"
            if here:
                why = f"besides this node, {len(peers)} of them can receive the write ({them})"
            else:
                why = (
                    f"this node holds only stubs of them, so {needed} residents must confirm,"
                    f" and {len(peers)} can receive the write ({them})"
                )
            raise InvalidArgument(
                f"replicated_confirmation {count} asks for the write to be whole on"
                f" {count + 1} nodes, but records of {where} it writes are whole only on"
                f" their residents {', '.join(residents)}: {why}; nothing was written",
                reason=REASON_IMPOSSIBLE,
            )
        groups.append(ResidentGroup(residents, peers, needed, here, tuple(sorted(tables))))
    return Need(count if anyone or not groups else 0, tuple(groups))


def not_confirmed(version: int, need: Need, peers: list[str], waited_s: float) -> DeadlineExceeded:
    """The error of a confirmed write whose confirmations did not all arrive in time."""
    short = need.missing(peers)
    missing = sum(m for m, _, _ in short)
    by = f" (confirmed by {', '.join(peers)})" if peers else ""
    details = "".join(
        f"; {m} more of the residents {', '.join(g.peers)} of records of"
        f" {','.join(g.tables)} ({'' if g.here else 'this node holds only stubs of them, '}"
        f"{g.count} must confirm)"
        for m, _, g in short
        if g is not None
    )
    return DeadlineExceeded(
        f"the write is committed locally (version {version}) and will still replicate, but"
        f" {missing} of {need.total} replication confirmations are missing after"
        f" {waited_s:.1f}s{by}{details}",
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

    async def check_recipients(self, database: str, tables: Iterable[str], count: int) -> list[str]:
        """The peers that can receive the write; InvalidArgument when fewer than
        ``count``; Unavailable when the replicator cannot say."""
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
        return peers

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

    async def wait(self, database: str, version: int, need: Need, budget_s: float) -> None:
        """Wait until the peers ``need`` asks for committed ``version``; DeadlineExceeded
        (saying the write is committed locally) when ``budget_s`` runs out first."""
        started = time.monotonic()
        deadline = started + budget_s
        backoff = Backoff(0.05, 1.0)
        peers: list[str] = []
        groups = [rpb.ConfirmationGroup(peers=g.peers, count=g.count) for g in need.groups]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = await self._replicator().WaitReplicated(
                    rpb.WaitReplicatedRequest(
                        database=database,
                        version=version,
                        count=need.count,
                        timeout_ms=max(1, int(left * 1000)),
                        groups=groups,
                    ),
                    metadata=self._metadata,
                    timeout=left + RPC_SLACK_S,
                )
            except grpc.aio.AioRpcError:
                # The replicator is restarting: try again while there is time.
                await asyncio.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))
                continue
            peers = list(reply.confirmed_peers)
            if not need.missing(peers):
                return
            break
        raise not_confirmed(version, need, peers, time.monotonic() - started)
