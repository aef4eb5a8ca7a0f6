"""A hand-made replication peer for tests: ``python -m tests.harness.peer_client``.

It dials a replicator's plain port, says Hello as whatever node it is told to be, and
(with ``--write``) sends at once, without waiting for the answer, a Batch holding one
transaction that inserts a record, as a peer that got in would. It prints the first
message it receives as one JSON line: ``{"body": "goodbye", "code": 6, "reason": ...}``,
``{"body": "hello", ...}``, or ``{"error": ...}`` when the call failed. Run it with
``ip netns exec`` to dial from another source address.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

import grpc
import orjson
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.replicator.v1 import replicator_pb2_grpc
from shoal.storage.v1 import types_pb2

from services.common.hlc import version_from_ms


def _messages(args: argparse.Namespace) -> Iterator[rpb.ReplicateRequest]:
    hello = rpb.Hello(
        protocol_min=1,
        protocol_max=1,
        node_name=args.name,
        expected_name=args.expected,
        all_databases=True,
        sends=True,
        receives=True,
        join=rpb.Join(url=args.join) if args.join is not None else None,
    )
    yield rpb.ReplicateRequest(message=rpb.PeerMessage(hello=hello))
    if args.write:
        database, table, key = args.write.split("/")
        transaction = types_pb2.Transaction(
            origin=args.name,
            version=version_from_ms(int(time.time() * 1000)),
            database=database,
            writes=[
                types_pb2.Write(
                    table=table,
                    kind=types_pb2.WRITE_KIND_PUT,
                    id=orjson.dumps(key),
                    value=orjson.dumps({"id": key, "from": "an intruder"}),
                )
            ],
            tables=[types_pb2.TableSchema(name=table, primary_key="id")],
        )
        batch = rpb.Batch(generation=1, sequence=1, transactions=[transaction])
        yield rpb.ReplicateRequest(message=rpb.PeerMessage(batch=batch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="host:port of a plain replication port")
    parser.add_argument("--name", required=True, help="the node name to claim")
    parser.add_argument("--expected", default="", help="the listener's name")
    parser.add_argument("--join", default=None, help="join with this url ('' for none)")
    parser.add_argument("--write", default="", help="database/table/id of a record to send")
    args = parser.parse_args(argv)
    with grpc.insecure_channel(args.target) as channel:
        stub = replicator_pb2_grpc.ReplicatorServiceStub(channel)
        try:
            replies = stub.Replicate(_messages(args), timeout=20)
            message = next(replies).message
            replies.cancel()
        except grpc.RpcError as exc:
            print(orjson.dumps({"error": str(exc)}).decode())
            return 1
    body = message.WhichOneof("body")
    if body == "goodbye":
        out = {"body": body, "code": message.goodbye.code, "reason": message.goodbye.reason}
    else:
        out = {"body": body, "node_name": message.hello.node_name}
    print(orjson.dumps(out).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
