"""The Prometheus endpoint of one Shoal process (``metrics.*`` in ``shoal.yaml``).

Every service process serves ``http://host:port/metrics`` (only that path; ``https`` and
basic auth with ``metrics.webConfigFile``, see ``metrics_web``) from its own
``CollectorRegistry`` (the global default registry is never used) with prometheus_client's
WSGI app, on a daemon thread. (Not ``start_http_server``: its serving loop polls for a
stop request every half second, which would delay every service's shutdown.)

Nothing here updates a prometheus_client metric object on a hot path. Values are read at
scrape time by custom collectors:

* state owned by the service's event loop (the engine's counts, the replicator's peers,
  the per-RPC statistics) is read *on the loop*: the scrape thread hands the reading to
  the loop and waits for it (``LoopCollector``), so it sees a consistent snapshot and
  never races a write;
* anything else (the filesystem, the process) is read on the scrape thread.

Names follow ``shoal_<subsystem>_<name>_<unit>`` in base units (seconds, bytes, ratios
0..1), with low-cardinality labels only: never record keys or peer addresses, only
database, table, column family and peer (node) names, which are bounded by the cluster.
Per-RPC metrics follow gRFC A66: ``grpc_server_call_started_total{grpc_method}`` and the
histogram ``grpc_server_call_duration_seconds{grpc_method, grpc_status}``.

No ``_created`` series are exported: the custom collectors never report a creation time,
and ``start_metrics`` switches prometheus_client's ``_created`` samples off for the
process (prometheus-client 0.26 has this switch, or the environment variable
``PROMETHEUS_DISABLE_CREATED_SERIES``, but no per-registry option).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import logging
import socket
import ssl
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from services.common.config import ShoalConfig
from services.common.errors import Unavailable
from services.common.metrics_web import METRICS_PATH, MetricsGuard, MetricsWebConfig

log = logging.getLogger("shoal.metrics")

# Upper bounds of the call duration histogram, in seconds: from a cached read (~100 µs)
# to long-lived streams (Subscribe, Replicate), which end in the last buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    100.0,
)
_BUCKET_LABELS = (*(repr(b) for b in DURATION_BUCKETS), "+Inf")
SCRAPE_TIMEOUT_S = 5.0
STOP_POLL_S = 0.05  # how often the serving thread looks for a stop request
MAX_CONCURRENT_REQUESTS = 8  # requests served at once; more connections are closed
REQUEST_TIMEOUT_S = 10.0  # per read or write of one request

Source = Callable[[], Iterable[Metric]]


def shoal_version() -> str:
    """The installed Shoal version ("unknown" when not installed as a package)."""
    try:
        return importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- per-RPC statistics (gRFC A66) -------------------------------------------------------


class _Histogram:
    """Non-cumulative bucket counts and a sum, changed on the event loop only."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0


class MethodStats:
    """Calls of one method: started, and durations by final status.

    The server interceptor holds one per method and, per call, adds one to ``started``
    and calls ``finish`` once: no allocation beyond the duration itself.
    """

    __slots__ = ("_by_code", "_ok", "method", "started")

    def __init__(self, method: str) -> None:
        self.method = method  # "package.Service/Method", as gRFC A66 writes it
        self.started = 0
        self._ok = _Histogram()
        self._by_code: dict[grpc.StatusCode, _Histogram] = {grpc.StatusCode.OK: self._ok}

    def finish(self, code: grpc.StatusCode, seconds: float) -> None:
        """Record one finished call."""
        histogram = self._ok if code is grpc.StatusCode.OK else self._by_code.get(code)
        if histogram is None:
            histogram = self._by_code[code] = _Histogram()
        histogram.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        histogram.sum += seconds

    def histograms(self) -> list[tuple[grpc.StatusCode, list[int], float]]:
        """(status, non-cumulative counts, sum) of every status seen, copied."""
        return [
            (code, list(h.counts), h.sum)
            for code, h in list(self._by_code.items())
            if code is not grpc.StatusCode.OK or any(h.counts)
        ]


class RpcMetrics:
    """The per-method statistics of one gRPC server."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodStats] = {}

    def method(self, full_method: str) -> MethodStats:
        """The statistics of ``/package.Service/Method`` (created at first use)."""
        stats = self._methods.get(full_method)
        if stats is None:
            stats = self._methods[full_method] = MethodStats(full_method.lstrip("/"))
        return stats

    def methods(self) -> list[MethodStats]:
        """The statistics of every method called so far."""
        return list(self._methods.values())

    def collect(self) -> list[Metric]:
        started = CounterMetricFamily(
            "grpc_server_call_started",
            "Calls started on the server, per method (gRFC A66).",
            labels=["grpc_method"],
        )
        duration = HistogramMetricFamily(
            "grpc_server_call_duration_seconds",
            "Time from the start of a call to its end on the server, per method and final"
            " status (gRFC A66).",
            labels=["grpc_method", "grpc_status"],
        )
        for stats in sorted(list(self._methods.values()), key=lambda s: s.method):
            started.add_metric([stats.method], stats.started)
            for code, counts, total in stats.histograms():
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for label, count in zip(_BUCKET_LABELS, counts, strict=True):
                    cumulative += count
                    buckets.append((label, cumulative))
                duration.add_metric([stats.method, code.name], buckets, total)
        return [started, duration]


# -- collectors ---------------------------------------------------------------------------


class BuildInfoCollector:
    """``shoal_build_info{version, service} 1``."""

    def __init__(self, service: str) -> None:
        self._labels = [shoal_version(), service]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "shoal_build_info",
            "Always 1; the labels tell the Shoal version and which service this is.",
            labels=["version", "service"],
        )
        info.add_metric(self._labels, 1)
        yield info


class LoopCollector:
    """Runs sources on an event loop at scrape time and waits for what they report.

    A source must be quick (it runs between the loop's other callbacks). When the loop is
    closed or does not answer within ``timeout_s``, the scrape goes without these metrics.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sources: Sequence[Source], timeout_s: float
    ) -> None:
        self._loop = loop
        self._sources = list(sources)
        self._timeout_s = timeout_s
        self._loop_thread = threading.get_ident()

    def _read(self) -> list[Metric]:
        out: list[Metric] = []
        for source in self._sources:
            try:
                out.extend(source())
            except Exception:
                log.exception("a metrics source failed")
        return out

    def collect(self) -> list[Metric]:
        if threading.get_ident() == self._loop_thread:
            return self._read()
        if self._loop.is_closed() or not self._loop.is_running():
            return []
        future: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                future.set_result(self._read())

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop closed meanwhile
            return []
        try:
            return future.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("metrics: the event loop did not answer in %.0f s", self._timeout_s)
            return []


