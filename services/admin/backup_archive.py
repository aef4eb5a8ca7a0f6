"""The backup archive format: a tar.gz whose members, in this order, are

    manifest.json        what the backup is consistent with: database, node, clock,
                         positions, log horizons, schema (JSON, see ``Manifest``)
    rows/00000001.pb     rows: a serialized shoal.storage.v1.BackupResponse holding rows
    rows/00000002.pb     ... numbered from 1 without gaps
    log/00000001.pb      the retained transaction log: BackupResponse messages holding
    ...                  transactions, in the node's commit order
    summary.json         counts of rows, transactions and members, to detect truncation

Every member is a regular file; anything else (another name, a link, a device, a
folder, an out-of-order or oversized member) makes the whole archive invalid. Writing
is incremental (one member at a time, compressed as it goes) and reading is streaming,
so neither holds more than one member in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.common.archive import (
    MemberRule,
    end_of_archive,
    member_bytes,
    read_members,
)
from services.common.errors import InvalidArgument
from services.common.hlc import version_ms

FORMAT = "shoal-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
MiB = 1024 * 1024
MAX_PART_BYTES = 64 * MiB
RULES = (
    MemberRule(r"manifest\.json", 16 * MiB, "manifest.json"),
    MemberRule(r"rows/[0-9]{8}\.pb", MAX_PART_BYTES, "rows/NNNNNNNN.pb"),
    MemberRule(r"log/[0-9]{8}\.pb", MAX_PART_BYTES, "log/NNNNNNNN.pb"),
    MemberRule(r"summary\.json", 64 * 1024, "summary.json"),
)
COMPRESS_LEVEL = 6


@dataclass(frozen=True)
class Manifest:
    """What a backup is consistent with (``manifest.json``)."""

    database: str
    node_name: str
    node_time: int
    positions: dict[str, int]
    horizons: dict[str, int]
    tables: tuple[types_pb2.TableSchema, ...]

    @property
    def taken_at_ms(self) -> int:
        return version_ms(self.node_time)

    @staticmethod
    def from_header(header: spb.BackupHeader) -> Manifest:
        return Manifest(
            database=header.database,
            node_name=header.node_name,
            node_time=header.node_time,
            positions={p.origin: p.version for p in header.positions},
            horizons={p.origin: p.version for p in header.horizons},
            tables=tuple(header.tables),
        )

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "format": FORMAT,
                "formatVersion": FORMAT_VERSION,
                "database": self.database,
                "node": self.node_name,
                "nodeTime": self.node_time,
                "takenAt": self.taken_at_ms,
                "positions": self.positions,
                "horizons": self.horizons,
                "tables": [
                    {
                        "name": t.name,
                        "primaryKey": t.primary_key,
                        "indexed": list(t.indexed_attributes),
                        "replicate": t.replicate,
                        "attributes": list(t.attributes),
                    }
                    for t in self.tables
                ],
            },
            option=orjson.OPT_INDENT_2,
        )

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        """Parse and check ``manifest.json``; INVALID_ARGUMENT naming the problem."""

        def bad(why: str) -> InvalidArgument:
            return InvalidArgument(f"archive member 'manifest.json' {why}")

        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise bad(f"is not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise bad(f'does not describe a Shoal backup (no "format": "{FORMAT}")')
        if raw.get("formatVersion") != FORMAT_VERSION:
            raise bad(
                f"has format version {raw.get('formatVersion')!r}; this node reads"
                f" version {FORMAT_VERSION}"
            )
        for key in ("database", "node"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise bad(f"needs a non-empty string {key!r}")
        if not _is_version(raw.get("nodeTime")):
            raise bad("needs 'nodeTime', a version")
        versions: dict[str, dict[str, int]] = {}
        for key in ("positions", "horizons"):
            value = raw.get(key)
            if not isinstance(value, dict) or not all(
                isinstance(o, str) and o and _is_version(v) for o, v in value.items()
            ):
                raise bad(f"needs {key!r}, an object of origin names to versions")
            versions[key] = value
        tables = raw.get("tables")
        if not isinstance(tables, list):
            raise bad("needs 'tables', an array")
        return Manifest(
            database=raw["database"],
            node_name=raw["node"],
            node_time=raw["nodeTime"],
            positions=versions["positions"],
            horizons=versions["horizons"],
            tables=tuple(_table(t, i, bad) for i, t in enumerate(tables)),
        )


def _is_version(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 64


def _table(raw: Any, index: int, bad: Any) -> types_pb2.TableSchema:
    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if not (
        isinstance(raw, dict)
        and isinstance(raw.get("name"), str)
        and isinstance(raw.get("primaryKey"), str)
        and isinstance(raw.get("replicate"), bool)
        and strings(raw.get("indexed"))
        and strings(raw.get("attributes"))
    ):
        raise bad(f"table {index} needs name, primaryKey, indexed, replicate and attributes")
    return types_pb2.TableSchema(
        name=raw["name"],
        primary_key=raw["primaryKey"],
        indexed_attributes=raw["indexed"],
        replicate=raw["replicate"],
        attributes=raw["attributes"],
    )


@dataclass(frozen=True)
class Summary:
    """Counts written last (``summary.json``), checked against what was read."""

    rows: int
    transactions: int
    row_parts: int
    log_parts: int

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "rows": self.rows,
                "transactions": self.transactions,
                "rowParts": self.row_parts,
                "logParts": self.log_parts,
            }
        )

    @staticmethod
    def from_json(data: bytes) -> Summary:
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raw = None
        keys = ("rows", "transactions", "rowParts", "logParts")
        if not isinstance(raw, dict) or not all(
            type(raw.get(k)) is int and raw[k] >= 0 for k in keys
        ):
            raise InvalidArgument(
                "archive member 'summary.json' must hold the counts rows, transactions,"
                " rowParts and logParts"
            )
        return Summary(*(raw[k] for k in keys))


class ArchiveWriter:
    """Builds an archive incrementally; every call returns the compressed bytes it made."""

    def __init__(self, mtime: int) -> None:
        self._mtime = mtime
        self._compressor = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._hash = hashlib.sha256()
        self.size = 0
        self.rows = 0
        self.transactions = 0
        self._row_parts = 0
        self._log_parts = 0

    def _out(self, data: bytes) -> bytes:
        self._hash.update(data)
        self.size += len(data)
        return data

    def _member(self, name: str, data: bytes) -> bytes:
        return self._out(self._compressor.compress(member_bytes(name, data, self._mtime)))

    def manifest(self, manifest: Manifest) -> bytes:
        return self._member(MANIFEST, manifest.to_json())

    def part(self, message: spb.BackupResponse) -> bytes:
        """A rows or log member from one Backup message (rows first, then the log)."""
        if message.rows:
            if self._log_parts:
                raise InvalidArgument("storage sent rows after the transaction log")
            self._row_parts += 1
            self.rows += len(message.rows)
            return self._member(f"rows/{self._row_parts:08d}.pb", message.SerializeToString())
        self._log_parts += 1
        self.transactions += len(message.transactions)
        return self._member(f"log/{self._log_parts:08d}.pb", message.SerializeToString())

    def finish(self) -> bytes:
        summary = Summary(self.rows, self.transactions, self._row_parts, self._log_parts)
        tail = self._compressor.compress(
            member_bytes(SUMMARY, summary.to_json(), self._mtime) + end_of_archive()
        )
        return self._out(tail + self._compressor.flush())

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class Part:
    """A rows or log member, decoded."""

    name: str
    message: spb.BackupResponse


def _decode(name: str, data: bytes) -> spb.BackupResponse:
    try:
        message = spb.BackupResponse.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"archive member {name!r} is not a backup part ({exc})") from None
    if message.HasField("header"):
        raise InvalidArgument(f"archive member {name!r} holds a header")
    return message


class ArchiveReader:
    """Reads an archive file once, in order, checking every member and the whole layout.

    ``manifest()`` reads only the first member; ``parts()`` reads the whole archive and
    raises INVALID_ARGUMENT (naming the member) at the first problem, including a
    summary that does not match what was read.
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label  # how messages name the archive

    def _members(self) -> Generator[tuple[str, bytes], None, None]:
        try:
            with gzip.open(self.path, "rb") as stream:
                for member in read_members(stream, RULES):  # type: ignore[arg-type]
                    yield member.name, member.data
        except (OSError, EOFError, zlib.error) as exc:
            raise InvalidArgument(f"{self.label} is not a valid tar.gz archive: {exc}") from None

    def manifest(self) -> Manifest:
        members = self._members()
        try:
            name, data = next(members, ("", b""))
        finally:
            members.close()
        if name != MANIFEST:
            raise InvalidArgument(
                f"{self.label}: the first archive member must be {MANIFEST!r}"
                + (f", not {name!r}" if name else " (the archive is empty)")
            )
        return Manifest.from_json(data)

    def parts(self) -> Iterator[Part]:
        """Every rows then log member, decoded; the manifest and summary are checked."""
        members = self._members()
        manifest: Manifest | None = None
        summary: Summary | None = None
        rows = transactions = row_parts = log_parts = 0
        for name, data in members:
            if summary is not None:
                raise InvalidArgument(f"archive member {name!r} comes after {SUMMARY!r}")
            if manifest is None:
                if name != MANIFEST:
                    raise InvalidArgument(f"archive member {name!r} comes before {MANIFEST!r}")
                manifest = Manifest.from_json(data)
                continue
            if name == SUMMARY:
                summary = Summary.from_json(data)
                continue
            if name.startswith("rows/"):
                row_parts += 1
                expected = f"rows/{row_parts:08d}.pb"
                if log_parts or name != expected:
                    raise InvalidArgument(f"archive member {name!r} is out of order")
                message = _decode(name, data)
                if message.transactions:
                    raise InvalidArgument(f"archive member {name!r} holds transactions")
                rows += len(message.rows)
            elif name.startswith("log/"):
                log_parts += 1
                if name != f"log/{log_parts:08d}.pb":
                    raise InvalidArgument(f"archive member {name!r} is out of order")
                message = _decode(name, data)
                if message.rows:
                    raise InvalidArgument(f"archive member {name!r} holds rows")
                for txn in message.transactions:
                    if txn.database != manifest.database:
                        raise InvalidArgument(
                            f"archive member {name!r} holds a transaction of database"
                            f" {txn.database!r} in a backup of {manifest.database!r}"
                        )
                transactions += len(message.transactions)
            else:
                raise InvalidArgument(f"archive member {name!r} is a second {MANIFEST!r}")
            yield Part(name, message)
        if manifest is None:
            raise InvalidArgument(f"{self.label} is empty")
        if summary is None:
            raise InvalidArgument(f"{self.label} has no {SUMMARY!r}: the archive is truncated")
        if summary != Summary(rows, transactions, row_parts, log_parts):
            raise InvalidArgument(
                f"{self.label}: {SUMMARY!r} announces {summary.rows} rows and"
                f" {summary.transactions} transactions in {summary.row_parts} + "
                f"{summary.log_parts} members, but the archive holds {rows} and"
                f" {transactions} in {row_parts} + {log_parts}"
            )
