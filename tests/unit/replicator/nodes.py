"""Replicators without processes: nodes whose storage is a FakeStorage, connected by
in-memory PeerStreams, and peers played by the test itself.

A ``Node`` is a real ``Replicator`` that is never started (no dial loops, no membership
watch): a test connects it explicitly, with ``connect`` (two nodes, through the real
handshake, registry and sessions on both sides) or with ``Remote.dial`` /
``Remote.listen`` (the test speaks the protocol itself on the other end, message by
message, and asserts on what the node sends).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from shoal.replicator.v1 import replicator_pb2 as rpb

from services.common.config import ShoalConfig, parse_config
from services.replicator.handshake import PROTOCOL_MAX, PROTOCOL_MIN
from services.replicator.local import LocalStorage
from services.replicator.peerstream import PeerStream
from services.replicator.replicator import Replicator
from services.replicator.session import Session
from tests.unit.replicator.fakes import FakeStorage

WAIT_S = 3.0  # the most any condition is waited for: a bound, never a pace
QUIET_TURNS = 50  # event-loop turns after which nothing more is on its way
# Fast settings: heartbeats are frequent, but no peer times out unless a test says so.
FAST: dict[str, Any] = {"heartbeat_interval_s": 0.05, "peer_timeout_s": 30.0}


def make_config(name: str, routes: Iterable[str | dict[str, Any]], **settings: Any) -> ShoalConfig:
    """A node's configuration: routes as in YAML, replication settings by field name."""
    yaml: dict[str, Any] = {"hostname": name, "routes": list(routes)}
    yaml.update(settings.pop("yaml", {}))
    config = parse_config({"replication": yaml}, env={})
    replication = dataclasses.replace(config.replication, **{**FAST, **settings})
    return dataclasses.replace(config, replication=replication)


async def until(condition: Callable[[], bool], what: str = "the condition") -> None:
    """Wait until ``condition()`` holds (checked at every event-loop turn), at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every ready task run until nothing more happens without time passing."""
    for _ in range(QUIET_TURNS):
        await asyncio.sleep(0)


@dataclass
class Node:
    """A replicator on a fake storage, not started."""

    name: str
    storage: FakeStorage
    replicator: Replicator
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @classmethod
    def make(cls, name: str, routes: Iterable[str | dict[str, Any]] = (), **settings: Any) -> Node:
        storage = FakeStorage(name)
        config = make_config(name, routes, **settings)
        # The fake has every call the replicator makes of its storage on these paths.
        replicator = Replicator(config, cast(LocalStorage, storage), None)
        return cls(name, storage, replicator)

    @property
    def address(self) -> str:
        return f"{self.name}:9925"

    def session(self, peer: str) -> Session:
        return self.replicator.sessions[peer]

    def connected(self, peer: str) -> bool:
        session = self.replicator.sessions.get(peer)
        return session is not None and not session.finished.is_set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self.tasks.append(task)
        return task

    async def stop(self) -> None:
        # A dial loop would open a real network connection: this tier never has one.
        dialed = sorted(self.replicator._dialers)
        await self.replicator.close()
        assert not dialed, f"{self.name} started dialing {dialed} over the network"
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@dataclass
class Link:
    """A connection between two nodes: the dialer's end and the listener's."""

    dialer: PeerStream
    listener: PeerStream

    def cut(self) -> None:
        self.dialer.cut()


async def connect(dialer: Node, listener: Node) -> Link:
    """``dialer`` dials ``listener`` (a route of it); returns once both sessions run."""
    to_listener, to_dialer = PeerStream.pair(listener.address, dialer.address)
    route = dialer.replicator.routes[listener.name]
    # The listener trusts the name as a TLS port would (a certificate naming the dialer).
    listener.spawn(listener.replicator.accept(to_dialer, {dialer.name}), f"accept:{dialer.name}")
    dialer.spawn(dialer.replicator.run_dialed(to_listener, route), f"dial:{listener.name}")
    await until(
        lambda: dialer.connected(listener.name) and listener.connected(dialer.name),
        f"{dialer.name} and {listener.name} to connect",
    )
    return Link(to_listener, to_dialer)


