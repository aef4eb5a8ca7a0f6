"""The backup archive format: what ArchiveWriter writes, ArchiveReader reads back; a
layout that is not exactly that is refused, naming the member."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import types_pb2

from services.admin.backup_archive import ArchiveReader, ArchiveWriter, Manifest
from services.common.archive import end_of_archive, member_bytes
from services.common.errors import InvalidArgument

MANIFEST = Manifest(
    "dev",
    "node-a",
    123 << 16,
    {"node-a": 120 << 16},
    {"node-a": 7 << 16},
    (
        types_pb2.TableSchema(
            name="dog", primary_key="id", indexed_attributes=["breed"], attributes=["id"]
        ),
    ),
)
ROWS = pb.BackupResponse(
    rows=[types_pb2.SnapshotRow(table="dog", id=b"1", state=b'[1,"a",false,{"id":1},{}]')]
)
LOG = pb.BackupResponse(transactions=[types_pb2.Transaction(origin="a", version=9, database="dev")])


def write(path: Path, *parts: pb.BackupResponse) -> Path:
    writer = ArchiveWriter(mtime=0)
    data = writer.manifest(MANIFEST) + b"".join(writer.part(p) for p in parts) + writer.finish()
    path.write_bytes(data)
    assert writer.size == len(data)
    return path


def raw(path: Path, *members: tuple[str, bytes]) -> Path:
    body = b"".join(member_bytes(n, d, 0) for n, d in members) + end_of_archive()
    path.write_bytes(gzip.compress(body))
    return path


def test_what_is_written_reads_back(tmp_path: Path) -> None:
    reader = ArchiveReader(write(tmp_path / "a.tar.gz", ROWS, ROWS, LOG), "the backup")
    assert reader.manifest() == MANIFEST
    parts = list(reader.parts())
    assert [p.name for p in parts] == ["rows/00000001.pb", "rows/00000002.pb", "log/00000001.pb"]
    assert parts[0].message == ROWS and parts[2].message == LOG


def test_layout_problems_are_refused(tmp_path: Path) -> None:
    manifest = ("manifest.json", MANIFEST.to_json())
    rows = ("rows/00000001.pb", ROWS.SerializeToString())
    summary = (
        "summary.json",
        orjson.dumps({"rows": 1, "transactions": 0, "rowParts": 1, "logParts": 0}),
    )
    cases = [
        ((rows, manifest, summary), "'rows/00000001.pb' comes before 'manifest.json'"),
        ((manifest, rows), "no 'summary.json'"),
        ((manifest, rows, summary, rows), "'rows/00000001.pb' comes after 'summary.json'"),
        ((manifest, ("rows/00000002.pb", rows[1]), summary), "'rows/00000002.pb' is out of order"),
        ((manifest, ("rows/00000001.pb", LOG.SerializeToString()), summary), "holds transactions"),
        ((manifest, ("rows/00000001.pb", b"\xff\xff"), summary), "is not a backup part"),
        ((manifest, summary), "announces 1 rows"),
        ((manifest, manifest, rows, summary), "second 'manifest.json'"),
        (
            (
                manifest,
                (
                    "log/00000001.pb",
                    pb.BackupResponse(
                        transactions=[types_pb2.Transaction(database="x")]
                    ).SerializeToString(),
                ),
                summary,
            ),
            "transaction of database 'x'",
        ),
        ((("manifest.json", b"{}"), rows, summary), "does not describe a Shoal backup"),
    ]
    for i, (members, words) in enumerate(cases):
        reader = ArchiveReader(raw(tmp_path / f"{i}.tar.gz", *members), "the backup")
        with pytest.raises(InvalidArgument) as caught:
            list(reader.parts())
        assert words in caught.value.message, (i, caught.value.message)


def test_the_manifest_must_come_first_and_be_complete(tmp_path: Path) -> None:
    empty = ArchiveReader(raw(tmp_path / "e.tar.gz"), "the backup")
    with pytest.raises(InvalidArgument, match="the archive is empty"):
        empty.manifest()
    data = orjson.loads(MANIFEST.to_json())
    for key, value in (("formatVersion", 2), ("nodeTime", -1), ("positions", {"a": "x"})):
        broken = orjson.dumps({**data, key: value})
        reader = ArchiveReader(raw(tmp_path / f"{key}.tar.gz", ("manifest.json", broken)), "it")
        with pytest.raises(InvalidArgument, match=r"manifest\.json"):
            reader.manifest()
    not_gzip = tmp_path / "plain.tar.gz"
    not_gzip.write_bytes(b"plain text")
    with pytest.raises(InvalidArgument, match=r"not a valid tar\.gz"):
        ArchiveReader(not_gzip, "the backup").manifest()
