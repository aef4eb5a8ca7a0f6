"""Driving a copy at the storage API, as a replicator does: one source's Snapshot
messages fed to a receiver's MergeSnapshot, request by request, with the part token,
`begins_part` and the key each request follows."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from tests.harness.client import StorageClient


def merge_request(
    source: str,
    database: str,
    part: int,
    rows: Sequence[types_pb2.SnapshotRow] = (),
    *,
    header: Any = None,
    after: types_pb2.SnapshotKey | None = None,
    complete: bool = False,
    partial: bool = False,
) -> pb.MergeSnapshotRequest:
    """One MergeSnapshot request; ``header`` (a Snapshot's first message) begins a part."""
    request = pb.MergeSnapshotRequest(
        source=source,
        database=database,
        rows=rows,
        complete=complete,
        part=part,
        begins_part=header is not None,
        partial=partial or (header is not None and header.partial),
    )
    if header is not None:
        request.positions.extend(header.positions)
        request.tables.extend(header.tables)
        request.estimated_rows = header.estimated_rows
    if after is not None and after.table:
        request.after.CopyFrom(after)
    return request


def until_caught_up(internal: StorageClient, request: pb.SubscribeRequest) -> list[Any]:
    """Subscribe messages up to and including the first one marked caught_up."""
    stream = internal.node_stub.Subscribe(request, metadata=internal.metadata, timeout=30)
    messages = []
    try:
        for message in stream:
            messages.append(message)
            if message.caught_up:
                break
    finally:
        stream.cancel()
    return messages


def logged(internal: StorageClient, database: str) -> list[types_pb2.Transaction]:
    """Every transaction of ``database`` in the node's log, in commit order."""
    request = pb.SubscribeRequest(databases=[database], heartbeat_interval_ms=100)
    return [t for m in until_caught_up(internal, request) for t in m.transactions]


Merge = Callable[[pb.MergeSnapshotRequest], Any]


def into(receiver: StorageClient) -> Merge:
    """MergeSnapshot on a storage process."""
    return lambda request: receiver.call("MergeSnapshot", request).progress


class CopyFeed:
    """One part of a copy: a Snapshot's messages, merged one by one by ``merge`` (a
    storage process's MergeSnapshot, see ``into``, or an engine's, in unit tests).

    ``after`` resumes a copy that stopped there (the Snapshot must have been asked to
    start after the same key). The last step completes the copy.
    """

    def __init__(
        self,
        merge: Merge,
        source: str,
        database: str,
        messages: Sequence[Any],
        after: types_pb2.SnapshotKey | None = None,
    ) -> None:
        self.merge = merge
        self.source = source
        self.database = database
        self.messages = list(messages)
        self.after = after
        self.part = random.getrandbits(63) or 1
        self.sent = 0

    @property
    def done(self) -> bool:
        return self.sent > len(self.messages)

    def step(self) -> Any:
        """Merge the next message (the completing request after the last one)."""
        assert not self.done, "this part is finished"
        if self.sent == len(self.messages):
            request = merge_request(
                self.source, self.database, self.part, after=self.after, complete=True
            )
        else:
            message = self.messages[self.sent]
            request = merge_request(
                self.source,
                self.database,
                self.part,
                message.rows,
                header=message if self.sent == 0 else None,
                after=self.after,
            )
        progress = self.merge(request)
        self.sent += 1
        if request.rows:
            last = request.rows[-1]
            self.after = types_pb2.SnapshotKey(table=last.table, id=last.id)
        return progress

    def run(self) -> Any:
        """Every remaining step."""
        progress = self.step()
        while not self.done:
            progress = self.step()
        return progress