def hello(name: str, **fields: Any) -> rpb.Hello:
    """A Hello of a node that sends and receives every database unless told otherwise."""
    base: dict[str, Any] = {
        "protocol_min": PROTOCOL_MIN,
        "protocol_max": PROTOCOL_MAX,
        "node_name": name,
        "all_databases": True,
        "sends": True,
        "receives": True,
    }
    base.update(fields)
    return rpb.Hello(**base)


HEARTBEATS = ("heartbeat", "heartbeat_reply")


@dataclass
class Remote:
    """A peer of a node played by the test: it reads what the node sends and answers
    (or does not) message by message."""

    name: str
    end: PeerStream  # the test's end; its ``sent`` is what the test said
    received: list[rpb.PeerMessage] = field(default_factory=list)
    their_hello: rpb.Hello = field(default_factory=rpb.Hello)

    @classmethod
    async def dial(cls, node: Node, name: str, **hello_fields: Any) -> Remote:
        """Dial ``node`` as ``name`` (a route of the node) and complete the handshake."""
        mine, theirs = PeerStream.pair(node.address, f"{name}:40000")
        node.spawn(node.replicator.accept(theirs, {name}), f"accept:{name}")
        remote = cls(name, mine)
        await mine.send(rpb.PeerMessage(hello=hello(name, expected_name=node.name, **hello_fields)))
        reply = await remote.next()
        assert reply.WhichOneof("body") == "hello", reply
        remote.their_hello = reply.hello
        await until(lambda: node.connected(name), f"{node.name} to run a session with {name}")
        return remote

    @classmethod
    async def listen(cls, node: Node, name: str, **hello_fields: Any) -> Remote:
        """Let ``node`` dial ``name`` (a route of the node) and answer its Hello."""
        mine, theirs = PeerStream.pair(f"{name}:9925", node.address)
        node.spawn(node.replicator.run_dialed(theirs, node.replicator.routes[name]), f"dial:{name}")
        remote = cls(name, mine)
        first = await remote.next()
        assert first.WhichOneof("body") == "hello", first
        remote.their_hello = first.hello
        await mine.send(rpb.PeerMessage(hello=hello(name, **hello_fields)))
        return remote

    async def next(self) -> rpb.PeerMessage:
        """The next message the node sends (heartbeats included)."""
        message = await asyncio.wait_for(self.end.recv(), WAIT_S)
        assert message is not None, "the node closed the connection"
        self.received.append(message)
        return message

    async def expect(self, kind: str) -> rpb.PeerMessage:
        """The next message that is not a heartbeat; it must be a ``kind``."""
        while True:
            message = await self.next()
            if message.WhichOneof("body") in HEARTBEATS:
                continue
            assert message.WhichOneof("body") == kind, f"expected {kind}, got {message}"
            return message

    async def quiet(self) -> None:
        """Assert the node has nothing more to say now (heartbeats aside)."""
        await settle()
        while self.end.pending():
            message = await self.next()
            assert message.WhichOneof("body") in HEARTBEATS, f"unexpected {message}"

    async def send(self, **body: Any) -> None:
        await self.end.send(rpb.PeerMessage(**body))

    async def read_silently(self) -> None:
        """Read everything the node sends and answer nothing, until the connection ends."""
        while (message := await self.end.recv()) is not None:
            self.received.append(message)

    async def answer_heartbeats(self) -> None:
        """Answer every heartbeat and nothing else, until the connection ends."""
        while (message := await self.end.recv()) is not None:
            self.received.append(message)
            if message.WhichOneof("body") == "heartbeat":
                reply = rpb.HeartbeatReply(id=message.heartbeat.id)
                await self.send(heartbeat_reply=reply)


def batches(messages: Iterable[rpb.PeerMessage]) -> list[rpb.Batch]:
    """The data batches among ``messages`` (not the caught-up markers)."""
    return [m.batch for m in messages if m.WhichOneof("body") == "batch" and m.batch.sequence]


def origins(messages: Iterable[rpb.PeerMessage]) -> list[tuple[str, str, int]]:
    """(database, origin, version) of every transaction in the batches of ``messages``."""
    return [(t.database, t.origin, t.version) for b in batches(messages) for t in b.transactions]
