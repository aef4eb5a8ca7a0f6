"""Backups through the admin service, real processes: get_backup / restore_backup, typed and
JSON, point-in-time recovery, hostile archives, permissions."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.admin.backup_archive import ArchiveReader, ArchiveWriter, Manifest
from services.common.hlc import version_ms
from tests.conftest import MakeNode
from tests.harness.admin import AdminClient
from tests.harness.client import StorageClient, expect_error
from tests.harness.cluster import Cluster, canonical_state
from tests.harness.node import PASSWORD, REPO, Node
from tests.harness.wait import wait_for

ALL = ("storage", "replicator", "admin")
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION = 3, 5, 6, 7, 9
CHUNK = 64 * 1024


# -- helpers -------------------------------------------------------------------------------


def get_backup(admin: AdminClient, database: str) -> tuple[bytes, apb.BackupInfo]:
    """The archive of GetBackup, and its info (sent last)."""
    data = bytearray()
    info = None
    for message in admin.stub.GetBackup(
        apb.GetBackupRequest(database=database), metadata=admin.metadata, timeout=60
    ):
        data += message.chunk
        if message.HasField("info"):
            info = message.info
    assert info is not None, "GetBackup sent no info"
    return bytes(data), info


def restore_requests(
    archive: bytes, until_ms: int | None = None, log: bytes | None = None, database: str = ""
) -> Iterator[apb.RestoreBackupRequest]:
    header = apb.RestoreBackupHeader(database=database)
    if until_ms is not None:
        header.until_ms = until_ms
    yield apb.RestoreBackupRequest(header=header)
    for start in range(0, len(archive), CHUNK):
        yield apb.RestoreBackupRequest(chunk=archive[start : start + CHUNK])
    for start in range(0, len(log or b""), CHUNK):
        assert log is not None
        yield apb.RestoreBackupRequest(log_chunk=log[start : start + CHUNK])


def restore(admin: AdminClient, archive: bytes, **kwargs: Any) -> apb.RestoreBackupResponse:
    response: apb.RestoreBackupResponse = admin.stub.RestoreBackup(
        restore_requests(archive, **kwargs), metadata=admin.metadata, timeout=60
    )
    return response


def digest(node: Node, database: str = "dev") -> str:
    return Cluster.digest(node, [database])


def positions(node: Node, database: str = "dev") -> dict[str, int]:
    reply = node.internal_client().call("GetPositions", pb.GetPositionsRequest(database=database))
    return {p.origin: p.version for p in reply.positions}


def rows(node: Node, database: str) -> list[tuple[str, bytes, bytes]]:
    """(table, id, canonical state) of every row of a database, every table included."""
    chunks = node.internal_client().stream("Backup", pb.BackupRequest(database=database))
    return [(r.table, r.id, canonical_state(r.state)) for c in chunks for r in c.rows]


def log_entries(node: Node, database: str = "dev") -> list[tuple[str, int, int]]:
    """(origin, version, writes) of every logged transaction, in log order."""
    chunks = node.client().stream(
        "ReadTransactionLog", pb.ReadTransactionLogRequest(database=database)
    )
    return [(t.origin, t.version, len(t.writes)) for c in chunks for t in c.transactions]


def wait_past(ms: int) -> None:
    """Wait until the wall clock is past Unix millisecond ``ms``."""
    wait_for(lambda: time.time() * 1000 > ms + 1, 5, f"the clock to pass {ms}")


def fill(client: StorageClient) -> None:
    """A database with an index, a local table, a patch, a tombstone."""
    client.create_table("dev", "dog", indexed=["breed"])
    client.create_table("dev", "note", replicate=False)
    client.insert(
        "dev",
        "dog",
        [
            {"id": 1, "name": "Penny", "breed": "pug"},
            {"id": 2, "name": "Kato", "breed": "lab"},
            {"id": "x", "name": "Rex", "breed": "pug"},
        ],
    )
    client.update("dev", "dog", [{"id": 2, "age": 4}])
    client.delete("dev", "dog", [1])
    client.insert("dev", "note", [{"id": 1, "text": "local only"}])


@pytest.fixture
def source(make_node: MakeNode) -> Node:
    return make_node(services=ALL)


# -- backup and restore ------------------------------------------------------------------------


def test_backup_then_restore_into_a_fresh_node_gives_the_same_database(
    source: Node, make_node: MakeNode
) -> None:
    fill(source.client())
    archive, info = get_backup(source.admin(), "dev")
    assert info.database == "dev" and info.node_name == source.name
    assert info.rows == 4  # 3 dogs (one a tombstone) and a note
    assert info.transactions == len(log_entries(source))
    assert info.size_bytes == len(archive)
    assert info.sha256 == hashlib.sha256(archive).hexdigest()
    assert {p.origin: p.version for p in info.positions} == positions(source)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and names[-1] == "summary.json"
    assert "rows/00000001.pb" in names and "log/00000001.pb" in names

    target = make_node(services=ALL)
    response = restore(target.admin(), archive)
    assert response.database == "dev" and response.mode == apb.RESTORE_MODE_SNAPSHOT
    assert response.rows == 4 and response.replayed_transactions == 0
    assert response.logged_transactions == info.transactions
    assert digest(target) == digest(source)
    assert positions(target) == positions(source)
    # The local table and the log come back too, with their origins and versions.
    client = target.client()
    assert client.get("dev", "note", [1]) == [{"id": 1, "text": "local only"}]
    described = client.call("DescribeTable", pb.DescribeTableRequest(database="dev", table="note"))
    assert described.table.replicate is False
    assert log_entries(target) == log_entries(source)
    assert client.by_value("dev", "dog", "breed", "pug") == [
        {"id": "x", "name": "Rex", "breed": "pug"}
    ]
    # The restored node keeps working: a new write gets a version above everything restored.
    written = client.insert("dev", "dog", [{"id": 3, "name": "Bo"}])
    assert written.version > max(positions(source).values())


def test_replication_resumes_from_the_restored_positions(make_node: MakeNode) -> None:
    source = make_node(services=ALL)
    client = source.client()
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": i} for i in range(20)])
    archive, _ = get_backup(source.admin(), "dev")
    client.update("dev", "dog", [{"id": 1, "after": "backup"}])
    client.delete("dev", "dog", [2])

    target = make_node(services=ALL)
    restore(target.admin(), archive)
    target.client().insert("dev", "dog", [{"id": 100, "on": "target"}])
    target.admin().ok({"operation": "cluster_set_routes", "routes": [source.name]})
    wait_for(
        lambda: digest(target) == digest(source), 30, "the restored node to converge with its peer"
    )
    assert target.client().get("dev", "dog", [1, 2, 100]) == [
        {"id": 1, "after": "backup"},
        {"id": 100, "on": "target"},
    ]
    # The restored log and what the peer sent after the backup: the source's history, once.
    mine = [t for t in log_entries(source) if t[0] == source.name]
    assert [t for t in log_entries(target) if t[0] == source.name] == mine


def test_get_and_restore_backup_through_execute(source: Node) -> None:
    fill(source.client())
    admin = source.admin()
    saved = admin.ok({"operation": "get_backup", "database": "dev", "name": "nightly"})
    path = Path(source.config["rootPath"]) / "backups" / "nightly.tar.gz"
    assert saved["name"] == "nightly" and saved["file"] == "backups/nightly.tar.gz"
    assert saved["size"] == path.stat().st_size and saved["rows"] == 4
    assert saved["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {p["origin"] for p in saved["positions"]} == {source.name}

    result, code = admin.execute({"operation": "get_backup", "database": "dev", "name": "nightly"})
    assert code == ALREADY_EXISTS and "nightly" in result["error"]
    result, code = admin.execute({"operation": "get_backup", "database": "dev", "name": "../up"})
    assert code == INVALID_ARGUMENT and "../up" in result["error"]
    result, code = admin.execute({"operation": "get_backup", "database": "nope"})
    assert code == NOT_FOUND and "nope" in result["error"]
    result, code = admin.execute({"operation": "get_backup", "database": "system"})
    assert code == INVALID_ARGUMENT and "system" in result["error"]
    default = admin.ok({"operation": "get_backup", "database": "dev"})
    assert default["name"].startswith("dev-") and default["file"].endswith(".tar.gz")

    # Into the same node, the database exists: refused; under another name: restored.
    result, code = admin.execute({"operation": "restore_backup", "backup": "nightly"})
    assert code == FAILED_PRECONDITION and "not empty" in result["error"]
    restored = admin.ok(
        {"operation": "restore_backup", "backup": "nightly.tar.gz", "database": "dev_copy"}
    )
    assert restored["database"] == "dev_copy" and restored["mode"] == "snapshot"
    assert restored["rows"] == 4
    assert rows(source, "dev_copy") == rows(source, "dev")
    assert source.client().get("dev_copy", "dog", [2]) == [
        {"id": 2, "name": "Kato", "breed": "lab", "age": 4}
    ]

    for name, code_wanted in (("missing", NOT_FOUND), ("../nightly", INVALID_ARGUMENT), ("", 3)):
        result, code = admin.execute({"operation": "restore_backup", "backup": name})
        assert code == code_wanted, result
    result, code = admin.execute(
        {"operation": "restore_backup", "backup": "nightly", "database": "x", "until": "soon"}
    )
    assert code == INVALID_ARGUMENT and "until" in result["error"]
    (path.parent / "link.tar.gz").symlink_to(path)
    result, code = admin.execute({"operation": "restore_backup", "backup": "link"})
    assert code == INVALID_ARGUMENT and "symbolic link" in result["error"]


# -- point-in-time recovery --------------------------------------------------------------------


def test_point_in_time_from_one_archive_replays_its_log(source: Node, make_node: MakeNode) -> None:
    client = source.client()
    client.create_table("dev", "dog", indexed=["breed"])
    client.insert("dev", "dog", [{"id": 1, "breed": "pug"}, {"id": 2, "breed": "lab"}])
    last = client.update("dev", "dog", [{"id": 1, "age": 3}]).version
    until = version_ms(last)
    at_until = digest(source)
    wait_past(until)
    client.update("dev", "dog", [{"id": 1, "age": 4}])
    client.delete("dev", "dog", [2])
    client.insert("dev", "dog", [{"id": 3, "breed": "pug"}])
    archive, info = get_backup(source.admin(), "dev")
    assert info.taken_at_ms > until

    target = make_node(services=ALL)
    admin = target.admin()
    response = restore(admin, archive, until_ms=until)
    assert response.mode == apb.RESTORE_MODE_LOG and response.rows == 0
    assert digest(target) == at_until
    assert target.client().get("dev", "dog", [1, 2, 3]) == [
        {"id": 1, "breed": "pug", "age": 3},
        {"id": 2, "breed": "lab"},
    ]
    # Exactly the transactions up to that time are in the restored node's log.
    assert log_entries(target) == [e for e in log_entries(source) if version_ms(e[1]) <= until]

    # Without a time, the same archive gives the database as it was backed up.
    restore(admin, archive, database="now")
    assert target.client().get("now", "dog", [1, 2, 3]) == [
        {"id": 1, "breed": "pug", "age": 4},
        {"id": 3, "breed": "pug"},
    ]
    # A time after the backup cannot be answered by the backup alone.
    error = expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: restore(admin, archive, until_ms=info.taken_at_ms + 60_000, database="later"),
        "log backup",
    )
    assert "taken at" in (error.details() or "")


def test_point_in_time_from_a_backup_and_a_later_log(source: Node, make_node: MakeNode) -> None:
    client = source.client()
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": i, "v": 1} for i in range(5)])
    base, base_info = get_backup(source.admin(), "dev")
    wait_past(base_info.taken_at_ms)
    # Retention purges everything before the base backup: only base + later log can work.
    before = Timestamp()
    before.FromMilliseconds(base_info.taken_at_ms)
    client.call("DeleteLogsBefore", pb.DeleteLogsBeforeRequest(before=before, database="dev"))
    client.update("dev", "dog", [{"id": 1, "v": 2}])
    last = client.update("dev", "dog", [{"id": 2, "v": 2}]).version
    until = version_ms(last)
    at_until = digest(source)
    rows_at_until = rows(source, "dev")
    wait_past(until)
    client.delete("dev", "dog", [1])
    client.insert("dev", "dog", [{"id": 9, "v": 3}])
    later, later_info = get_backup(source.admin(), "dev")
    assert any(h.version for h in later_info.horizons)

    target = make_node(services=ALL)
    admin = target.admin()
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: restore(admin, later, until_ms=until),
        "first transaction",
    )
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: restore(admin, base, until_ms=until),
        "taken at",
    )
    expect_error(  # the archives swapped: the log is older than the base
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: restore(admin, later, log=base),
        "older",
    )
    response = restore(admin, base, log=later, until_ms=until)
    assert response.mode == apb.RESTORE_MODE_SNAPSHOT_AND_LOG
    assert response.rows == 5 and response.replayed_transactions == 2
    assert digest(target) == at_until
    # Without a time, the whole later log is replayed on top of the base.
    rolled = restore(admin, base, log=later, database="rolled")
    assert rolled.replayed_transactions == 4
    assert target.client().get("rolled", "dog", [1, 2, 9]) == [{"id": 2, "v": 2}, {"id": 9, "v": 3}]
    assert rows(target, "rolled") == rows(source, "dev")

    # The same through Execute, with the archives in the node's backups folder.
    folder = Path(target.config["rootPath"]) / "backups"
    (folder / "monday.tar.gz").write_bytes(base)
    (folder / "tuesday.tar.gz").write_bytes(later)
    body = {"operation": "restore_backup", "backup": "monday", "log_backup": "tuesday"}
    noon = admin.ok({**body, "until": until, "database": "noon"})
    assert noon["mode"] == "snapshot_and_log" and noon["replayed_transactions"] == 2
    assert rows(target, "noon") == rows_at_until
    result, code = admin.execute({**body, "backup": "tuesday", "log_backup": "monday"})
    assert code == FAILED_PRECONDITION and "older" in result["error"]


# -- refusals --------------------------------------------------------------------------------


def test_restore_into_a_database_with_rows_is_refused_and_changes_nothing(
    source: Node, make_node: MakeNode
) -> None:
    fill(source.client())
    archive, _ = get_backup(source.admin(), "dev")
    target = make_node(services=ALL)
    target.client().create_table("dev", "dog", indexed=["breed"])
    target.client().insert("dev", "dog", [{"id": 1, "name": "Other"}])
    before = digest(target)
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda: restore(target.admin(), archive),
        "'dev' is not empty",
        "drop it first",
    )
    assert digest(target) == before
    # A database whose tables exist but hold no rows takes the restore; the log and
    # positions its earlier life left behind (drops keep them) are replaced too.
    target.client().call("DropDatabase", pb.DropDatabaseRequest(database="dev"))
    target.client().create_table("dev", "dog", indexed=["breed"])
    restore(target.admin(), archive)
    assert digest(target) == digest(source)
    assert log_entries(target) == log_entries(source)
    assert positions(target) == positions(source)


def test_an_interrupted_restore_is_replaced_by_the_next_one(
    source: Node, make_node: MakeNode, tmp_path: Path
) -> None:
    client = source.client()
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": i, "name": f"dog {i}"} for i in range(3000)])
    archive, _ = get_backup(source.admin(), "dev")
    path = tmp_path / "dev.tar.gz"
    path.write_bytes(archive)
    reader = ArchiveReader(path, "the backup")
    manifest = reader.manifest()
    first_rows = next(reader.parts()).message.rows

    # Storage receives the header and some rows, then the sender goes away.
    target = make_node(services=ALL)
    release = threading.Event()

    def requests() -> Iterator[pb.RestoreRequest]:
        header = pb.RestoreHeader(
            database="dev",
            positions=[
                types_pb2.Position(origin=o, version=v) for o, v in manifest.positions.items()
            ],
            tables=manifest.tables,
        )
        yield pb.RestoreRequest(header=header, rows=first_rows[:500])
        release.wait(30)

    internal = target.internal_client()
    future = internal.node_stub.Restore.future(requests(), metadata=internal.metadata, timeout=60)
    described = wait_for(
        lambda: (
            target.client()
            .call("DescribeTable", pb.DescribeTableRequest(database="dev", table="dog"))
            .table.record_count
            == 500
        ),
        20,
        "the first rows to be restored",
    )
    assert described
    future.cancel()
    release.set()
    assert positions(target) == {}  # positions are adopted only when a restore completes

    # A partial database is not "empty", but it is marked: the next restore starts over.
    response = restore(target.admin(), archive)
    assert response.rows == 3000
    assert digest(target) == digest(source)
    assert positions(target) == positions(source)


def test_backups_need_a_super_user(source: Node) -> None:
    fill(source.client())
    admin = source.admin()
    admin.ok(
        {
            "operation": "add_role",
            "role": "reader",
            "permission": {"dev": {"tables": {"dog": {"read": True}}}},
        }
    )
    admin.ok({"operation": "add_user", "username": "ann", "password": "pw", "role": "reader"})
    ann = source.admin("ann", "pw")
    expect_error(grpc.StatusCode.PERMISSION_DENIED, lambda: get_backup(ann, "dev"), "super user")
    expect_error(grpc.StatusCode.PERMISSION_DENIED, lambda: restore(ann, b"anything"), "super user")
    admin.ok({"operation": "get_backup", "database": "dev", "name": "b"})
    for operation in (
        {"operation": "get_backup", "database": "dev"},
        {"operation": "restore_backup", "backup": "b", "database": "y"},
    ):
        result, code = ann.execute(operation)
        assert code == PERMISSION_DENIED and "super user" in result["reason"]
    assert sorted(p.name for p in (Path(source.config["rootPath"]) / "backups").iterdir()) == [
        "b.tar.gz"
    ]


def test_typed_error_paths(source: Node) -> None:
    admin = source.admin()
    expect_error(grpc.StatusCode.NOT_FOUND, lambda: get_backup(admin, "nope"), "nope")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: get_backup(admin, "system"), "system")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: get_backup(admin, "../x"), "database")

    def call(requests: list[apb.RestoreBackupRequest]) -> Any:
        return admin.stub.RestoreBackup(iter(requests), metadata=admin.metadata, timeout=30)

    header = apb.RestoreBackupRequest(header=apb.RestoreBackupHeader())
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: call([]), "header")
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: call([apb.RestoreBackupRequest(chunk=b"x")]),
        "first message must be the header",
    )
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: call([header]), "no archive")
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: call([header, apb.RestoreBackupRequest(chunk=b"not gzip at all")]),
        "not a valid tar.gz",
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: call(
            [header, apb.RestoreBackupRequest(log_chunk=b"x"), apb.RestoreBackupRequest(chunk=b"")]
        ),
        "before the log backup",
    )
    truncated = gzip.compress(b"\0" * 10)
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: call([header, apb.RestoreBackupRequest(chunk=truncated)]),
        "tar header",
    )
    until = apb.RestoreBackupRequest(header=apb.RestoreBackupHeader(until_ms=1 << 60))
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: call([until, apb.RestoreBackupRequest(chunk=gzip.compress(b""))]),
        "until",
    )


# -- hostile archives ------------------------------------------------------------------------


def _manifest(database: str = "dev") -> bytes:
    return Manifest(database, "elsewhere", 1 << 40, {}, {}, ()).to_json()


def _crafted(*members: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> bytes:
    """A tar.gz with a valid manifest first, then ``members``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        manifest = _manifest()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for member in members:
            content = (data or {}).get(member.name)
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
    return out.getvalue()


