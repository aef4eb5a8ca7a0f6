"""Cluster-wide operations (``replicated: true``) and restarts.

The node running an operation with ``replicated: true`` does it itself, then asks every
member to do the same through the member's admin service: the members are the live rows
of ``system.hdb_nodes`` and this node's routes, the member's admin service is at the
member's host on this node's admin port (over TLS trusting this node's CA when this
node's admin port serves TLS), and the caller's own credentials are forwarded, so each
member checks the caller as if called directly. Every member call has a deadline; each
outcome becomes a ``NodeResult`` (``{node, ok, error, code}``).

A restart is in place (``services.common.lifecycle``): each service of the node is asked
to restart and watched until a new instance of it answers, one after the other, and the
node is then waited on until it is caught up (connected again to every peer it was
connected to, with a small backlog). A rolling restart does that to one member at a
time, the next only after the previous is back and caught up, and to this node last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.lifecycle.v1 import lifecycle_pb2 as lpb
from shoal.lifecycle.v1 import lifecycle_pb2_grpc
from shoal.replicator.v1 import replicator_pb2 as rpb

from services.admin.cluster import Cluster
from services.admin.node import AdminNode, Metadata
from services.admin.nodes import Nodes
from services.common.backoff import Backoff
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument

SERVICES = ("storage", "replicator", "admin")  # restart order: admin last, after answering
MEMBER_CALL_TIMEOUT_S = 30.0  # one operation on one member
SERVICE_RESTART_TIMEOUT_S = 60.0  # one service: from the restart request until it serves
CAUGHT_UP_TIMEOUT_S = 60.0  # a restarted node: until it is connected and caught up
CAUGHT_UP_BACKLOG = 100  # transactions per peer and database still "caught up"
MEMBER_RESTART_TIMEOUT_S = 2 * SERVICE_RESTART_TIMEOUT_S + CAUGHT_UP_TIMEOUT_S + 10.0
_FAILED_PRECONDITION = FailedPrecondition.code.value[0]
_DEADLINE_EXCEEDED = DeadlineExceeded.code.value[0]


@dataclass(frozen=True)
class NodeResult:
    """What one member made of a cluster-wide operation."""

    node: str
    ok: bool
    error: str = ""
    code: int = 0

    def json(self) -> dict[str, Any]:
        if self.ok:
            return {"node": self.node, "ok": True}
        return {"node": self.node, "ok": False, "error": self.error, "code": self.code}

    def message(self) -> apb.NodeResult:
        return apb.NodeResult(node=self.node, ok=self.ok, error=self.error, code=self.code)


def services_to_restart(names: Iterable[str]) -> list[str]:
    """The named services in restart order (all three when none is named)."""
    wanted = list(names)
    unknown = sorted(set(wanted) - set(SERVICES))
    if unknown:
        raise InvalidArgument(
            f"unknown service {', '.join(map(repr, unknown))}; services: {', '.join(SERVICES)}"
        )
    return [s for s in SERVICES if not wanted or s in wanted]


async def members(nodes: Nodes, cluster: Cluster) -> list[str]:
    """The other members of the cluster: live rows of system.hdb_nodes, and routes."""
    membership = await nodes.read()
    names = set(membership.rows) | {r.hostname for r in cluster.routes()}
    names.discard(nodes.name)
    return sorted(names)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class MemberAdmin:
    """Calls to one member's admin service with the caller's credentials."""

    def __init__(self, node: AdminNode, member: str, metadata: Metadata) -> None:
        self.member = member
        self._channel = node.member_channel(member)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(self._channel)
        self._metadata = metadata

    async def close(self) -> None:
        await self._channel.close()

    def _unreachable(self, exc: grpc.aio.AioRpcError) -> NodeResult:
        return NodeResult(
            self.member,
            False,
            f"the admin service of {self.member} did not answer: {exc.details()}",
            exc.code().value[0],
        )

    async def execute(self, operation: dict[str, Any], limit_s: float) -> NodeResult:
        try:
            reply = await self._admin.Execute(
                apb.ExecuteRequest(operation=orjson.dumps(operation)),
                metadata=self._metadata,
                timeout=limit_s,
            )
        except grpc.aio.AioRpcError as exc:
            return self._unreachable(exc)
        if reply.code == 0:
            return NodeResult(self.member, True)
        result = orjson.loads(reply.result)
        error = result.get("error", "") if isinstance(result, dict) else ""
        return NodeResult(self.member, False, str(error), reply.code)

    async def instance(self) -> str:
        reply = await self._lifecycle.GetInstance(
            lpb.GetInstanceRequest(), metadata=self._metadata, timeout=5.0
        )
        return str(reply.instance)

    async def wait_new_instance(self, before: str, limit_s: float) -> bool:
        """Whether a new start of the member's admin service answered in time."""
        deadline = _loop_time() + limit_s
        backoff = Backoff(0.1, 1.0)
        while True:
            try:
                if await self.instance() != before:
                    return True
            except grpc.aio.AioRpcError:
                pass
            if _loop_time() >= deadline:
                return False
            await asyncio.sleep(backoff.next())


async def fan_out(
    node: AdminNode,
    names: Sequence[str],
    operation: dict[str, Any],
    metadata: Metadata,
    limit_s: float = MEMBER_CALL_TIMEOUT_S,
) -> list[NodeResult]:
    """``operation`` (as a plain, non-replicated one) on every member at once."""
    local = {**operation, "replicated": False}

    async def one(name: str) -> NodeResult:
        member = MemberAdmin(node, name, metadata)
        try:
            return await member.execute(local, limit_s)
        finally:
            await member.close()

    return list(await asyncio.gather(*(one(n) for n in names)))


