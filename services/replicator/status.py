"""What the replicator knows about each peer, kept across reconnections, and its
translation to the Status RPC (which the admin service shows as cluster_status)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from shoal.replicator.v1 import replicator_pb2 as rpb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(ms)
    return ts


@dataclass
class DatabaseState:
    """Replication state of one database with one peer."""

    last_received_version: int = 0
    last_received_at_ms: int = 0
    last_commit_confirmed: int = 0
    backlog_seconds: float = 0.0
    backlog_transactions: int = 0
    copy: spb.CopyProgress | None = None


@dataclass
class PeerState:
    """One peer as this node sees it."""

    peer: str
    address: str = ""
    connected: bool = False
    dialed: bool = False
    sends: bool = True
    receives: bool = True
    latency_ms: float = 0.0
    back_pressure_percent: float = 0.0
    last_error: str = ""
    connected_since_ms: int = 0
    last_connected_ms: int = 0  # when a connection with the peer was last up
    shard: int | None = None  # the peer's, from its Hello
    withheld: list[str] = field(default_factory=list)  # sharded databases not flowing
    # (database, table) flowing on the connection when only some do (empty: every table).
    received_tables: list[tuple[str, str]] = field(default_factory=list)
    sent_tables: list[tuple[str, str]] = field(default_factory=list)
    databases: dict[str, DatabaseState] = field(default_factory=dict)
    # Subscription traffic with this peer since the process started (for metrics):
    # transactions and the serialized size of the batches carrying them.
    received_transactions: int = 0
    received_bytes: int = 0
    sent_transactions: int = 0
    sent_bytes: int = 0

    def database(self, name: str) -> DatabaseState:
        state = self.databases.get(name)
        if state is None:
            state = self.databases[name] = DatabaseState()
        return state

    def to_proto(self, retention_s: float) -> rpb.Connection:
        """The Status RPC's view; ``retention_s`` is logging.auditRetention."""
        connection = rpb.Connection(
            peer=self.peer,
            address=self.address,
            connected=self.connected,
            dialed=self.dialed,
            sends=self.sends,
            receives=self.receives,
            latency_ms=self.latency_ms,
            back_pressure_percent=self.back_pressure_percent,
            last_connection_error=self.last_error,
            shard=self.shard,
            withheld_databases=self.withheld,
            received_tables=[
                types_pb2.TableRef(database=d, table=t) for d, t in self.received_tables
            ],
            sent_tables=[types_pb2.TableRef(database=d, table=t) for d, t in self.sent_tables],
        )
        if self.connected and self.connected_since_ms:
            connection.connected_since.CopyFrom(_timestamp(self.connected_since_ms))
        if self.connected:
            connection.log_margin_seconds = retention_s
        elif self.last_connected_ms:
            connection.log_margin_seconds = retention_s - (now_ms() - self.last_connected_ms) / 1000
        for name, db in sorted(self.databases.items()):
            status = rpb.DatabaseStatus(
                database=name,
                last_received_version=db.last_received_version,
                last_commit_confirmed=db.last_commit_confirmed,
                backlog_transactions=db.backlog_transactions,
                backlog_seconds=db.backlog_seconds,
            )
            if db.last_received_at_ms:
                status.last_received_local_time.CopyFrom(_timestamp(db.last_received_at_ms))
            if db.copy is not None:
                status.copy.CopyFrom(db.copy)
            connection.databases.append(status)
        return connection