def _file(name: str, content: bytes = b"evil") -> tuple[tarfile.TarInfo, dict[str, bytes]]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, {name: content}


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def _oversized() -> bytes:
    """A member announcing 100 MiB (its content is never read)."""
    header = tarfile.TarInfo("rows/00000001.pb")
    header.size = 100 * 1024 * 1024
    manifest = _manifest()
    first = tarfile.TarInfo("manifest.json")
    first.size = len(manifest)
    raw = (
        first.tobuf(tarfile.USTAR_FORMAT)
        + manifest
        + bytes(-len(manifest) % 512)
        + header.tobuf(tarfile.USTAR_FORMAT)
    )
    return gzip.compress(raw)


def _bad_state_archive() -> bytes:
    """A well-formed archive whose last transaction storage cannot apply."""
    manifest = Manifest(
        "dev",
        "elsewhere",
        1 << 40,
        {"elsewhere": 5 << 16},
        {},
        (types_pb2.TableSchema(name="dog", primary_key="id", replicate=True),),
    )
    writer = ArchiveWriter(mtime=0)
    state = orjson.dumps([5 << 16, "elsewhere", False, {"id": 1}, {}])
    rows = pb.BackupResponse(rows=[types_pb2.SnapshotRow(table="dog", id=b"1", state=state)])
    bad = types_pb2.Transaction(
        origin="elsewhere",
        version=6 << 16,
        database="dev",
        writes=[types_pb2.Write(table="dog", kind=types_pb2.WRITE_KIND_PUT, id=b"2", value=b"[]")],
    )
    log = pb.BackupResponse(transactions=[bad])
    return writer.manifest(manifest) + writer.part(rows) + writer.part(log) + writer.finish()


