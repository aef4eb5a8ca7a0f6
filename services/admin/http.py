"""Harper's HTTP form of the operations API: ``POST /`` with one JSON operation.

The admin process serves it on ``operationsApi.network.httpPort`` (9924; null: closed),
beside the gRPC admin port and with that port's TLS: the same certificate source, re-read
when its files change (each new connection gets the current certificate), and the same
client certificates (``operationsApi.mtls``). A request runs through exactly the code of
``AdminService.Execute`` (``AdminServicer.execute``): the same authentication through
storage (``StorageAuthenticator``: ``Authorization: Basic`` or ``Bearer <operation
token>``, or a client certificate's user), the same registry of operations, the same
memory budget. The answer is the operation's JSON unchanged; an error is Harper's
``{"error": "..."}`` with the HTTP status Harper gives (``STATUS``).

Two operations answer without credentials, as in Harper: ``create_authentication_tokens``
with ``username`` and ``password`` in the body, and ``refresh_operation_token`` with the
refresh token as ``Authorization: Bearer`` (or ``refresh_token`` in the body); storage
checks what they carry.

Limits: a body above ``storage.maxMessageBytes`` (what one Execute may carry) answers
413 before it is read; a request not answered within ``operationsApi.network.timeout``
answers 504; at most ``operationsApi.maxConcurrentRpcs`` requests run at once (more: 429).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from services.admin.node import (
    AdminNode,
    Caller,
    CertificateIdentity,
    StorageAuthenticator,
    forwarded_with_source,
)
from services.common.auth import Identity
from services.common.client_certificates import ClientCertificates
from services.common.errors import ShoalError, Unauthenticated, Unavailable
from services.common.sources import enter_call
from services.common.tls import TlsMaterial
from services.common.tls_source import TlsSource

log = logging.getLogger("shoal.admin.http")

# gRPC status code (Execute's ``code``) -> Harper's HTTP status.
STATUS = {
    0: 200,  # OK
    1: 499,  # CANCELLED
    2: 500,  # UNKNOWN
    3: 400,  # INVALID_ARGUMENT
    4: 504,  # DEADLINE_EXCEEDED
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    7: 403,  # PERMISSION_DENIED
    8: 429,  # RESOURCE_EXHAUSTED
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}
# Operations that run without credentials: what they carry is checked by storage.
WITHOUT_LOGIN = ("create_authentication_tokens", "refresh_operation_token")
PEEK_BYTES = 64 * 1024  # bodies read before authentication to name the operation
ANONYMOUS = Identity(name="")
JSON = "application/json"

Execute = Callable[[Caller, bytes, float | None], Awaitable[Any]]


def http_status(code: int) -> int:
    """The HTTP status of an Execute code."""
    return STATUS.get(code, 500)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Harper's error body."""
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type=JSON, headers=headers
    )


def shoal_error_response(error: ShoalError) -> web.Response:
    headers = None
    if error.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, round(error.retry_after_s)))}
    return error_response(http_status(error.code.value[0]), error.message, headers)


