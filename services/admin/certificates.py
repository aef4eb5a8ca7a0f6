"""Certificate operations: add, list and remove the rows of ``system.hdb_certificate``.

The table (services/common/certificate_table.py) replicates like any other and never
holds a private key: a key given with ``add_certificate`` goes to a file of this node only
its owner can read (``<rootPath>/keys/certificates/<name>.key``), and the row names it.
Everything is validated before anything is written; the key file is written before the
row and removed again when the row cannot be written. Rows are written with the
node-internal identity (the ``system`` database is reserved) after the caller was checked
to be a super user. The certificates this node's ``tls.*`` uses are recorded by storage
at start and cannot be replaced or removed here (replace the files and restart).

The typed RPCs and Execute both call ``Certificates``; a lock serializes changes made
through this node.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from google.protobuf import timestamp_pb2
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.node import AdminNode
from services.common import certificate_table as table
from services.common import certs
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

KEYS_FOLDER = "certificates"


@dataclass(frozen=True)
class NewCertificate:
    """An add_certificate request."""

    name: str
    certificate: str
    private_key: str = ""
    is_authority: bool | None = None


def check_name(name: str) -> None:
    if not table.valid_name(name):
        raise InvalidArgument(f"invalid certificate name {name!r}: {table.NAME_RULE}")


def _timestamp(text: object) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if isinstance(text, str):
        stamp.FromDatetime(datetime.fromisoformat(text))
    return stamp


def certificate_message(row: table.Row) -> apb.Certificate:
    """The typed form of a row."""

    def text(column: str) -> str:
        value = row.get(column)
        return value if isinstance(value, str) else ""

    def texts(column: str) -> list[str]:
        value = row.get(column)
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    return apb.Certificate(
        name=text(table.PRIMARY_KEY),
        certificate=text("certificate"),
        issuer=text("issuer"),
        subject=text("subject"),
        subject_alternative_names=texts("subject_alternative_names"),
        serial_number=text("serial_number"),
        valid_from=_timestamp(row.get("valid_from")),
        valid_to=_timestamp(row.get("valid_to")),
        uses=texts("uses"),
        is_authority=row.get("is_authority") is True,
        is_self_signed=row.get("is_self_signed") is True,
        private_key_name=text("private_key_name"),
        node_name=text("node_name"),
    )


class Certificates:
    """Certificate operations of one node."""

    def __init__(self, node: AdminNode) -> None:
        self.node = node
        self.name = node.config.node_name
        self.root = node.config.root_path
        self.keys = node.config.keys_path / KEYS_FOLDER
        self._lock = asyncio.Lock()

    def key_path(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def _in_use(self) -> set[str]:
        """Names of the certificates this node's tls.* uses (recorded by storage)."""
        try:
            return {
                str(r[table.PRIMARY_KEY]) for r in table.node_certificate_rows(self.node.config)
            }
        except (OSError, ValueError):
            return set()

    async def read(self) -> dict[str, table.Row]:
        """The table's certificates, by name."""
        request = spb.SnapshotRequest(database=table.DATABASE, tables=[table.TABLE])
        chunks = await self.node.stream(
            self.node.storage_node.Snapshot, request, self.node.internal
        )
        return table.live_rows(r for c in chunks for r in c.rows)

    async def list(self) -> list[table.Row]:
        return [row for _, row in sorted((await self.read()).items())]

    def _validated(self, new: NewCertificate) -> tuple[table.Row, bytes | None]:
        check_name(new.name)
        if new.name in self._in_use():
            raise FailedPrecondition(
                f"certificate {new.name!r} is the one this node's tls.* configuration uses;"
                " replace its files and restart the node instead"
            )
        try:
            parsed = certs.read_pem_certificate(new.certificate.encode())
        except certs.CertificateError as exc:
            raise InvalidArgument(f"certificate: {exc}") from exc
        details = certs.details(parsed)
        if new.is_authority is not None and new.is_authority != details.is_authority:
            raise InvalidArgument(
                "is_authority is true but the certificate is not a certificate authority"
                if new.is_authority
                else "is_authority is false but the certificate is a certificate authority"
            )
        key_pem: bytes | None = None
        if new.private_key:
            try:
                key = certs.load_private_key(new.private_key.encode())
            except certs.CertificateError as exc:
                raise InvalidArgument(f"private_key: {exc}") from exc
            if not certs.key_matches(key, parsed):
                raise InvalidArgument("private_key does not belong to the certificate")
            key_pem = new.private_key.encode()
        pem = parsed.public_bytes(serialization.Encoding.PEM).decode()
        key_name = str(self.key_path(new.name).relative_to(self.root)) if key_pem else None
        return table.to_row(new.name, pem, details, key_name, self.name), key_pem

    async def add(self, new: NewCertificate) -> table.Row:
        row, key_pem = self._validated(new)
        key_path = self.key_path(new.name)
        async with self._lock:
            old_key = key_path.read_bytes() if key_path.exists() else None
            if key_pem is not None:
                certs.write_private_key(key_path, key_pem)
            try:
                await self._write(row)
            except BaseException:
                if key_pem is not None:
                    if old_key is None:
                        key_path.unlink(missing_ok=True)
                    else:
                        certs.write_private_key(key_path, old_key)
                raise
            if key_pem is None and old_key is not None:
                key_path.unlink(missing_ok=True)  # the key of the certificate replaced
        return row

    async def remove(self, name: str) -> table.Row:
        check_name(name)
        if name in self._in_use():
            raise FailedPrecondition(
                f"certificate {name!r} is the one this node's tls.* configuration uses;"
                " replace its files and restart the node instead"
            )
        async with self._lock:
            current = await self.read()
            row = current.get(name)
            if row is None:
                raise NotFound(f"no certificate named {name!r}")
            request = spb.DeleteRequest(
                database=table.DATABASE, table=table.TABLE, ids=[orjson.dumps(name)]
            )
            await self.node.call(self.node.storage.Delete, request, self.node.internal)
            self.key_path(name).unlink(missing_ok=True)
        return row

    async def _write(self, row: table.Row) -> None:
        # A whole replacement (not a merge): columns of an earlier certificate of the
        # same name must not survive.
        request = spb.UpsertRequest(
            database=table.DATABASE, table=table.TABLE, records=[orjson.dumps(row)]
        )
        await self.node.call(self.node.storage.Upsert, request, self.node.internal)
