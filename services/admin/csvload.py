"""CSV loads through the admin service: the CSV text of a request, or a file on this
node's machine, streamed to storage's ``LoadCsv`` in bounded chunks with the caller's
own credentials (so storage applies the caller's role). Storage parses, validates and
commits the rows in batches; a file is read a chunk at a time, never whole.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import BinaryIO

import grpc
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.node import AdminNode, Metadata
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    from_rpc_error,
)

CHUNK_BYTES = 256 * 1024  # bytes of CSV per LoadCsv message
LOAD_TIMEOUT_S = 3600.0  # a load streams for as long as the file takes, within reason


def text_chunks(data: str, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """UTF-8 chunks of CSV text, each at most ``4 * size`` bytes (chunks may split rows;
    storage reassembles them)."""
    for start in range(0, len(data), size):
        yield data[start : start + size].encode()


async def each(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """Chunks already in memory, as the stream ``load`` takes."""
    for chunk in chunks:
        yield chunk


def open_csv_file(path: str) -> BinaryIO:
    """A regular file opened for reading, or the error that says why it cannot be loaded.

    The file is opened first and checked on the open descriptor, so what is checked is
    what is read; opening does not block on a pipe.
    """
    if not path:
        raise InvalidArgument("csv_file_load: 'file_path' must not be empty")
    if not os.path.isabs(path):
        raise InvalidArgument(
            f"csv_file_load: 'file_path' must be an absolute path on the node; got {path!r}"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"csv_file_load: there is no file {path} on this node") from None
    except PermissionError:
        raise PermissionDenied(
            f"csv_file_load: the admin service may not read {path} (file permissions)"
        ) from None
    except OSError as exc:
        raise InvalidArgument(f"csv_file_load: cannot open {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InvalidArgument(f"csv_file_load: {path} is a directory, not a CSV file")
        if not stat.S_ISREG(mode):
            raise InvalidArgument(
                f"csv_file_load: {path} is not a regular file (a device, pipe or socket)"
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


async def file_chunks(file: BinaryIO, path: str, size: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
    """An open file's bytes, one chunk at a time (read off the event loop)."""
    read = 0
    while True:
        try:
            chunk = await asyncio.to_thread(file.read, size)
        except OSError as exc:
            raise FailedPrecondition(
                f"csv_file_load: reading {path} failed after {read} bytes: {exc.strerror};"
                " the rows before that point may have been loaded"
            ) from None
        if not chunk:
            return
        read += len(chunk)
        yield chunk


async def load(
    node: AdminNode,
    metadata: Metadata,
    header: spb.LoadCsvHeader,
    chunks: AsyncIterator[bytes],
) -> spb.LoadCsvResponse:
    """Stream a CSV to storage's LoadCsv; each write waits for the stream's flow
    control, so at most a few chunks are in memory. An error from a chunk source cancels
    the call (storage keeps the batches it committed and drops the partial rest)."""
    call = node.storage.LoadCsv(metadata=metadata, timeout=LOAD_TIMEOUT_S)
    try:
        try:
            await call.write(spb.LoadCsvRequest(header=header))
            async for chunk in chunks:
                await call.write(spb.LoadCsvRequest(chunk=chunk))
            await call.done_writing()
        except asyncio.InvalidStateError:
            pass  # storage has answered already (a refusal): its status says why
        response: spb.LoadCsvResponse = await call
        return response
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, "storage") from exc
    except BaseException:
        call.cancel()
        raise
