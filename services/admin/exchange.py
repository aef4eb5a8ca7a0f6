"""The certificate exchange of ``add_node`` with temporary credentials (Harper's
cross-generated certificates): a node with its own generated CA joins a member of another
cluster (the target) without any file copied by hand.

On the joining node (``join``, from AddNode / add_node with ``authorization``):

1. It makes a new key and a certificate signing request naming itself, in memory.
2. It dials the target's admin port over TLS. With ``verify_tls`` false the target's
   certificate is fetched without verification (bounded by a timeout) and pinned as the
   only trusted certificate of that one call; otherwise it must chain to a CA this node
   trusts.
3. It calls the target's SignNodeCertificate with the temporary credentials as the call's
   ``authorization`` metadata: the only place they go. They are not written to a table, a
   file or a log, and error messages never contain them.
4. It checks the answer (the certificate carries its new key and names it; a returned CA
   issued it), then writes its trust first (``keys/ca.crt`` gets the target's CA
   certificates), then its new key and certificate (``keys/node.key``, ``keys/node.crt``),
   each atomically. The replicator's ``TlsSource`` notices the changed files and uses
   them for the next connections, without a restart.
5. It records its certificates in ``system.hdb_certificate`` and the target in
   ``system.hdb_nodes``; replication then connects over mutual TLS both ways (the target
   recorded this node when it signed).

On the target (``sign``, SignNodeCertificate): ``signer.py`` makes the certificate; this
module checks the names (not its own, not a member's with another url) and records the
joining node in ``system.hdb_nodes`` before answering.

The exchange replaces only a certificate the node generated in ``<rootPath>/keys/``;
certificates configured by an operator (``tls.*`` elsewhere) are left alone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from shoal.admin.v1 import admin_pb2 as apb
from shoal.admin.v1 import admin_pb2_grpc
from shoal.storage.v1 import storage_pb2 as spb

from services.admin import signer
from services.admin.node import AdminNode
from services.admin.nodes import Nodes, Row, validated_row
from services.common import certificate_table, certs, members
from services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ShoalError,
    Unavailable,
    from_rpc_error,
)
from services.common.grpcserver import channel_options
from services.common.tls_source import TlsError, system_root_certificates

log = logging.getLogger("shoal.admin")

FETCH_TIMEOUT_S = 10.0  # reading the target's certificate (verify_tls: false)
SIGN_TIMEOUT_S = 30.0  # the SignNodeCertificate call
MAX_MESSAGE_BYTES = 1024 * 1024
AUTHORIZATION_RULE = (
    '\'authorization\' must be {"username": ..., "password": ...} or a'
    " 'Basic <base64 user:password>' or 'Bearer <token>' string"
)


def authorization_header(value: Any, operation: str) -> str:
    """The ``authorization`` metadata for temporary credentials given as Harper does
    (an object with username and password, or a Basic / Bearer string). The message of a
    refusal never repeats the value."""
    if isinstance(value, dict):
        username, password = value.get("username"), value.get("password")
        if not isinstance(username, str) or not username or ":" in username:
            raise InvalidArgument(f"{operation}: {AUTHORIZATION_RULE} (a username without ':')")
        if not isinstance(password, str) or not password:
            raise InvalidArgument(f"{operation}: {AUTHORIZATION_RULE} (a password is required)")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        return f"Basic {token}"
    if isinstance(value, str):
        scheme, _, rest = value.strip().partition(" ")
        rest = rest.strip()
        if scheme.lower() == "basic" and rest:
            try:
                base64.b64decode(rest, validate=True)
            except binascii.Error:
                raise InvalidArgument(
                    f"{operation}: the Basic credentials of 'authorization' are not base64"
                ) from None
            return f"Basic {rest}"
        if scheme.lower() == "bearer" and rest and "\n" not in rest:
            return f"Bearer {rest}"
    raise InvalidArgument(f"{operation}: {AUTHORIZATION_RULE}")


@dataclass(frozen=True)
class JoinRequest:
    """add_node with temporary credentials: the target's row (as validated for add_node)
    and how to reach its admin port."""

    row: Row
    authorization: str
    verify_tls: bool = True
    admin_port: int | None = None


@dataclass(frozen=True)
class _OwnFiles:
    certificate: Path
    private_key: Path
    certificate_authority: Path


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _name_in(certificate: x509.Certificate) -> str:
    """A name the certificate vouches for (its CN, else its first SAN)."""
    found = certs.details(certificate)
    if found.common_name:
        return found.common_name
    for name in found.subject_alternative_names:
        return name.split(":", 1)[1]
    raise Unavailable("the target's admin port presents a certificate that names nothing")


def _fetch_certificate(host: str, port: int) -> bytes:
    """The certificate the server at host:port presents, unverified (trust on first use)."""
    return ssl.get_server_certificate((host, port), timeout=FETCH_TIMEOUT_S).encode()


class Exchange:
    """Both sides of the certificate exchange on one node."""

    def __init__(self, node: AdminNode, nodes: Nodes) -> None:
        self.node = node
        self.nodes = nodes
        self.name = node.config.node_name
        self._lock = asyncio.Lock()

    # -- the joining node ------------------------------------------------------------------

    def _own_files(self) -> _OwnFiles:
        """The generated certificate files the exchange replaces; FailedPrecondition when
        this node's certificates are configured elsewhere or it runs without TLS."""
        config = self.node.config
        tls = config.tls
        if tls.certificate is None or tls.private_key is None:
            raise FailedPrecondition(
                f"{self.name} runs without TLS (replication.securePort: null): the"
                " certificate exchange gives a node a certificate for mutual TLS"
            )
        keys = config.keys_path
        files = _OwnFiles(
            keys / certs.NODE_CERT_FILE, keys / certs.NODE_KEY_FILE, keys / certs.CA_CERT_FILE
        )

        def resolved(path: Path | None) -> Path | None:
            if path is None:
                return None
            return path if path.is_absolute() else config.root_path / path

        if (
            resolved(tls.certificate) != files.certificate
            or resolved(tls.private_key) != files.private_key
            or resolved(tls.certificate_authority) != files.certificate_authority
        ):
            raise FailedPrecondition(
                f"{self.name} uses certificate files configured by tls.*; the certificate"
                " exchange replaces only a certificate the node generated in its keys"
                " folder: add the node without 'authorization' and give it a certificate"
                " of the cluster's CA"
            )
        return files

    def _trusted_roots(self, files: _OwnFiles) -> bytes:
        roots = files.certificate_authority.read_bytes()
        if self.node.config.replication.enable_root_cas:
            try:
                roots = roots.rstrip(b"\n") + b"\n" + system_root_certificates()
            except TlsError as exc:
                raise FailedPrecondition(str(exc)) from exc
        return roots

    async def _credentials(
        self, host: str, port: int, verify_tls: bool, files: _OwnFiles
    ) -> tuple[grpc.ChannelCredentials, list[tuple[str, Any]]]:
        options: list[tuple[str, Any]] = channel_options(MAX_MESSAGE_BYTES)
        if verify_tls:
            roots = self._trusted_roots(files)
            return grpc.ssl_channel_credentials(root_certificates=roots), options
        try:
            pem = await asyncio.wait_for(
                asyncio.to_thread(_fetch_certificate, host, port), FETCH_TIMEOUT_S + 1
            )
            presented = certs.read_pem_certificate(pem)
        except (OSError, TimeoutError, ValueError) as exc:
            raise Unavailable(
                f"cannot read the certificate of {host}'s admin port ({_address(host, port)}):"
                f" {exc}; the certificate exchange needs the target's admin port to serve TLS"
            ) from None
        options.append(("grpc.ssl_target_name_override", _name_in(presented)))
        return grpc.ssl_channel_credentials(root_certificates=_pem(presented)), options

    async def _ask(
        self,
        request: JoinRequest,
        signing_request: bytes,
        files: _OwnFiles,
    ) -> apb.SignNodeCertificateResponse:
        target = str(request.row[members.PRIMARY_KEY])
        port = request.admin_port or self.node.config.operations_api.port
        address = _address(target, port)
        credentials, options = await self._credentials(target, port, request.verify_tls, files)
        message = apb.SignNodeCertificateRequest(
            certificate_request=signing_request,
            name=self.name,
            url=members.advertised_url(self.node.config, secure=True),
            signer=target,
        )
        async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            try:
                reply: apb.SignNodeCertificateResponse = await stub.SignNodeCertificate(
                    message,
                    metadata=(("authorization", request.authorization),),
                    timeout=SIGN_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as exc:
                raise self._refusal(exc, target, address, request.verify_tls) from None
        return reply

    @staticmethod
    def _refusal(
        exc: grpc.aio.AioRpcError, target: str, address: str, verify_tls: bool
    ) -> ShoalError:
        details = exc.details() or exc.code().name
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return PermissionDenied(
                f"{target} refused the temporary credentials ('authorization'): {details}"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = (
                "; with verify_tls true its certificate must chain to a CA this node trusts"
                if verify_tls
                else ""
            )
            return Unavailable(
                f"cannot call the admin service of {target} at {address}: {details}{hint}"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{target} did not answer within {SIGN_TIMEOUT_S:.0f}s")
        mapped = from_rpc_error(exc, "admin")
        return type(mapped)(f"{target} refused to sign this node's certificate: {details}")

    def _checked(
        self, reply: apb.SignNodeCertificateResponse, key_pem: bytes, target: str
    ) -> tuple[bytes, list[x509.Certificate]]:
        """The new certificate and the CA certificates to trust, after checking them."""
        try:
            certificate = certs.read_pem_certificate(reply.certificate)
            authorities = x509.load_pem_x509_certificates(reply.certificate_authority)
        except (certs.CertificateError, ValueError) as exc:
            raise FailedPrecondition(f"{target} answered an unusable certificate: {exc}") from exc
        found = certs.details(certificate)
        problems = []
        if reply.name != target:
            problems.append(f"it calls itself {reply.name!r}")
        if not certs.key_matches(certs.load_private_key(key_pem), certificate):
            problems.append("the certificate is not for this node's new key")
        if found.common_name != self.name or found.is_authority:
            problems.append(f"the certificate does not name {self.name} as a node")
        authorities = [a for a in authorities if certs.details(a).is_authority]
        issuers = []
        for authority in authorities:
            try:
                certificate.verify_directly_issued_by(authority)
                issuers.append(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
        if not issuers:
            problems.append("none of the CA certificates it sent issued the certificate")
        if problems:
            raise FailedPrecondition(
                f"{target} answered a certificate this node cannot use: {'; '.join(problems)};"
                " nothing was changed on this node"
            )
        return reply.certificate, authorities

    def _install(
        self, files: _OwnFiles, key_pem: bytes, certificate: bytes, cas: list[x509.Certificate]
    ) -> None:
        """Trust first, then the key, then the certificate (each written atomically): the
        replicator keeps its last good material until key and certificate match."""
        current = x509.load_pem_x509_certificates(files.certificate_authority.read_bytes())
        seen = {c.fingerprint(hashes.SHA256()) for c in current}
        bundle = [*current, *(c for c in cas if c.fingerprint(hashes.SHA256()) not in seen)]
        certs.write_certificate(files.certificate_authority, b"".join(_pem(c) for c in bundle))
        certs.write_private_key(files.private_key, key_pem)
        certs.write_certificate(files.certificate, certificate)

    async def _record_certificates(self) -> None:
        rows = certificate_table.node_certificate_rows(self.node.config)
        request = spb.UpsertRequest(
            database=certificate_table.DATABASE,
            table=certificate_table.TABLE,
            records=[orjson.dumps(r) for r in rows],
            merge=True,
        )
        await self.node.call(self.node.storage.Upsert, request, self.node.internal)

    async def join(self, request: JoinRequest) -> Row:
        """Join the target's cluster (see the module comment); the target's row as written."""
        target = str(request.row[members.PRIMARY_KEY])
        async with self._lock:
            files = self._own_files()
            if target in (await self.nodes.read()).rows:
                raise AlreadyExists(f"{target} is already a member of the cluster")
            pair = certs.create_signing_request(self.name)
            reply = await self._ask(request, pair.certificate_pem, files)
            certificate, authorities = self._checked(reply, pair.key_pem, target)
            await asyncio.to_thread(self._install, files, pair.key_pem, certificate, authorities)
            serial = certs.read_details(certificate).serial_number
            log.info(
                "certificate exchange with %s: this node now uses the certificate with serial"
                " %s signed by %s",
                target,
                serial,
                certs.read_details(certificate).issuer,
            )
            await self._record_certificates()
            delay_ms = self.node.config.testing.join_record_delay_ms
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            # Not ``add``: the join succeeded, and the target may be recorded already.
            return await self.nodes.record(request.row)

    # -- the target ------------------------------------------------------------------------

    async def sign(
        self, request: apb.SignNodeCertificateRequest
    ) -> apb.SignNodeCertificateResponse:
        """SignNodeCertificate: check, sign, record the joining node, answer."""
        name = request.name
        if not name:
            raise InvalidArgument("'name' is required: the joining node's name")
        if not request.signer:
            raise InvalidArgument("'signer' is required: the name the joining node knows us by")
        if request.signer != self.name:
            raise InvalidArgument(
                f"this node is {self.name}, not {request.signer!r}: it signs only for nodes"
                " that name it as the signer"
            )
        if name == self.name:
            raise PermissionDenied(
                f"{name} is this node's own name: it issues no certificate for it"
            )
        row = validated_row(
            {members.PRIMARY_KEY: name, **({"url": request.url} if request.url else {})},
            self.name,
            None,
            "SignNodeCertificate: ",
        )
        row.pop("shard")
        authority = signer.load_authority(self.node.config)
        valid_days = request.valid_days if request.HasField("valid_days") else signer.MAX_VALID_DAYS
        certificate = signer.sign(authority.pair, request.certificate_request, name, valid_days)
        await self.nodes.admit(row)
        found = certs.read_details(certificate)
        log.info(
            "signed a certificate for joining node %s (serial %s, valid until %s)",
            name,
            found.serial_number,
            certificate_table.iso_time(found.not_after),
        )
        return apb.SignNodeCertificateResponse(
            certificate=certificate,
            certificate_authority=authority.trusted,
            name=self.name,
            url=members.advertised_url(self.node.config, secure=True),
        )
