"""Restarting a process in place: the ``shoal.lifecycle.v1.LifecycleService`` every
service serves on its main port.

``Restart`` answers, then sets ``Lifecycle.restart_requested``; ``serve_until_signalled``
stops the server gracefully exactly as on SIGTERM and reports the restart, and
``service_main`` then replaces the process with a fresh start of its own command line
(``os.execv``: same process id, same environment and working directory). Nothing has to
supervise the process, so a restart behaves alike under ``shoal node start`` (the
supervisor sees no exit), Docker and Kubernetes (the container keeps running).
``GetInstance`` tells a new start from the old one: ``instance`` is random per start.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import sys
from typing import Any

import grpc
from shoal.lifecycle.v1 import lifecycle_pb2 as lpb
from shoal.lifecycle.v1 import lifecycle_pb2_grpc

from services.common.auth import BearerToken, identity, parse_authorization
from services.common.errors import PermissionDenied, Unauthenticated

SERVICE_NAME = lpb.DESCRIPTOR.services_by_name["LifecycleService"].full_name
log = logging.getLogger("shoal.lifecycle")
Ctx = grpc.aio.ServicerContext[Any, Any]


class Lifecycle:
    """One start of one process: its instance identifier and its restart request."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.instance = secrets.token_hex(8)
        self.restart_requested = asyncio.Event()

    def request_restart(self) -> None:
        """Restart once the calls in flight have finished (the server stops gracefully)."""
        log.info("%s: restart requested (instance %s)", self.service, self.instance)
        self.restart_requested.set()


class LifecycleServicer(lifecycle_pb2_grpc.LifecycleServiceServicer):
    """gRPC edge of ``Lifecycle``. With ``node_secret`` (a server without an
    authenticator, such as the replicator's), only the node-internal bearer token is
    accepted; otherwise the identity the server's authenticator set must be the
    node-internal one or a super user."""

    def __init__(self, lifecycle: Lifecycle, node_secret: str | None = None) -> None:
        self.lifecycle = lifecycle
        self._secret = node_secret

    def _require_allowed(self, operation: str, context: Ctx) -> None:
        if self._secret is not None:
            credentials = parse_authorization(tuple(context.invocation_metadata() or ()))
            if not isinstance(credentials, BearerToken):
                raise PermissionDenied(f"{operation} is for the node's own services")
            if not hmac.compare_digest(credentials.token.encode(), self._secret.encode()):
                raise Unauthenticated("invalid node credentials")
            return
        who = identity()
        if not (who.internal or who.super_user):
            raise PermissionDenied(f"{operation} needs a super user; {who.name} is not one")

    async def Restart(self, request: lpb.RestartRequest, context: Ctx) -> lpb.RestartResponse:
        self._require_allowed(f"restarting {self.lifecycle.service}", context)
        self.lifecycle.request_restart()
        return lpb.RestartResponse(instance=self.lifecycle.instance)

    async def GetInstance(
        self, request: lpb.GetInstanceRequest, context: Ctx
    ) -> lpb.GetInstanceResponse:
        self._require_allowed(f"reading the instance of {self.lifecycle.service}", context)
        return lpb.GetInstanceResponse(
            instance=self.lifecycle.instance, service=self.lifecycle.service
        )


def exec_self() -> None:
    """Replace this process with a fresh start of its own command line (never returns)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, sys.orig_argv)