def _files_under(root: Path) -> set[str]:
    """Files of a node's root, outside its RocksDB folder (which changes on its own)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.relative_to(root).parts[0] != "database"
    }


def test_hostile_archives_are_refused_and_nothing_is_written(source: Node, tmp_path: Path) -> None:
    admin = source.admin()
    root = Path(source.config["rootPath"])
    outside = f"/tmp/shoal-evil-{uuid.uuid4().hex}"
    cases: list[tuple[str, bytes, str]] = [
        (
            "../evil.txt",
            _crafted(*[_file("../evil.txt")[0]], data=_file("../evil.txt")[1]),
            "climbs out",
        ),
        (
            "rows/../../evil.txt",
            _crafted(_file("rows/../../evil.txt")[0], data=_file("rows/../../evil.txt")[1]),
            "climbs out",
        ),
        (outside, _crafted(_file(outside)[0], data=_file(outside)[1]), "absolute path"),
        (
            "rows/00000001.pb",
            _crafted(_special("rows/00000001.pb", tarfile.SYMTYPE, "/etc/passwd")),
            "symbolic link",
        ),
        (
            "log/00000001.pb",
            _crafted(_special("log/00000001.pb", tarfile.LNKTYPE, "manifest.json")),
            "hard link",
        ),
        (
            "rows/00000001.pb",
            _crafted(_special("rows/00000001.pb", tarfile.CHRTYPE)),
            "character device",
        ),
        (
            "rows/00000001.pb",
            _crafted(_special("rows/00000001.pb", tarfile.BLKTYPE)),
            "block device",
        ),
        ("rows/00000001.pb", _crafted(_special("rows/00000001.pb", tarfile.FIFOTYPE)), "FIFO"),
        ("rows/", _crafted(_special("rows", tarfile.DIRTYPE)), "directory"),
        ("notes.txt", _crafted(_file("notes.txt")[0], data=_file("notes.txt")[1]), "not part of"),
        ("rows/00000001.pb", _oversized(), "at most"),
    ]
    before = _files_under(root)
    backups = root / "backups"
    backups.mkdir(exist_ok=True)
    for i, (member, archive, words) in enumerate(cases):
        error = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, functools.partial(restore, admin, archive), words
        )
        assert repr(member) in (error.details() or ""), error.details()
        # The same archive placed in the backups folder, restored by name through Execute.
        (backups / f"hostile{i}.tar.gz").write_bytes(archive)
        result, code = admin.execute({"operation": "restore_backup", "backup": f"hostile{i}"})
        assert code == INVALID_ARGUMENT and repr(member) in result["error"], result
    # Well-formed archives whose content storage refuses are refused whole, too.
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: restore(admin, _bad_state_archive()),
        "JSON object",
    )

    after = _files_under(root)
    assert after - before == {"backups"} | {f"backups/hostile{i}.tar.gz" for i in range(len(cases))}
    assert not Path(outside).exists()
    assert not list(tmp_path.rglob("*evil*"))
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        lambda: source.client().call(
            "DescribeDatabase", pb.DescribeDatabaseRequest(database="dev")
        ),
    )


# -- command line ------------------------------------------------------------------------------


def test_cli_backup_create_and_restore(source: Node, make_node: MakeNode, tmp_path: Path) -> None:
    fill(source.client())
    target = make_node(services=ALL)
    shoal = [sys.executable, "-m", "services.cli"]
    env = {"SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": PASSWORD, "PATH": "/usr/bin:/bin"}
    out = tmp_path / "dev.tar.gz"
    created = subprocess.run(
        [
            *shoal,
            "backup",
            "create",
            "--database",
            "dev",
            "--out",
            str(out),
            "--node",
            source.address_of("admin"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    summary = orjson.loads(created.stdout)
    assert summary["rows"] == 4 and summary["size"] == out.stat().st_size
    restored = subprocess.run(
        [*shoal, "backup", "restore", str(out), "--node", target.address_of("admin")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert restored.returncode == 0, restored.stderr
    assert orjson.loads(restored.stdout)["mode"] == "snapshot"
    assert digest(target) == digest(source)
    again = subprocess.run(
        [*shoal, "backup", "restore", str(out), "--node", target.address_of("admin")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == FAILED_PRECONDITION and "not empty" in again.stderr
