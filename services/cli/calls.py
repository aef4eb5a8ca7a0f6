"""Calls to a node: channels (TLS verified with the CLI's CA when it has one), Harper JSON
operations through the admin service, and RPCs whose failure ends the command with the
call's gRPC status code."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import grpc
import orjson
import typer
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc

from services.cli.output import fail
from services.cli.settings import CA_ENV, Settings
from services.common.auth import basic_metadata
from services.common.config import DEFAULT_ADMIN_PORT
from services.common.grpcserver import channel_options


def trusted(ca: Path | None, extra: bytes = b"") -> bytes | None:
    """The CA certificates the CLI verifies nodes with (``ca``: from --ca, SHOAL_CA or the
    CLI config, plus ``extra``); None: speak plaintext."""
    pem = b""
    if ca is not None:
        try:
            pem = ca.read_bytes()
        except OSError as exc:
            fail(f"cannot read the CA certificate {ca} (--ca / {CA_ENV}): {exc.strerror}", 2)
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            fail(f"{ca} (--ca / {CA_ENV}) holds no PEM certificate", 2)
    if extra:
        pem = pem.rstrip(b"\n") + b"\n" + extra if pem else extra
    return pem or None


def channel(settings: Settings, address: str, extra_ca: bytes = b"") -> grpc.Channel:
    """A channel to a node's port: TLS verified with the CLI's CA when it has one."""
    roots = trusted(settings.ca, extra_ca)
    if roots is None:
        return grpc.insecure_channel(address, options=channel_options())
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(address, credentials, options=channel_options())


def explain(settings: Settings, code: grpc.StatusCode, details: str) -> str:
    """An error message, with what to check when the node could not be reached."""
    message = f"{code.name}: {details}"
    if code != grpc.StatusCode.UNAVAILABLE:
        return message
    if settings.ca is not None:
        return (
            f"{message} (is the node running? It must present a certificate signed by the"
            f" CA in {settings.ca} that names the host dialed)"
        )
    return (
        f"{message} (is the node running? If its ports serve TLS, give its CA certificate"
        f" with --ca FILE or {CA_ENV})"
    )


def status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A failed call's status code and details."""
    if isinstance(exc, grpc.Call):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.UNKNOWN, str(exc)


def rpc_failed(settings: Settings, exc: grpc.RpcError) -> NoReturn:
    """Print why a call failed and exit with its gRPC status code."""
    code, details = status_of(exc)
    fail(explain(settings, code, details), int(code.value[0]) or 1)


def execute_json(settings: Settings, operation: bytes, extra_ca: bytes = b"") -> tuple[bytes, int]:
    """Run a Harper JSON operation given as JSON text: (the answer's JSON as the node
    sent it, gRPC code). A call that fails as a whole (no answer: a wrong password, an
    unreachable node) answers Harper's ``{"error": ...}`` with the call's status message
    and code; what to check for an unreachable node goes to stderr."""
    settings.require_password()
    with channel(settings, settings.address(DEFAULT_ADMIN_PORT), extra_ca) as open_channel:
        stub = admin_pb2_grpc.AdminServiceStub(open_channel)
        try:
            reply = stub.Execute(
                apb.ExecuteRequest(operation=operation),
                metadata=basic_metadata(settings.username, settings.password),
                timeout=60,
            )
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                typer.echo(f"shoal: {explain(settings, code, details)}", err=True)
            return orjson.dumps({"error": details or code.name}), int(code.value[0]) or 1
    return reply.result, reply.code


def try_execute(
    settings: Settings, operation: dict[str, Any], extra_ca: bytes = b""
) -> tuple[Any, int]:
    """Run a Harper JSON operation: (result or {"error": ...}, gRPC code); ``extra_ca``
    is trusted besides the CLI's CA."""
    settings.require_password()
    with channel(settings, settings.address(DEFAULT_ADMIN_PORT), extra_ca) as open_channel:
        stub = admin_pb2_grpc.AdminServiceStub(open_channel)
        try:
            reply = stub.Execute(
                apb.ExecuteRequest(operation=orjson.dumps(operation)),
                metadata=basic_metadata(settings.username, settings.password),
                timeout=60,
            )
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            return {"error": explain(settings, code, details)}, int(code.value[0]) or 1
    return orjson.loads(reply.result), reply.code


def execute(settings: Settings, operation: dict[str, Any]) -> Any:
    """Run a Harper JSON operation; print the error and exit with its gRPC code on failure."""
    result, code = try_execute(settings, operation)
    if code:
        typer.echo(f"shoal: {result.get('error', result)}", err=True)
        raise typer.Exit(code)
    return result


def admin_stub(settings: Settings) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    """A channel to the node's admin service and a stub on it (after checking that there
    is a password)."""
    settings.require_password()
    open_channel = channel(settings, settings.address(DEFAULT_ADMIN_PORT))
    return open_channel, admin_pb2_grpc.AdminServiceStub(open_channel)


def call(
    settings: Settings,
    function: Any,
    request: Any,
    stream: bool = False,
    timeout: float = 30.0,
) -> Any:
    """Call an RPC (reading a whole stream when ``stream``); exit with the gRPC code on error."""
    settings.require_password()
    metadata = basic_metadata(settings.username, settings.password)
    try:
        reply = function(request, metadata=metadata, timeout=timeout)
        return list(reply) if stream else reply
    except grpc.RpcError as exc:
        rpc_failed(settings, exc)
