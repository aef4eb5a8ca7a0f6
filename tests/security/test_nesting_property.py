"""Whatever storage accepts can be read back by every read path, exactly (property test,
real processes).

Two nodes replicate, with ``storage.maxNestingDepth`` at its default (64) or at its
ceiling (200), where the read paths that wrap records deepest (Execute's audit log) have
the least room.
Hypothesis writes documents of any shape, nested up to a few levels past the limit and
holding integers up to a few bits past 64, one at a time: each is accepted exactly when it
is within both limits (otherwise it is refused with INVALID_ARGUMENT and nothing
changes), and every accepted one reads back, value for value and type for type, by id, by
value, by conditions, in full scans, in the audit and transaction logs (typed and over
Execute), after a backup is restored under another name, and on the peer it replicated
to."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from functools import partial
from typing import Any

import grpc
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeCluster
from tests.harness.admin import AdminClient
from tests.harness.client import StorageClient, cond, expect_error, group
from tests.harness.hostile import digest
from tests.harness.node import Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

DEFAULT_LIMIT = 64  # storage.maxNestingDepth unless set
MAX_LIMIT = 200  # the highest it can be set (docs/configuration.md)
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # integers kept exact
ALL = ("storage", "replicator", "admin")

# -- documents ---------------------------------------------------------------------------

EDGES = [2**53 + 1, 2**63 - 1, 2**63, INT_MAX, INT_MAX + 1, INT_MIN, INT_MIN - 1, 10**30]
integers = st.integers(-(2**70), 2**70) | st.sampled_from(EDGES)
scalars = (
    st.none()
    | st.booleans()
    | integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
NAMES = st.text(alphabet="abcdefgh_", min_size=1, max_size=6).filter(lambda n: n != "id")


@st.composite
def documents(draw: st.DrawFn, limit: int) -> dict[str, Any]:
    """A record body (no id yet): some attributes, one of them nested around ``limit``."""
    body: dict[str, Any] = draw(st.dictionaries(NAMES, values, max_size=3))
    depth = draw(st.integers(0, 4) | st.integers(limit - 4, limit + 2))
    deep: Any = draw(scalars)
    for level in range(depth):
        deep = [deep] if level % 2 else {"k": deep}
    body["deep"] = deep
    return body


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def integers_fit(value: Any) -> bool:
    if isinstance(value, dict):
        return all(map(integers_fit, value.values()))
    if isinstance(value, list):
        return all(map(integers_fit, value))
    return not isinstance(value, int) or isinstance(value, bool) or INT_MIN <= value <= INT_MAX


def same(a: Any, b: Any) -> bool:
    """Equal value for value and type for type (1 is not 1.0, nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def assert_same(got: Any, expected: Any, where: str) -> None:
    assert same(got, expected), f"{where}: read {got!r}, wrote {expected!r}"


# -- read paths ----------------------------------------------------------------------------


def by_id(docs: list[Any]) -> dict[str, Any]:
    return {d["id"]: d for d in docs}


def typed_reads(client: StorageClient, database: str, ids: list[str]) -> Iterator[tuple[str, Any]]:
    """(read path, records it returned) for every typed read of the table."""
    yield "SearchById", client.get(database, "t", ids)
    yield "SearchByValue *", client.all_records(database, "t")
    yield "SearchByValue prefix", client.by_value(database, "t", "id", "k*")
    yield (
        "SearchByConditions",
        client.by_conditions(database, "t", [cond("id", "starts_with", "k")]),
    )
    equals = [cond("id", "equals", pk) for pk in ids[:8]]
    if equals:
        yield "SearchByConditions or", client.by_conditions(database, "t", [group("or", *equals)])
    yield "full scan", client.by_conditions(database, "t", [])


def check_reads(client: StorageClient, database: str, expected: dict[str, Any]) -> None:
    ids = sorted(expected)
    for path, records in typed_reads(client, database, ids):
        found = by_id(records)
        wanted = ids if path != "SearchByConditions or" else ids[:8]
        assert sorted(found) == wanted, f"{path} returned {sorted(found)}"
        for pk in wanted:
            assert_same(found[pk], expected[pk], f"{path} {pk}")


def check_logs(client: StorageClient, database: str, expected: dict[str, Any]) -> None:
    """The typed logs: the last write of each record carries it whole (an upsert's PATCH
    names every attribute again)."""
    chunks = client.stream("ReadAuditLog", pb.ReadAuditLogRequest(database=database, table="t"))
    audit = [t for c in chunks for t in c.entries]
    txns = client.transactions(database, "t")
    for name, entries in (("audit log", audit), ("transaction log", txns)):
        last: dict[str, Any] = {}
        for txn in entries:
            for write in txn.writes:
                last[orjson.loads(write.id)] = orjson.loads(write.value)
        assert sorted(last) == sorted(expected), name
        for pk, value in last.items():
            assert_same(value, expected[pk], f"{name} {pk}")


def check_execute(admin: AdminClient, database: str, expected: dict[str, Any]) -> None:
    """Execute answers wrap records in a few more levels: they must still serialize."""
    ids = sorted(expected)
    records = admin.ok(
        {"operation": "search_by_id", "database": database, "table": "t", "ids": ids}
    )
    found = by_id(records)
    for pk in ids:
        assert_same(found[pk], expected[pk], f"Execute search_by_id {pk}")
    audit = admin.ok(
        {
            "operation": "read_audit_log",
            "database": database,
            "table": "t",
            "search_type": "hash_value",
            "search_values": ids,
        }
    )
    for pk in ids:
        entry = audit[pk][-1]
        assert_same(entry["records"][0], expected[pk], f"Execute read_audit_log {pk}")
        assert_same(entry["original_records"][0], expected[pk], f"Execute prior {pk}")
    log = admin.ok({"operation": "read_transaction_log", "database": database, "table": "t"})
    assert len(log) >= len(ids)


def backup_and_restore(admin: AdminClient, database: str) -> str:
    """Back the database up and restore it under another name; the new name."""
    archive = bytearray()
    for message in admin.stub.GetBackup(
        apb.GetBackupRequest(database=database), metadata=admin.metadata, timeout=60
    ):
        archive += message.chunk
    restored = database + "r"

    def requests() -> Iterator[apb.RestoreBackupRequest]:
        yield apb.RestoreBackupRequest(header=apb.RestoreBackupHeader(database=restored))
        for start in range(0, len(archive), 256 * 1024):
            yield apb.RestoreBackupRequest(chunk=bytes(archive[start : start + 256 * 1024]))

    admin.stub.RestoreBackup(requests(), metadata=admin.metadata, timeout=60)
    return restored


# -- the property ----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [DEFAULT_LIMIT, MAX_LIMIT])
def test_whatever_is_accepted_reads_back_exactly_on_every_path(
    make_cluster: MakeCluster, limit: int
) -> None:
    config = {"storage": {"maxNestingDepth": limit}} if limit != DEFAULT_LIMIT else {}
    cluster = make_cluster(size=2, services=ALL, config=config)
    cluster.wait_connected()
    writer, peer = cluster[0], cluster[1]
    client, peer_client, admin = writer.client(), peer.client(), writer.admin()
    counter = itertools.count()

    @settings(
        max_examples=10,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(documents(limit), min_size=1, max_size=6))
    def check(bodies: list[dict[str, Any]]) -> None:
        database = f"p{next(counter)}"
        client.create_table(database, "t")
        expected: dict[str, Any] = {}
        for i, body in enumerate(bodies):
            doc = {"id": f"k{i}", **body}
            text = json.dumps(doc).encode()  # exact integers of any size, any depth
            fits = depth(doc) <= limit and integers_fit(doc)
            request = pb.InsertRequest(database=database, table="t", records=[text])
            if fits:
                client.call("Insert", request)
                # An upsert merges it again (a PATCH, re-encoding the stored state).
                client.call(
                    "Upsert", pb.UpsertRequest(database=database, table="t", records=[text])
                )
                expected[doc["id"]] = json.loads(text)
                continue
            before = digest(writer, database)
            words = [f"more than {limit} levels"] if depth(doc) > limit else ["64-bit range"]
            expect_error(
                grpc.StatusCode.INVALID_ARGUMENT, partial(client.call, "Insert", request), *words
            )
            assert digest(writer, database) == before
        check_reads(client, database, expected)
        check_logs(client, database, expected)
        check_execute(admin, database, expected)
        restored = backup_and_restore(admin, database)
        check_reads(client, restored, expected)
        check_replicated(peer, peer_client, database, expected)

    check()


def check_replicated(
    peer: Node, client: StorageClient, database: str, expected: dict[str, Any]
) -> None:
    ids = sorted(expected)

    def arrived() -> bool:
        try:
            return len(client.get(database, "t", ids)) == len(ids)
        except grpc.RpcError:
            return False

    wait_for(arrived, 30, f"{database} to replicate to {peer.name}")
    check_reads(client, database, expected)
    check_execute(peer.admin(), database, expected)
