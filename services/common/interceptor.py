"""The interceptor every Shoal server runs around the handlers of its own services.

It does what every handler would otherwise repeat: authenticate the caller (setting
``auth.current_identity`` for the handler), answer a request that is not a valid protobuf
message (a string that is not UTF-8) with INVALID_ARGUMENT where gRPC would say UNKNOWN,
turn ``ShoalError`` into a rich ``google.rpc.Status``, turn anything unexpected into
INTERNAL with a log line, and count and time every call by final status (``RpcMetrics``).
Health and reflection pass through it untouched and uncounted. Streamed responses to
clients go through the server's ``StreamGuard`` when it has one (``streams.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from services.common.auth import Identity, current_identity
from services.common.client_certificates import ClientCertificates
from services.common.errors import Internal, InvalidArgument, ShoalError
from services.common.metrics import MethodStats, RpcMetrics
from services.common.sources import call_source, enter_call
from services.common.streams import StreamGuard

log = logging.getLogger("shoal.grpc")
Ctx = grpc.aio.ServicerContext[Any, Any]


class Authenticator(Protocol):
    """Maps call metadata to an identity, raising Unauthenticated.

    ``certificate_user`` is the user the call's verified client certificate names (see
    ``client_certificates``), or None; an ``authorization`` header wins over it."""

    async def authenticate(
        self,
        metadata: tuple[tuple[str, str | bytes], ...],
        certificate_user: str | None = None,
    ) -> Identity: ...


def _public_service(method: str) -> bool:
    return method.startswith(("/grpc.health.v1.", "/grpc.reflection."))


class ShoalInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, error mapping and call metrics around every handler of Shoal's own
    services."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        metrics: RpcMetrics | None = None,
        client_certificates: ClientCertificates | None = None,
        streams: StreamGuard | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._edge = _Edge(authenticator, client_certificates, streams)
        self.metrics = metrics if metrics is not None else RpcMetrics()
        # Wrapped handlers, built once per method (the metadata is read from each call's
        # context), so a call costs no new closures or handler objects.
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or _public_service(method):
            return handler
        stats = self.metrics.method(method)
        wrapped = self._wrapped[method] = _wrap(handler, method, self._edge, stats)
        return wrapped


@dataclass(frozen=True)
class _Edge:
    """How a call is authenticated: the authenticator, and the port's client
    certificates (None: the port asks for none)."""

    authenticator: Authenticator | None
    client_certificates: ClientCertificates | None = None
    streams: StreamGuard | None = None  # admission and idle timeout of streamed responses


async def _enter(context: Ctx, edge: _Edge) -> None:
    enter_call(context.peer())
    authenticator = edge.authenticator
    if authenticator is not None:
        metadata = tuple(context.invocation_metadata() or ())
        certificate_user = None
        if edge.client_certificates is not None:
            auth_context = context.auth_context() or {}
            certificate_user = edge.client_certificates.certificate_user(auth_context)
        current_identity.set(await authenticator.authenticate(metadata, certificate_user))


async def _fail(context: Ctx, method: str, exc: BaseException) -> None:
    if isinstance(exc, ShoalError):
        error = exc
    else:
        log.exception("unexpected error in %s", method, exc_info=exc)
        error = Internal(f"internal error in {method}: {type(exc).__name__}: {exc}")
    await context.abort_with_status(error.to_status())


# Handlers report errors by raising (never with ``context.set_code``), so a call whose
# handler returns ends OK; the status of any other end is worked out only then. A call is
# recorded before its status goes out (before ``_fail`` aborts it), so a client that saw
# the end of its call sees it counted.
_OK = grpc.StatusCode.OK
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_PASSTHROUGH = (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit)
_now = time.perf_counter


def _error_status(exc: Exception) -> grpc.StatusCode:
    """The status ``_fail`` ends a call with."""
    return exc.code if isinstance(exc, ShoalError) else grpc.StatusCode.INTERNAL


def _passthrough_status(exc: BaseException, context: Ctx) -> grpc.StatusCode:
    """The status of a call ended by an abort or a cancellation."""
    if isinstance(exc, grpc.aio.AbortError):
        code: Any = context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        return _CODES.get(code, grpc.StatusCode.UNKNOWN)
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _Undecodable:
    """A request message that did not parse (invalid UTF-8 in a string field, a
    truncated field, nesting beyond protobuf's limit). gRPC would end the call UNKNOWN;
    the handler's wrapper answers INVALID_ARGUMENT instead, once the caller is known."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid protobuf message ({self.reason}); string fields"
            " must hold valid UTF-8"
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning an ``_Undecodable`` instead of raising."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return deserialize


def _check(request: Any) -> None:
    if type(request) is _Undecodable:
        raise request.error()


UNDECODABLE_DRAIN_BYTES = 64 * 1024 * 1024


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages; at one that did not parse, the rest of the stream is
    read (bounded) and dropped, so the caller sees INVALID_ARGUMENT as the call's status."""
    async for request in requests:
        if type(request) is _Undecodable:
            seen = 0
            async for rest in requests:
                seen += rest.ByteSize() if hasattr(rest, "ByteSize") else 0
                if seen > UNDECODABLE_DRAIN_BYTES:
                    break
            raise request.error()
        yield request


def _wrap(handler: Any, method: str, edge: _Edge, stats: MethodStats) -> Any:
    passthrough = _PASSTHROUGH
    now = _now
    finish = stats.finish
    deserializer = _tolerant(handler.request_deserializer)

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Ctx) -> Any:
            stats.started += 1
            start = now()
            try:
                await _enter(context, edge)
                _check(request)
                response = await inner_uu(request, context)
            except passthrough as exc:
                finish(_passthrough_status(exc, context), now() - start)
                raise
            except Exception as exc:
                finish(_error_status(exc), now() - start)
                await _fail(context, method, exc)
            else:
                finish(_OK, now() - start)
                return response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, deserializer, handler.response_serializer
        )

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, method, edge, stats),
            deserializer,
            handler.response_serializer,
        )

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Ctx) -> Any:
            stats.started += 1
            start = now()
            try:
                await _enter(context, edge)
                response = await inner_su(_checked(requests), context)
            except passthrough as exc:
                finish(_passthrough_status(exc, context), now() - start)
                raise
            except Exception as exc:
                finish(_error_status(exc), now() - start)
                await _fail(context, method, exc)
            else:
                finish(_OK, now() - start)
                return response

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, deserializer, handler.response_serializer
        )

    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(handler.stream_stream, method, edge, stats),
        handler.request_deserializer,
        handler.response_serializer,
    )


