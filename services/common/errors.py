"""Shoal's exception hierarchy and its one mapping to gRPC statuses.

Domain code raises these; the server edge (``interceptor``) turns them into a
``google.rpc.Status`` carrying an ``ErrorInfo`` (domain ``shoal``, a stable reason and
string metadata). Callers decide what to do from the type (``retriable``), never from
the message text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "shoal"
# A status travels in the response's trailers twice (the message, percent-encoded, and
# the google.rpc.Status with it, in base64), and gRPC clients refuse trailers above 16 KiB
# by default: the call would end RESOURCE_EXHAUSTED on the client instead of this error.
# Messages and ErrorInfo metadata values are cut to these sizes (UTF-8 bytes).
MAX_MESSAGE_BYTES = 1024
MAX_METADATA_BYTES = 2048
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters: requests can
    carry names, ids and values of any size, and a message repeats them."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}…{size}"


def cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (a whole character last), marked."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 64].decode(errors="ignore") + f"… (cut: {len(data)} bytes in all)"


class ShoalError(Exception):
    """Base of every error Shoal reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason: str = "UNKNOWN"
    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        # When the same request may succeed (a google.rpc.RetryInfo detail); None: unsaid.
        self.retry_after_s = retry_after_s

    def to_status(self) -> grpc.Status:
        """The rich gRPC status for this error (message, ErrorInfo, and RetryInfo when
        ``retry_after_s`` is set)."""
        metadata = {k: cut(v, MAX_METADATA_BYTES) for k, v in self.metadata.items()}
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=metadata
        )
        details = [any_pb2.Any()]
        details[0].Pack(info)
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromMilliseconds(max(1, round(self.retry_after_s * 1000)))
            details.append(any_pb2.Any())
            details[1].Pack(retry)
        message = cut(self.message, MAX_MESSAGE_BYTES)
        status = status_pb2.Status(code=self.code.value[0], message=message, details=details)
        return rpc_status.to_status(status)


class InvalidArgument(ShoalError):
    """The request is malformed; retrying it unchanged fails the same way."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ShoalError):
    """A named database, table, attribute, user or node does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ShoalError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ShoalError):
    """The system is not in a state where the request can run (e.g. log truncated)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(ShoalError):
    """The caller is authenticated but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(ShoalError):
    """Missing or wrong credentials. The message never says whether a user exists."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(ShoalError):
    """A size, count or rate limit was exceeded (``retry_after_s`` says when to try again
    where waiting helps)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(ShoalError):
    """A dependency is down or starting; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"
    retriable = True


class Aborted(ShoalError):
    """A conflict; retrying the whole operation may succeed."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"
    retriable = True


class DeadlineExceeded(ShoalError):
    """The operation did not finish in time (it may still complete later)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"
    retriable = True


class Unimplemented(ShoalError):
    """A part of the request that this version of Shoal does not support."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class DataLoss(ShoalError):
    """Stored data cannot be read (it was written by older code, or is damaged)."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Internal(ShoalError):
    """A bug or a broken invariant; the message says what."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


def _detail(error: grpc.RpcError, kind: Any) -> Any:
    """The first detail of type ``kind`` of a received error, or None."""
    if not isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return None
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # a status detail that contradicts the call's own code
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ``google.rpc.ErrorInfo`` detail of a received error, or None when it has none."""
    info: error_details_pb2.ErrorInfo | None = _detail(error, error_details_pb2.ErrorInfo)
    return info


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The delay of a received error's ``google.rpc.RetryInfo``, or None when it has none."""
    retry = _detail(error, error_details_pb2.RetryInfo)
    return None if retry is None else float(retry.retry_delay.ToMilliseconds()) / 1000


def error_reason(error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a received error, or None when it carries none."""
    info = error_info(error)
    return None if info is None else str(info.reason)


_BY_CODE: dict[grpc.StatusCode, type[ShoalError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        Aborted,
        DeadlineExceeded,
        DataLoss,
        Internal,
    )
}


def from_rpc_error(error: grpc.aio.AioRpcError, service: str = "") -> ShoalError:
    """The ShoalError equivalent of an error a downstream service returned, so a service
    that calls another answers with the same code, message and reason."""
    cls = _BY_CODE.get(
        error.code(), Internal if error.code() != grpc.StatusCode.UNAVAILABLE else Unavailable
    )
    message = error.details() or error.code().name
    if error.code() == grpc.StatusCode.UNAVAILABLE and service:
        message = f"{service} is unavailable: {message}"
    info = error_info(error)
    retry = retry_delay_s(error)
    if info is None:
        return cls(message, retry_after_s=retry)
    return cls(message, reason=str(info.reason), metadata=dict(info.metadata), retry_after_s=retry)
