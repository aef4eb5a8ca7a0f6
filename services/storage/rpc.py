"""Request handling shared by storage's two servicers, the client one (``server.py`` and
``client/``) and the node-internal one (``node_server.py``): who is calling and what they
may do, the parsing of request fields every area uses, numbered errors, and bounded
response messages. Authentication and the mapping of errors to gRPC statuses happen once,
at the edge (``common/interceptor.py``, ``common/errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from shoal.storage.v1 import types_pb2

from services.common.auth import Identity, identity
from services.common.errors import InvalidArgument, PermissionDenied, ShoalError
from services.common.hlc import version_from_ms
from services.storage import search
from services.storage.permissions import DELETE, INSERT, UPDATE, UPSERT, require_super_user
from services.storage.transaction import parse_id
from services.storage.unreadable import Unreadable

Msg = TypeVar("Msg")
Ctx = grpc.aio.ServicerContext[Any, Any]
CHUNK_RECORDS = 1000
# The most record bytes in one streamed message (a bigger record goes alone): a stream
# holds about two messages in this process while its client reads (services/common/streams.py).
CHUNK_BYTES = 64 * 1024
LOG_BATCH = 500  # transactions in one log-read message, at most (and CHUNK_BYTES)
OPERATION_ACTIONS = {
    types_pb2.OPERATION_INSERT: INSERT,
    types_pb2.OPERATION_UPDATE: UPDATE,
    types_pb2.OPERATION_UPSERT: UPSERT,
    types_pb2.OPERATION_DELETE: DELETE,
}

# -- who is calling --------------------------------------------------------------------


def caller() -> Identity:
    """The caller of the RPC being served."""
    return identity()


def node_only() -> Identity:
    """The caller, who must be the node's own services (PERMISSION_DENIED otherwise)."""
    who = identity()
    if not who.internal:
        raise PermissionDenied("this RPC is reserved for the node's own services")
    return who


def administer(what: str) -> None:
    """The caller must be a super user to do ``what`` (named in the refusal)."""
    require_super_user(caller(), what)


def administer_or_node(what: str) -> None:
    """The caller must be the node's own services or a super user."""
    if not caller().internal:
        administer(what)


# -- request fields ----------------------------------------------------------------------


def ms(value: timestamp_pb2.Timestamp, name: str) -> int:
    """A request's time in Unix milliseconds; INVALID_ARGUMENT when it is not a valid
    Timestamp (seconds from year 1 to 9999, nanos below a second)."""
    try:
        return int(value.ToMilliseconds())
    except ValueError as exc:
        raise InvalidArgument(f"{name} is not a valid time: {exc}") from None


def time_range(request: Any) -> tuple[int, int | None]:
    """A log read's ``start_time`` and ``end_time`` as versions (no end: None)."""
    lo = 0
    if request.HasField("start_time"):
        lo = version_from_ms(ms(request.start_time, "start_time"))
    hi = None
    if request.HasField("end_time"):
        hi = version_from_ms(ms(request.end_time, "end_time"))
    if hi is not None and hi < lo:
        raise InvalidArgument("end_time is before start_time")
    return lo, hi


def replicate_to(request: Any) -> types_pb2.ReplicateTo | None:
    """A write request's ``replicate_to`` when given."""
    if not request.HasField("replicate_to"):
        return None
    value: types_pb2.ReplicateTo = request.replicate_to
    if not value.count and not value.nodes:
        return None
    return value


def sort_keys(keys: Any) -> list[tuple[str, bool]]:
    """A search's sort keys as (attribute, descending)."""
    out = []
    for k in keys:
        if not k.attribute:
            raise InvalidArgument("a sort key needs an attribute")
        out.append((k.attribute, k.descending))
    return out


def encoded_ids(ids: Iterable[bytes]) -> list[bytes]:
    """A request's ids (JSON values), encoded as keys; the first bad one is refused."""
    return [parse_id(raw, i)[1] for i, raw in enumerate(ids)]


@contextlib.contextmanager
def numbered(
    prefix: str, refused: tuple[type[Exception], ...] = (InvalidArgument,)
) -> Iterator[None]:
    """An error about one item of a request names the item: INVALID_ARGUMENT
    ``"<prefix>: <message>"`` for each ``refused`` error raised inside."""
    try:
        yield
    except refused as exc:
        message = exc.message if isinstance(exc, ShoalError) else str(exc)
        raise InvalidArgument(f"{prefix}: {message}") from exc


# -- bounded responses -------------------------------------------------------------------


async def chunked(
    records: Iterator[bytes], make: Callable[[list[bytes]], Msg]
) -> AsyncIterator[Msg]:
    """Bounded response chunks, yielding to the event loop between them."""
    chunk: list[bytes] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record)
        if len(chunk) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
            yield make(chunk)
            chunk = []
            size = 0
            await asyncio.sleep(0)
    if chunk:
        yield make(chunk)


async def chunked_async(
    docs: AsyncIterator[dict[str, Any]],
    attributes: list[str],
    make: Callable[[list[bytes]], Msg],
    unreadable: Unreadable,
) -> AsyncIterator[Msg]:
    """Bounded response chunks of projected records from an async source (records that
    cannot be serialized are left out and noted in ``unreadable``)."""
    chunk: list[bytes] = []
    size = 0
    async for doc in docs:
        record = unreadable.render(search.project(doc, attributes))
        if record is None:
            continue
        chunk.append(record)
        size += len(record)
        if len(chunk) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
            yield make(chunk)
            chunk = []
            size = 0
    if chunk:
        yield make(chunk)


async def log_batches(
    transactions: Iterator[types_pb2.Transaction],
) -> AsyncIterator[list[types_pb2.Transaction]]:
    """Log entries in messages of at most ``LOG_BATCH`` entries or ``CHUNK_BYTES``
    (one bigger entry goes alone), yielding to the event loop between them."""
    batch: list[types_pb2.Transaction] = []
    size = 0
    for txn in transactions:
        batch.append(txn)
        size += txn.ByteSize()
        if len(batch) >= LOG_BATCH or size >= CHUNK_BYTES:
            yield batch
            batch = []
            size = 0
            await asyncio.sleep(0)
    if batch:
        yield batch