def peer_of(request: web.Request) -> str:
    """The request's peer in gRPC's form (``ipv4:1.2.3.4:5``), for the source checks
    shared with the gRPC port (sign-in throttling by address)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return ""
    host, port = peer[0], peer[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def operation_name(body: bytes) -> str:
    """The ``operation`` of a small JSON body, or "" (the full parse reports faults)."""
    if len(body) > PEEK_BYTES:
        return ""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    value = parsed.get("operation") if isinstance(parsed, dict) else None
    return value if isinstance(value, str) else ""


class ServerContexts:
    """SSL contexts serving the current material of a TLS source: the first connection
    after the files changed gets a context built from the new material."""

    def __init__(self, source: TlsSource, client_certificates: bool) -> None:
        self.source = source
        self.client_certificates = client_certificates
        self._material: TlsMaterial | None = None
        self._context: ssl.SSLContext | None = None
        self.initial = self.current()
        self.initial.sni_callback = self._choose

    def _build(self, material: TlsMaterial) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The standard library loads a key only from a file: a private folder, removed
        # at once.
        with tempfile.TemporaryDirectory(prefix="shoal-http-") as folder:
            certificate, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            certificate.write_bytes(material.certificate)
            descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(material.private_key)
            context.load_cert_chain(certificate, key)
        if self.client_certificates:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=material.trusted.decode())
        context.sni_callback = self._choose
        return context

    def current(self) -> ssl.SSLContext:
        material = self.source.current()
        if material is not self._material or self._context is None:
            self._context = self._build(material)
            self._material = material
        return self._context

    def _choose(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        try:
            context = self.current()
        except Exception:  # never break a handshake on a surprise: keep the context
            log.exception("operations API HTTP: cannot check the certificate files")
            return
        if connection.context is not context:
            connection.context = context


class OperationsHttp:
    """The HTTP listener of the operations API."""

    def __init__(
        self,
        node: AdminNode,
        execute: Execute,
        authenticator: StorageAuthenticator,
        tls: TlsSource | None,
        client_certificates: ClientCertificates | None,
    ) -> None:
        config = node.config
        port = config.operations_api.http_port
        assert port is not None
        self.node = node
        self.address = (config.host, port)
        self._execute = execute
        self._authenticator = authenticator
        self._tls = tls
        self._client_certificates = client_certificates
        self._limit = config.storage.max_message_bytes
        self._timeout_s = config.operations_api.http_timeout_s
        self._slots = asyncio.Semaphore(config.operations_api.max_concurrent_rpcs)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        # The body is read by the handler (413 in Harper's form, not aiohttp's text).
        app = web.Application(client_max_size=self._limit + 1)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        context = None
        if self._tls is not None:
            context = ServerContexts(self._tls, self._client_certificates is not None).initial
        host, port = self.address
        site = web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(
                f"admin cannot listen on {host}:{port} (operationsApi.network.httpPort): {exc}"
            ) from exc
        self._runner = runner
        security = "plaintext" if context is None else "TLS"
        if self._client_certificates is not None:
            security = "TLS, client certificates required"
        log.info("operations API (HTTP) listening on %s:%d (%s)", host, port, security)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/":
            return error_response(404, f"Not found: {request.method} {request.path}")
        if request.method != "POST":
            return error_response(
                405, "the operations API takes POST / with a JSON body", {"Allow": "POST"}
            )
        if self._slots.locked():
            return error_response(
                429,
                "too many operations in progress (operationsApi.maxConcurrentRpcs)",
                {"Retry-After": "1"},
            )
        deadline = time.monotonic() + self._timeout_s
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await self._serve(request, deadline)
            except TimeoutError:
                return error_response(
                    504,
                    f"the operation did not finish within {self._timeout_s:g}s"
                    " (operationsApi.network.timeout); it may still complete",
                )
            except ShoalError as exc:
                return shoal_error_response(exc)
            except Exception:
                log.exception("operations API HTTP: unexpected error")
                return error_response(500, "internal error: see the admin service's log")

    async def _serve(self, request: web.Request, deadline: float) -> web.Response:
        enter_call(peer_of(request))
        if request.content_length is not None and request.content_length > self._limit:
            return self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        caller = await self._caller(request, body)
        answer = await self._execute(caller, body, deadline - time.monotonic())
        return web.Response(status=http_status(answer.code), body=answer.result, content_type=JSON)

    def _too_large(self) -> web.Response:
        return error_response(
            413,
            f"the request body is larger than the {self._limit} bytes an operation may"
            " carry (storage.maxMessageBytes)",
        )

    def _certificate_user(self, request: web.Request) -> str | None:
        if self._client_certificates is None or request.transport is None:
            return None
        connection = request.transport.get_extra_info("ssl_object")
        der = connection.getpeercert(binary_form=True) if connection is not None else None
        if not der:
            return None
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        return self._client_certificates.certificate_user({"x509_pem_cert": [pem]})

    async def _caller(self, request: web.Request, body: bytes) -> Caller:
        """Who is calling, authenticated by storage as an Execute caller is."""
        header = request.headers.get("Authorization")
        metadata: tuple[tuple[str, str | bytes], ...] = (
            (("authorization", header),) if header else ()
        )
        certificate_user = self._certificate_user(request)
        bearer = header is not None and header.strip().lower().startswith("bearer ")
        anonymous = not header and certificate_user is None
        if (anonymous or bearer) and operation_name(body) in WITHOUT_LOGIN:
            return Caller(ANONYMOUS, forwarded_with_source(metadata, self.node.secret))
        if anonymous:
            raise Unauthenticated("Must login")
        who = await self._authenticator.authenticate(metadata, certificate_user)
        if isinstance(who, CertificateIdentity):
            return Caller(who, who.forward)
        return Caller(who, forwarded_with_source(metadata, self.node.secret))
