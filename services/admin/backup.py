"""Backup operations of one node, shared by the typed RPCs (GetBackup, RestoreBackup) and
Execute (get_backup, restore_backup).

Storage reads and writes the data (its Backup and Restore RPCs, node-internal); this
module makes and reads the archive (``backup_archive``), chooses what a restore rebuilds
(``restore_plan``), and keeps the node's backup files. Files live only in
``<rootPath>/backups/``, under validated plain names: a backup written by get_backup, an
archive being uploaded by RestoreBackup (a hidden temporary file, removed afterwards).
Archives are never extracted; their members are read and checked one at a time.

A restore reads its archives twice: a dry run (storage checks every row and transaction
and writes nothing), then the real run. So an archive rejected for any reason, by the
admin service or by storage, changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as spb
from shoal.storage.v1 import types_pb2

from services.admin.backup_archive import ArchiveReader, ArchiveWriter, Manifest, Part
from services.admin.node import AdminNode
from services.admin.restore_plan import RestorePlan, plan_restore
from services.common.archive import file_name
from services.common.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
    from_rpc_error,
)

FOLDER = "backups"
SUFFIX = ".tar.gz"
CHUNK_BYTES = 1024 * 1024  # archive bytes per GetBackup message
REQUEST_BYTES = 1024 * 1024  # rows or transactions per Restore message
MAX_UNTIL_MS = (1 << 48) - 1  # the largest time a version can hold
Item = TypeVar("Item")


def _positions(database: str, versions: dict[str, int]) -> list[types_pb2.Position]:
    return [
        types_pb2.Position(database=database, origin=o, version=v)
        for o, v in sorted(versions.items())
    ]


def check_until(until_ms: int | None) -> int | None:
    """Validate a point-in-time (Unix milliseconds)."""
    if until_ms is not None and not 0 <= until_ms <= MAX_UNTIL_MS:
        raise InvalidArgument(f"until must be a time in Unix milliseconds, not {until_ms}")
    return until_ms


@dataclass(frozen=True)
class BackupResult:
    """A finished archive: what it holds and its size and digest."""

    manifest: Manifest
    rows: int
    transactions: int
    size: int
    sha256: str

    def info(self) -> apb.BackupInfo:
        m = self.manifest
        return apb.BackupInfo(
            database=m.database,
            node_name=m.node_name,
            node_time=m.node_time,
            taken_at_ms=m.taken_at_ms,
            positions=_positions(m.database, m.positions),
            horizons=_positions(m.database, m.horizons),
            rows=self.rows,
            transactions=self.transactions,
            size_bytes=self.size,
            sha256=self.sha256,
        )


@dataclass(frozen=True)
class SavedBackup:
    """A backup written into the node's backups folder."""

    name: str
    file: str  # relative to rootPath
    result: BackupResult


@dataclass(frozen=True)
class RestoreResult:
    """What a restore rebuilt."""

    plan: RestorePlan
    outcome: spb.RestoreResponse

    def response(self) -> apb.RestoreBackupResponse:
        return apb.RestoreBackupResponse(
            database=self.plan.database,
            mode=self.plan.mode,
            rows=self.outcome.rows,
            logged_transactions=self.outcome.logged_transactions,
            replayed_transactions=self.outcome.applied_transactions,
            positions=self.outcome.positions,
        )


class BackupStream:
    """The archive of one database, produced while storage streams it; ``result`` is set
    once ``chunks()`` is exhausted."""

    def __init__(self, node: AdminNode, database: str) -> None:
        self._node = node
        self._database = database
        self.result: BackupResult | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        node = self._node
        call = node.storage_node.Backup(
            spb.BackupRequest(database=self._database), metadata=node.internal
        )
        writer: ArchiveWriter | None = None
        manifest: Manifest | None = None
        try:
            async for message in call:
                if writer is None or manifest is None:
                    if not message.HasField("header"):
                        raise Internal("storage's Backup stream did not start with its header")
                    manifest = Manifest.from_header(message.header)
                    writer = ArchiveWriter(mtime=manifest.taken_at_ms // 1000)
                    data = writer.manifest(manifest)
                else:
                    data = await asyncio.to_thread(writer.part, message)
                for start in range(0, len(data), CHUNK_BYTES):
                    yield data[start : start + CHUNK_BYTES]
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "storage") from exc
        finally:
            call.cancel()
        if writer is None or manifest is None:
            raise Internal("storage's Backup stream ended without a header")
        yield writer.finish()
        self.result = BackupResult(
            manifest, writer.rows, writer.transactions, writer.size, writer.sha256
        )