def _wrap_stream(inner: Any, method: str, edge: _Edge, stats: MethodStats) -> Any:
    """Wrap a streaming-response handler: an async generator, or a coroutine that writes
    with ``context.write`` (both are allowed by grpc.aio)."""
    passthrough = _PASSTHROUGH
    now = _now
    finish = stats.finish
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: Ctx) -> Any:
            stats.started += 1
            start = now()
            try:
                await _enter(context, edge)
                _check(request)
                items = inner(request, context)
                who = current_identity.get(None)
                if edge.streams is not None and (who is None or not who.internal):
                    items = edge.streams.guarded(items, context, call_source(), method)
                async for item in items:
                    yield item
            except passthrough as exc:
                finish(_passthrough_status(exc, context), now() - start)
                raise
            except Exception as exc:
                finish(_error_status(exc), now() - start)
                await _fail(context, method, exc)
            else:
                finish(_OK, now() - start)

        return generator

    async def coroutine(request: Any, context: Ctx) -> Any:
        stats.started += 1
        start = now()
        try:
            await _enter(context, edge)
            _check(request)
            response = await inner(request, context)
        except passthrough as exc:
            finish(_passthrough_status(exc, context), now() - start)
            raise
        except Exception as exc:
            finish(_error_status(exc), now() - start)
            await _fail(context, method, exc)
        else:
            finish(_OK, now() - start)
            return response

    return coroutine
