"""The plain replication port, probed as a process on the same machine would: closed
whenever the node replicates over TLS (`make run`'s configs included), and when opened,
no implicit trust of this machine's addresses, a name only from its own address, and
never a transaction claiming to come from the receiving node itself."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc
from shoal.storage.v1 import types_pb2

from services.common.config import load_config
from services.common.hlc import version_from_ms
from services.local import local_cluster_configs
from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

REPLICATING = ("storage", "replicator")
PLAIN_PORT = 9932


class Impostor:
    """A hand-made peer on a node's plain port: Hello as ``name``, then whatever the test
    sends; what the node answers is read in the background."""

    def __init__(self, node: Node, name: str) -> None:
        self._out: queue.Queue[rpb.ReplicateRequest | None] = queue.Queue()
        self.received: queue.Queue[rpb.PeerMessage | BaseException] = queue.Queue()
        self._channel = grpc.insecure_channel(f"{node.host}:{PLAIN_PORT}")
        stub = replicator_pb2_grpc.ReplicatorServiceStub(self._channel)
        hello = rpb.Hello(
            protocol_min=1,
            protocol_max=1,
            node_name=name,
            expected_name=node.name,
            all_databases=True,
            sends=True,
            receives=True,
        )
        self.send(rpb.PeerMessage(hello=hello))
        self._call = stub.Replicate(self._requests(), timeout=60)
        threading.Thread(target=self._read, daemon=True).start()

    def _requests(self) -> Iterator[rpb.ReplicateRequest]:
        while (item := self._out.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.received.put(reply.message)
        except BaseException as exc:
            self.received.put(exc)

    def send(self, message: rpb.PeerMessage) -> None:
        self._out.put(rpb.ReplicateRequest(message=message))

    def next(self, kind: str, timeout: float = 20.0) -> rpb.PeerMessage:
        """The next message of ``kind`` (heartbeats and others skipped)."""
        while True:
            item = self.received.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise AssertionError(f"the stream ended: {item}")
            if item.WhichOneof("body") in (kind, "goodbye"):
                return item

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self._channel.close()


def test_a_tls_node_has_no_plain_port(make_node: MakeNode, tmp_path: Path) -> None:
    node = make_node(services=REPLICATING, config={"replication": {"securePort": 9933}})
    with socket.socket() as probe:
        probe.settimeout(5)
        assert probe.connect_ex((node.host, PLAIN_PORT)) != 0, "the plain port answers"
    assert node.status().node_name == node.name  # the replicator does run
    # `make run` (shoal local up) writes TLS configs: no plain port there either.
    for path in local_cluster_configs(tmp_path / "data", 3):
        replication = load_config(path).replication
        assert (replication.port, replication.secure_port) == (None, 9933)
    for path in local_cluster_configs(tmp_path / "insecure", 2, tls=False):
        replication = load_config(path).replication
        assert replication.port == PLAIN_PORT
        assert [str(n) for n in replication.allowed_sources] == ["127.0.0.1/32"]


def test_a_member_s_name_from_this_machine_s_address_is_refused(make_node: MakeNode) -> None:
    """A node replicating over TLS with its plain port opened explicitly: a local process
    (dialing from 127.0.0.1) that claims the name of a member that is down is refused, and
    nothing it sends is applied."""
    member = next_address()  # a route whose node is down
    node = make_node(
        services=REPLICATING,
        config={
            "replication": {
                "securePort": 9933,
                "port": PLAIN_PORT,
                "routes": [member],
                **FAST_REPLICATION,
            }
        },
    )
    node.client().create_table("data", "dog")
    impostor = Impostor(node, member)
    try:
        answer = impostor.next("hello")
    finally:
        impostor.close()
    assert answer.WhichOneof("body") == "goodbye", "the impostor was admitted"
    assert answer.goodbye.code == rpb.GOODBYE_CODE_UNAUTHORIZED
    assert f"127.0.0.1 saying it is {member}" in answer.goodbye.reason
    assert f"127.0.0.1 is not an address of {member}" in answer.goodbye.reason
    assert node.client().all_records("data", "dog") == []


def test_a_transaction_claiming_this_node_as_origin_is_refused(make_node: MakeNode) -> None:
    """An admitted peer (insecure mode, 127.0.0.1 allowed) sends a batch holding a forged
    transaction whose origin is the receiving node, beside one of its own: the forged one
    is refused and logged, the other is applied."""
    peer = next_address()
    node = make_node(
        services=REPLICATING, config={"replication": {"routes": [peer], **FAST_REPLICATION}}
    )
    node.client().create_table("data", "dog")
    impostor = Impostor(node, peer)
    try:
        assert impostor.next("hello").WhichOneof("body") == "hello"
        subscribe = impostor.next("subscribe").subscribe
        now = version_from_ms(int(time.time() * 1000))

        def transaction(origin: str, key: int) -> types_pb2.Transaction:
            return types_pb2.Transaction(
                origin=origin,
                version=now + key,
                database="data",
                writes=[
                    types_pb2.Write(
                        table="dog",
                        kind=types_pb2.WRITE_KIND_PUT,
                        id=orjson.dumps(key),
                        value=orjson.dumps({"id": key, "by": origin}),
                    )
                ],
            )

        batch = rpb.Batch(
            generation=subscribe.generation,
            sequence=1,
            transactions=[transaction(node.name, 1), transaction(peer, 2)],
        )
        impostor.send(rpb.PeerMessage(batch=batch))
        wait_for(lambda: node.client().get("data", "dog", [2]), 20, "the peer's own write")
    finally:
        impostor.close()
    assert node.client().all_records("data", "dog") == [{"id": 2, "by": peer}]
    log = node.log_path("replicator").read_text()
    assert f"claim to come from this node ({node.name})" in log