async def restart_member(
    node: AdminNode,
    name: str,
    operation: dict[str, Any],
    services: Sequence[str],
    metadata: Metadata,
) -> NodeResult:
    """Restart one member (its own restart waits until it is caught up), then wait until
    its admin service is back when it restarted too."""
    member = MemberAdmin(node, name, metadata)
    try:
        try:
            before = await member.instance()
        except grpc.aio.AioRpcError as exc:
            return member._unreachable(exc)
        result = await member.execute({**operation, "replicated": False}, MEMBER_RESTART_TIMEOUT_S)
        if not result.ok or "admin" not in services:
            return result
        if not await member.wait_new_instance(before, SERVICE_RESTART_TIMEOUT_S):
            return NodeResult(
                name,
                False,
                f"the admin service of {name} did not come back within"
                f" {SERVICE_RESTART_TIMEOUT_S:.0f}s after its restart",
                _DEADLINE_EXCEEDED,
            )
        return result
    finally:
        await member.close()


async def rolling_restart(
    node: AdminNode,
    names: Sequence[str],
    operation: dict[str, Any],
    services: Sequence[str],
    metadata: Metadata,
) -> list[NodeResult]:
    """Restart the members one at a time; stop at the first that fails."""
    results: list[NodeResult] = []
    for i, name in enumerate(names):
        result = await restart_member(node, name, operation, services, metadata)
        results.append(result)
        if not result.ok:
            results += [
                NodeResult(
                    rest,
                    False,
                    f"not restarted: the rolling restart stopped at {name}",
                    _FAILED_PRECONDITION,
                )
                for rest in names[i + 1 :]
            ]
            break
    return results


# -- this node ---------------------------------------------------------------------------


async def _status(node: AdminNode) -> rpb.StatusResponse:
    return await node.call(
        node.replicator.Status, rpb.StatusRequest(), node.internal, "the replicator"
    )


async def restart_service(node: AdminNode, service: str) -> None:
    """Restart this node's ``storage`` or ``replicator`` and wait until it serves again."""
    stub = node.lifecycles[service]
    request = lpb.GetInstanceRequest()
    before = (await node.call(stub.GetInstance, request, node.internal, service)).instance
    await node.call(stub.Restart, lpb.RestartRequest(), node.internal, service)
    deadline = _loop_time() + SERVICE_RESTART_TIMEOUT_S
    backoff = Backoff(0.05, 1.0)
    while True:
        try:
            reply = await stub.GetInstance(request, metadata=node.internal, timeout=2.0)
            if reply.instance != before:
                return
        except grpc.aio.AioRpcError:
            pass
        if _loop_time() >= deadline:
            raise DeadlineExceeded(
                f"the {service} of {node.config.node_name} did not come back within"
                f" {SERVICE_RESTART_TIMEOUT_S:.0f}s after its restart"
            )
        await asyncio.sleep(backoff.next())


def _lagging(status: rpb.StatusResponse, peers: set[str]) -> list[str]:
    """Why the node is not caught up with ``peers`` (empty when it is)."""
    problems = []
    connections = {c.peer: c for c in status.connections}
    for peer in sorted(peers):
        connection = connections.get(peer)
        if connection is None or not connection.connected:
            problems.append(f"not connected to {peer}")
            continue
        for database in connection.databases:
            if database.backlog_transactions > CAUGHT_UP_BACKLOG:
                problems.append(
                    f"{database.backlog_transactions} transactions of {database.database}"
                    f" not yet confirmed by {peer}"
                )
            if database.HasField("copy"):
                problems.append(f"copying {database.database} from {peer}")
    return problems


async def wait_caught_up(node: AdminNode, peers: set[str]) -> None:
    """Wait until this node is connected to ``peers`` with a small backlog."""
    deadline = _loop_time() + CAUGHT_UP_TIMEOUT_S
    backoff = Backoff(0.1, 1.0)
    problems = ["no status yet"]
    while True:
        try:
            problems = _lagging(await _status(node), peers)
        except Exception as exc:  # the replicator may still be starting
            problems = [str(exc)]
        if not problems:
            return
        if _loop_time() >= deadline:
            raise DeadlineExceeded(
                f"{node.config.node_name} did not catch up within {CAUGHT_UP_TIMEOUT_S:.0f}s"
                f" after its restart: {'; '.join(problems)}"
            )
        await asyncio.sleep(backoff.next())


async def restart_here(node: AdminNode, services: Sequence[str]) -> None:
    """Restart this node's storage and replicator (those in ``services``), one after the
    other, then wait until the node is caught up. The admin service is the caller's to
    restart, after it answered (``node.lifecycle.request_restart``)."""
    before = await _status(node)
    peers = {c.peer for c in before.connections if c.connected}
    restarted = False
    for service in ("storage", "replicator"):
        if service in services:
            await restart_service(node, service)
            restarted = True
    if restarted:
        await wait_caught_up(node, peers)


@dataclass
class Restarted:
    """Outcome of a restart: this node's services, and each member's result."""

    services: list[str]
    replicated: list[NodeResult]


async def restart(
    node: AdminNode,
    nodes: Nodes,
    cluster: Cluster,
    services: Sequence[str],
    replicated: bool,
    metadata: Metadata,
) -> Restarted:
    """Restart this node's ``services`` (a rolling restart of the members first, with
    ``replicated``); the admin service restarts once the current call has answered."""
    results: list[NodeResult] = []
    if replicated:
        names = await members(nodes, cluster)
        operation = {"operation": "restart", "services": list(services)}
        results = await rolling_restart(node, names, operation, services, metadata)
        if not all(r.ok for r in results):
            return Restarted([], results)
    await restart_here(node, services)
    if "admin" in services:
        node.lifecycle.request_restart()
    return Restarted(list(services), results)
