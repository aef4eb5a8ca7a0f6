"""The gRPC server edge shared by every Shoal service.

One interceptor does what every handler would otherwise repeat: authenticate the caller
(setting ``auth.current_identity`` for the handler), turn ``ShoalError`` into a rich
``google.rpc.Status``, turn anything unexpected into INTERNAL with a log line, and count
and time every call by final status (``RpcMetrics``, exported as gRFC A66 metrics by
``services.common.metrics``). Health (``grpc.health.v1``) and reflection are added to
every server, need no credentials and are not counted.

A client port (storage, admin) serves TLS with the node's certificate when the node has
TLS material (``ServerSpec.tls``); with client certificates on (``storage.mtls``,
``operationsApi.mtls``: ``ServerSpec.client_certificates``) it requires one, and hands the
user it names to the authenticator. Each process also has a plaintext health port
(``HealthPort``, ``health.*`` in shoal.yaml) that serves ``grpc.health.v1`` and nothing
else, for orchestrator probes: it starts first (NOT_SERVING while the process starts),
shares the main port's statuses, and stops last (NOT_SERVING while it drains).

A server with a ``StreamGuard`` (``ServerSpec.streams``, storage's) also limits its
connections and admits its streamed responses to clients (``streams.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from shoal.lifecycle.v1.lifecycle_pb2_grpc import add_LifecycleServiceServicer_to_server

from services.common.auth import Identity, current_identity
from services.common.client_certificates import ClientCertificates
from services.common.config import ShoalConfig
from services.common.errors import Internal, ShoalError, Unavailable
from services.common.lifecycle import SERVICE_NAME as LIFECYCLE_SERVICE
from services.common.lifecycle import Lifecycle, LifecycleServicer
from services.common.metrics import MethodStats, MetricsServer, RpcMetrics, Source, start_metrics
from services.common.sources import call_source, enter_call
from services.common.streams import StreamGuard
from services.common.tls_source import TlsSource, reloading_server_credentials

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


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel arguments for every Shoal server."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        # Never share a port with another process: two nodes on one address must fail.
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Channel arguments for every Shoal client channel (long-lived streams included)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


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


def _wrap(handler: Any, method: str, edge: _Edge, stats: MethodStats) -> Any:
    passthrough = _PASSTHROUGH
    now = _now
    finish = stats.finish

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Ctx) -> Any:
            stats.started += 1
            start = now()
            try:
                await _enter(context, edge)
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
            unary_unary, handler.request_deserializer, handler.response_serializer
        )

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, method, edge, stats),
            handler.request_deserializer,
            handler.response_serializer,
        )

    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Ctx) -> Any:
            stats.started += 1
            start = now()
            try:
                await _enter(context, edge)
                response = await inner_su(requests, context)
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
            stream_unary, handler.request_deserializer, handler.response_serializer
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


HEALTH_MAX_MESSAGE_BYTES = 64 * 1024
HEALTH_GRACE_S = 1.0


class HealthPort:
    """The health statuses of one process, and the plaintext port that serves only them
    (``server`` is None when ``health.enabled`` is false)."""

    def __init__(self, servicer: Any, server: grpc.aio.Server | None, address: str) -> None:
        self.servicer = servicer
        self.server = server
        self.address = address

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(HEALTH_GRACE_S)


async def start_health_port(
    config: ShoalConfig, service: str, service_names: Sequence[str]
) -> HealthPort:
    """Statuses NOT_SERVING for the process (``""``) and each of ``service_names``, served
    on ``health.<service>Port`` (plaintext, ``grpc.health.v1`` only, no authentication).
    Start it before anything slow, and hand it to ``ServerSpec.health``."""
    servicer = health.aio.HealthServicer()
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.health.port(service)}"
    if not config.health.enabled:
        return HealthPort(servicer, None, address)
    server = grpc.aio.server(options=server_options(HEALTH_MAX_MESSAGE_BYTES))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise Unavailable(f"{service} cannot listen on its health port {address}: {exc}") from exc
    if port == 0:
        raise Unavailable(f"{service} cannot listen on its health port {address} (address in use?)")
    await server.start()
    log.info("%s health port listening on %s", service, address)
    return HealthPort(servicer, server, address)


@dataclass
class ServerSpec:
    """What one service process serves."""

    name: str
    address: str
    service_names: list[str]
    register: Callable[[grpc.aio.Server], None]
    authenticator: Authenticator | None
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int | None = None
    # Per-method call counts and durations, filled by the interceptor (see metrics.py).
    rpc_metrics: RpcMetrics = field(default_factory=RpcMetrics)
    # Run before the server stops (end long-lived streams), then after it stopped.
    pre_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    grace_s: float = 10.0
    # Serve TLS from these files, re-read when they change (a client port of a node with
    # TLS); None: plaintext.
    tls: TlsSource | None = None
    # Require client certificates on the TLS port, and authenticate calls by the user they
    # name (ClientCertificates.from_config); None: no client certificate is asked for.
    client_certificates: ClientCertificates | None = None
    # The process's statuses and health port (start_health_port), stopped last; None:
    # statuses of the main port only.
    health: HealthPort | None = None
    # Restart in place (shoal.lifecycle.v1, served beside the service); None: a new one.
    lifecycle: Lifecycle | None = None
    # Connection and stream limits (services/common/streams.py); None: gRPC's defaults.
    streams: StreamGuard | None = None


class RunningServer:
    """A started server with its health servicer."""

    def __init__(self, spec: ServerSpec, server: grpc.aio.Server, health_servicer: Any) -> None:
        self.spec = spec
        self.server = server
        self.health = health_servicer

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.spec.service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        await self.set_serving(False)
        for hook in self.spec.pre_stop:
            await hook()
        await self.server.stop(self.spec.grace_s)
        for hook in self.spec.on_stop:
            await hook()
        if self.spec.health is not None:
            await self.spec.health.stop()


def attach_metrics(
    spec: ServerSpec,
    config: ShoalConfig,
    loop_sources: Sequence[Source] = (),
    thread_sources: Sequence[Source] = (),
) -> MetricsServer | None:
    """Serve the metrics of the service ``spec`` describes on ``metrics.<name>Port``: its
    per-RPC statistics plus the given sources (see ``metrics.start_metrics``). The
    endpoint closes first when the server stops. Call it on the event loop, before
    ``start_server``; None when ``metrics.enabled`` is false."""
    server = start_metrics(config, spec.name, spec.rpc_metrics, loop_sources, thread_sources)
    if server is not None:
        spec.pre_stop.insert(0, server.aclose)
    return server


async def start_server(spec: ServerSpec) -> RunningServer:
    """Build, bind and start a server; health reports SERVING once it listens."""
    options = server_options(spec.max_message_bytes)
    if spec.streams is not None:
        options += spec.streams.limits.server_options()
    server = grpc.aio.server(
        interceptors=[
            ShoalInterceptor(
                spec.authenticator, spec.rpc_metrics, spec.client_certificates, spec.streams
            )
        ],
        options=options,
        maximum_concurrent_rpcs=spec.max_concurrent_rpcs,
    )
    spec.register(server)
    if spec.lifecycle is None:
        spec.lifecycle = Lifecycle(spec.name)
    add_LifecycleServiceServicer_to_server(LifecycleServicer(spec.lifecycle), server)
    health_servicer = (
        spec.health.servicer if spec.health is not None else health.aio.HealthServicer()
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*spec.service_names, LIFECYCLE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME],
        server,
    )
    try:
        if spec.tls is not None:
            credentials = reloading_server_credentials(
                spec.tls, require_client_auth=spec.client_certificates is not None
            )
            port = server.add_secure_port(spec.address, credentials)
        else:
            port = server.add_insecure_port(spec.address)
    except RuntimeError as exc:
        raise Unavailable(f"{spec.name} cannot listen on {spec.address}: {exc}") from exc
    if port == 0:
        raise Unavailable(f"{spec.name} cannot listen on {spec.address} (address in use?)")
    await server.start()
    running = RunningServer(spec, server, health_servicer)
    await running.set_serving(True)
    security = "plaintext"
    if spec.tls is not None:
        security = "TLS, client certificates required" if spec.client_certificates else "TLS"
    log.info("%s listening on %s (%s)", spec.name, spec.address, security)
    return running


async def serve_until_signalled(
    running: RunningServer, extra_tasks: Iterable[asyncio.Task[Any]] = ()
) -> bool:
    """Serve until SIGTERM/SIGINT or a restart request (LifecycleService.Restart), then
    stop gracefully (health first, then the server). True when a restart was requested:
    the caller then starts the process anew (``service_main`` does)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lifecycle = running.spec.lifecycle
    restart = lifecycle.restart_requested if lifecycle is not None else asyncio.Event()
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(restart.wait())]
    waiters += extra_tasks
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task not in waiters[:2] and task.exception() is not None:
            log.error("%s: background task failed: %r", running.spec.name, task.exception())
    restarting = restart.is_set() and not stop.is_set()
    log.info("%s %s", running.spec.name, "restarting" if restarting else "shutting down")
    await running.stop()
    for task in waiters:
        task.cancel()
    return restarting