def _batches(items: Sequence[Item], size: Callable[[Item], int]) -> Iterator[list[Item]]:
    """Consecutive slices of at most REQUEST_BYTES (a larger item travels alone)."""
    batch: list[Item] = []
    total = 0
    for item in items:
        n = size(item)
        if batch and total + n > REQUEST_BYTES:
            yield batch
            batch = []
            total = 0
        batch.append(item)
        total += n
    if batch:
        yield batch


async def _parts(reader: ArchiveReader) -> AsyncIterator[Part]:
    """The archive's parts, read and checked off the event loop."""
    parts = reader.parts()
    while (part := await asyncio.to_thread(next, parts, None)) is not None:
        yield part


async def drain(requests: AsyncIterator[Any]) -> None:
    """Read the rest of a client stream before failing the call: a client still writing
    when the call ends would get INTERNAL (a grpc.aio limitation) instead of the error."""
    async for _ in requests:
        pass


class Upload:
    """Archives received by RestoreBackup, spooled into hidden files of the backups
    folder (removed by ``close``)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        self.base = folder / f".upload-{token}{SUFFIX}"
        self.log: Path | None = None
        self._log_path = folder / f".upload-{token}-log{SUFFIX}"
        self.header: apb.RestoreBackupHeader | None = None
        self._files: list[BinaryIO] = []

    async def receive(self, requests: AsyncIterator[apb.RestoreBackupRequest]) -> None:
        """Spool the stream: a header first, then ``chunk``s, then any ``log_chunk``s."""
        try:
            await self._receive(requests)
        except Exception:
            await drain(requests)
            raise

    async def _receive(self, requests: AsyncIterator[apb.RestoreBackupRequest]) -> None:
        base = log = None
        async for request in requests:
            part = request.WhichOneof("part")
            if self.header is None:
                if part != "header":
                    raise InvalidArgument("the first message must be the header")
                self.header = request.header
            elif part == "header":
                raise InvalidArgument("only one header is allowed, as the first message")
            elif part == "chunk":
                if log is not None:
                    raise InvalidArgument("every 'chunk' must come before the first 'log_chunk'")
                if base is None:
                    base = self._open(self.base)
                base.write(request.chunk)
            elif part == "log_chunk":
                if base is None:
                    raise InvalidArgument("send the backup ('chunk') before the log backup")
                if log is None:
                    log = self._open(self._log_path)
                    self.log = self._log_path
                log.write(request.log_chunk)
        if self.header is None:
            raise InvalidArgument("the stream is empty: send a header first")
        if base is None:
            raise InvalidArgument("no archive was sent: send it in 'chunk' messages")
        for file in self._files:
            file.close()

    def _open(self, path: Path) -> BinaryIO:
        file = path.open("xb")
        os.chmod(path, 0o600)
        self._files.append(file)
        return file

    def close(self) -> None:
        for file in self._files:
            file.close()
        for path in (self.base, self._log_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class Backups:
    """Backups of one node."""

    def __init__(self, node: AdminNode) -> None:
        self.node = node
        self.folder = node.config.root_path / FOLDER

    # -- backup ------------------------------------------------------------------------

    def stream(self, database: str) -> BackupStream:
        return BackupStream(self.node, database)

    async def save(self, database: str, name: str | None) -> SavedBackup:
        """Write a backup to ``backups/<name>.tar.gz`` (never replacing a file)."""
        if name is None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")[:-3]
            name = f"{re.sub(r'[^A-Za-z0-9_-]', '_', database)[:100]}-{stamp}Z"
        final, partial = self._new_file(name)
        stream = self.stream(database)
        try:
            with partial.open("xb") as out:
                os.chmod(partial, 0o600)
                async for chunk in stream.chunks():
                    await asyncio.to_thread(out.write, chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(partial, final)
            except FileExistsError:
                raise AlreadyExists(
                    f"backup {name!r} already exists; choose another name"
                ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        assert stream.result is not None
        return SavedBackup(name, f"{FOLDER}/{name}{SUFFIX}", stream.result)

    def _new_file(self, name: str) -> tuple[Path, Path]:
        """The final and temporary paths of a new backup; ALREADY_EXISTS if taken."""
        file_name(name, "backup name")
        if name.endswith(SUFFIX):
            raise InvalidArgument(f"give the backup name without {SUFFIX!r}")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self.folder / f"{name}{SUFFIX}"
        if os.path.lexists(final):
            raise AlreadyExists(f"backup {name!r} already exists; choose another name")
        return final, self.folder / f".{name}-{secrets.token_hex(4)}{SUFFIX}.partial"

    # -- restore -----------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        """The file of a backup in the backups folder, by its validated name."""
        if not isinstance(name, str):
            raise InvalidArgument("a backup name must be a string")
        bare = name.removesuffix(SUFFIX)
        file_name(bare, "backup name")
        path = self.folder / f"{bare}{SUFFIX}"
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise NotFound(f"backup {bare!r} does not exist in the node's backups folder") from None
        if stat.S_ISLNK(mode):
            raise InvalidArgument(f"backup {bare!r} is a symbolic link; only plain files restore")
        if not stat.S_ISREG(mode):
            raise InvalidArgument(f"backup {bare!r} is not a regular file")
        return path

    async def restore(
        self,
        base: ArchiveReader,
        log: ArchiveReader | None,
        until_ms: int | None,
        database: str,
    ) -> RestoreResult:
        """Check both archives completely (with a storage dry run), then restore."""
        check_until(until_ms)
        base_manifest = await asyncio.to_thread(base.manifest)
        log_manifest = None if log is None else await asyncio.to_thread(log.manifest)
        plan = plan_restore(
            base_manifest,
            log_manifest,
            until_ms,
            database,
            base_label=base.label,
            log_label=log.label if log is not None else "the log backup",
        )
        source = base.label if log is None else f"{base.label} with the log of {log.label}"
        # The header alone first (a quick answer when the database is not empty), then
        # everything checked, then written.
        await self._send(plan, None, None, source, dry_run=True)
        await self._send(plan, base, log, source, dry_run=True)
        outcome = await self._send(plan, base, log, source, dry_run=False)
        return RestoreResult(plan, outcome)

    async def restore_upload(
        self, requests: AsyncIterator[apb.RestoreBackupRequest]
    ) -> RestoreResult:
        """RestoreBackup: spool the uploaded archives, restore, remove the spooled files."""
        upload = Upload(self.folder)
        try:
            await upload.receive(requests)
            assert upload.header is not None
            header = upload.header
            return await self.restore(
                ArchiveReader(upload.base, "the uploaded backup"),
                None
                if upload.log is None
                else ArchiveReader(upload.log, "the uploaded log backup"),
                header.until_ms if header.HasField("until_ms") else None,
                header.database,
            )
        finally:
            upload.close()

    async def _send(
        self,
        plan: RestorePlan,
        base: ArchiveReader | None,
        log: ArchiveReader | None,
        source: str,
        dry_run: bool,
    ) -> spb.RestoreResponse:
        """One Restore call: the header, then (unless ``base`` is None) the archives."""
        node = self.node
        call: Any = node.storage_node.Restore(metadata=node.internal)
        header = spb.RestoreHeader(
            database=plan.database,
            positions=_positions(plan.database, plan.positions),
            horizons=_positions(plan.database, plan.horizons),
            tables=plan.tables,
            replay_until=plan.replay_until,
            dry_run=dry_run,
            source=source,
        )
        try:
            await call.write(spb.RestoreRequest(header=header))
            if base is not None:
                async for part in _parts(base):
                    if part.message.rows and plan.send_rows:
                        for rows in _batches(part.message.rows, lambda r: r.ByteSize()):
                            await call.write(spb.RestoreRequest(rows=rows))
                    elif part.message.transactions and plan.log_from_base:
                        await self._send_transactions(call, part, plan.database)
            if log is not None:
                async for part in _parts(log):
                    if part.message.transactions and not plan.log_from_base:
                        await self._send_transactions(call, part, plan.database)
            await call.write(spb.RestoreRequest(complete=True))
            await call.done_writing()
            response: spb.RestoreResponse = await call
            return response
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "storage") from exc
        except BaseException:
            call.cancel()
            raise

    @staticmethod
    async def _send_transactions(call: Any, part: Part, database: str) -> None:
        """A log member's transactions, in the restored database (it may be renamed)."""
        for txn in part.message.transactions:
            txn.database = database
        for transactions in _batches(part.message.transactions, lambda t: t.ByteSize()):
            await call.write(spb.RestoreRequest(transactions=transactions))