class SourceCollector:
    """A source read on the scrape thread (for values that need no event loop)."""

    def __init__(self, source: Source) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._source())
        except Exception:
            log.exception("a metrics source failed")
            return []


def new_registry(service: str) -> CollectorRegistry:
    """A registry of its own with build information and the standard process metrics
    (``process_*`` from the process collector, ``python_info``, ``python_gc_*``)."""
    registry = CollectorRegistry()
    registry.register(BuildInfoCollector(service))
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry


# -- the endpoint --------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """Logs no line per scrape; a client gets ``REQUEST_TIMEOUT_S`` per read or write,
    the TLS handshake included (done here, on the request's thread)."""

    timeout = REQUEST_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _MetricsHTTPServer(ThreadingWSGIServer):
    """At most ``MAX_CONCURRENT_REQUESTS`` requests at once (a connection beyond that is
    closed at once), over TLS when a context is given."""

    tls: ssl.SSLContext | None = None

    def server_bind(self) -> None:
        super().server_bind()
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = self.socket.accept()
        if self.tls is not None:
            connection = self.tls.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """A metrics endpoint serving a registry; ``stop`` (or ``aclose`` on the loop) closes it.

    Only ``/metrics`` answers; ``web`` adds TLS and basic-auth users (see
    ``metrics_web``). Raises ``OSError`` (or ``ssl.SSLError``) when it cannot listen on
    ``host:port`` or load the TLS files.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        name: str,
        web: MetricsWebConfig | None = None,
    ) -> None:
        web = web or MetricsWebConfig()
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class: type[_MetricsHTTPServer] = type(
            "MetricsHTTPServer",
            (_MetricsHTTPServer,),
            {"address_family": family, "tls": web.tls.context() if web.tls else None},
        )
        app = MetricsGuard(make_wsgi_app(registry), web)
        self._httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{self._httpd.server_address[1]}"
        self.scheme = "https" if web.tls is not None else "http"
        self.registry = registry
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(STOP_POLL_S,), name=name, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}{METRICS_PATH}"

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    async def aclose(self) -> None:
        """``stop`` without blocking the event loop (a scrape may wait on the loop)."""
        await asyncio.to_thread(self.stop)


def metrics_address(config: ShoalConfig, service: str) -> tuple[str, int]:
    """(host, port) of a service's metrics endpoint: ``metrics.host``, else the node's."""
    return config.metrics.host or config.host, config.metrics.port(service)


def start_metrics(
    config: ShoalConfig,
    service: str,
    rpc: RpcMetrics | None = None,
    loop_sources: Sequence[Source] = (),
    thread_sources: Sequence[Source] = (),
    extra: Sequence[Collector] = (),
) -> MetricsServer | None:
    """Serve a service's metrics on ``host:metrics.<service>Port``; None when
    ``metrics.enabled`` is false. Call it on the service's event loop.

    ``rpc`` is the server's per-RPC statistics (``ServerSpec.rpc_metrics``);
    ``loop_sources`` read state owned by the loop, ``thread_sources`` anything else;
    ``extra`` are ready-made collectors. Raises ``Unavailable`` when the port is taken.
    """
    if not config.metrics.enabled:
        return None
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = new_registry(service)
    sources: list[Source] = [rpc.collect] if rpc is not None else []
    sources.extend(loop_sources)
    if sources:
        registry.register(LoopCollector(asyncio.get_running_loop(), sources, SCRAPE_TIMEOUT_S))
    for source in thread_sources:
        registry.register(SourceCollector(source))
    for collector in extra:
        registry.register(collector)
    host, port = metrics_address(config, service)
    try:
        server = MetricsServer(host, port, registry, f"metrics-{service}", config.metrics.web)
    except ssl.SSLError as exc:
        raise Unavailable(
            f"{service} cannot serve metrics over TLS: {exc} (tls_server_config of"
            f" metrics.webConfigFile {config.metrics.web_config_file})"
        ) from exc
    except OSError as exc:
        raise Unavailable(
            f"{service} cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            " (address in use? see metrics.* in shoal.yaml)"
        ) from exc
    log.info("%s metrics on %s", service, server.url)
    return server
