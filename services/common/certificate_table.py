"""Rows of ``system.hdb_certificate``: the certificates a cluster knows, with their
details (Harper's columns). The table replicates like any other; it never holds a private
key, only the name of the file a node keeps it in.

A row::

    {"name": "server-one", "certificate": "-----BEGIN CERTIFICATE-----...",
     "issuer": "CN=Shoal-Certificate-Authority", "subject": "CN=server-one",
     "subject_alternative_names": ["DNS:server-one"], "serial_number": "5F1A...",
     "valid_from": "2025-01-01T00:00:00Z", "valid_to": "2026-02-03T00:00:00Z",
     "uses": ["serverAuth", "clientAuth"], "is_authority": false,
     "is_self_signed": false, "private_key_name": "keys/node.key", "node_name": "server-one",
     "details": {"issuer": ..., "subject": ..., "subject_alt_name": "DNS:server-one",
                 "serial_number": ..., "valid_from": ..., "valid_to": ...}}

``private_key_name`` and ``node_name`` say which node holds the private key and in which
file (relative to that node's rootPath); both are null when no node holds it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from shoal.storage.v1 import types_pb2

from services.common import certs
from services.common.certs import CertificateDetails
from services.common.config import ShoalConfig

DATABASE = "system"
TABLE = "hdb_certificate"
PRIMARY_KEY = "name"
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 ._:@-]{0,198}[A-Za-z0-9._:@-])?$")
NAME_RULE = (
    "1 to 200 letters, digits, spaces, '.', '_', ':', '@' or '-', starting with a letter"
    " or digit and not ending with a space"
)

Row = dict[str, Any]


def valid_name(name: str) -> bool:
    """True for a certificate name that is also safe as a file name."""
    return bool(NAME_RE.match(name)) and ".." not in name


def iso_time(moment: dt.datetime) -> str:
    """A UTC time as ISO 8601 with a Z, to the second."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_row(
    name: str,
    certificate_pem: str,
    details: CertificateDetails,
    private_key_name: str | None = None,
    node_name: str | None = None,
) -> Row:
    """The row of a certificate."""
    valid_from, valid_to = iso_time(details.not_before), iso_time(details.not_after)
    return {
        PRIMARY_KEY: name,
        "certificate": certificate_pem,
        "issuer": details.issuer,
        "subject": details.subject,
        "subject_alternative_names": list(details.subject_alternative_names),
        "serial_number": details.serial_number,
        "valid_from": valid_from,
        "valid_to": valid_to,
        "uses": list(details.uses),
        "is_authority": details.is_authority,
        "is_self_signed": details.is_self_signed,
        "private_key_name": private_key_name,
        "node_name": node_name if private_key_name else None,
        "details": {
            "issuer": details.issuer,
            "subject": details.subject,
            "subject_alt_name": ", ".join(details.subject_alternative_names),
            "serial_number": details.serial_number,
            "valid_from": valid_from,
            "valid_to": valid_to,
        },
    }


def live_rows(rows: Iterable[types_pb2.SnapshotRow]) -> dict[str, Row]:
    """The certificates (by name) among snapshot rows of the table; tombstones skipped."""
    live: dict[str, Row] = {}
    for row in rows:
        name = orjson.loads(row.id)
        doc = orjson.loads(row.state)[3]
        if isinstance(name, str) and isinstance(doc, dict) and doc:
            live[name] = doc
    return live


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _resolve(config: ShoalConfig, path: Path) -> Path:
    return path if path.is_absolute() else config.root_path / path


def node_certificate_rows(config: ShoalConfig) -> list[Row]:
    """The rows describing this node's configured certificates (none without ``tls.*``)."""
    tls = config.tls
    if tls.certificate is None:
        return []
    chain = x509.load_pem_x509_certificates(_resolve(config, tls.certificate).read_bytes())
    node_name = config.node_name
    rows = [
        to_row(
            node_name,
            _pem(chain[0]),
            certs.details(chain[0]),
            str(tls.private_key) if tls.private_key else None,
            node_name,
        )
    ]
    if tls.certificate_authority is not None:
        ca_pem = _resolve(config, tls.certificate_authority).read_bytes()
        for authority in x509.load_pem_x509_certificates(ca_pem):
            details = certs.details(authority)
            name = details.common_name or f"ca-{details.serial_number}"
            if name == node_name or not valid_name(name):
                name = f"ca-{details.serial_number}"
            rows.append(to_row(name, _pem(authority), details))
    return rows
