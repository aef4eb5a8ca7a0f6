"""A node whose own certificate is expired or not yet valid says so: every service that
serves TLS logs a warning at start naming the file, the validity window and what fails,
and again when its certificate files change to such a certificate."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

import pytest

from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority, serial_of
from tests.harness.cluster import FAST_REPLICATION
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

SERVICES = ("storage", "replicator", "admin")
PORTS = {"replicator": 9933, "storage": 9926, "admin": 9925}


def _log(root: Path, service: str) -> str:
    path = root / f"{service}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _touch_port(host: str, port: int) -> None:
    """Open a TLS connection to ``port`` (whatever it serves): the server reads its
    certificate files again for it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                pass
        except (ssl.SSLError, OSError):
            pass  # a refused handshake still made the server look at its files


def test_an_expired_certificate_is_warned_of_at_start_and_on_change(
    make_node: MakeNode, tmp_path: Path
) -> None:
    ca = CertificateAuthority.create()
    host = next_address()
    tls_dir = tmp_path / host / "tls"
    tls = ca.write_node_files(tls_dir, host, [host])
    now = dt.datetime.now(dt.UTC)
    key, expired = ca.issue(
        host, [host], valid_from=now - dt.timedelta(days=3), valid_until=now - dt.timedelta(days=1)
    )
    (tls_dir / "node.key").write_bytes(key)
    (tls_dir / "node.crt").write_bytes(expired)
    node = make_node(
        name=host,
        host=host,
        services=SERVICES,
        config={"replication": {**FAST_REPLICATION, "routes": [], "gossip": False}, "tls": tls},
    )

    serial = serial_of(expired)
    for service in SERVICES:
        line = wait_for(
            lambda s=service: next(  # type: ignore[misc]
                (ln for ln in _log(node.root, s).splitlines() if "is expired" in ln), None
            ),
            20,
            f"{service} to warn of its expired certificate",
        )
        assert "WARNING" in line, line
        assert str(tls_dir / "node.crt") in line, line
        assert f"serial {serial}" in line, line
        assert f"CN={host}" in line, line
        window = (now - dt.timedelta(days=3)).strftime("%Y-%m-%d")
        assert f"valid from {window}" in line, line
        assert "refuse" in line, line

    # A valid certificate: no warning. Then one that is not yet valid: warned of on the
    # next connection to each port, without a restart.
    key, good = ca.issue(host, [host])
    (tls_dir / "node.key").write_bytes(key)
    (tls_dir / "node.crt").write_bytes(good)
    key, future = ca.issue(
        host, [host], valid_from=now + dt.timedelta(days=1), valid_until=now + dt.timedelta(days=3)
    )
    (tls_dir / "node.key").write_bytes(key)
    (tls_dir / "node.crt").write_bytes(future)
    for service in SERVICES:

        def warned(s: str = service) -> bool:
            _touch_port(host, PORTS[s])
            return f"serial {serial_of(future)}" in _log(node.root, s) and (
                "is not yet valid" in _log(node.root, s)
            )

        wait_for(warned, 20, f"{service} to warn of its not yet valid certificate")
    assert all(f"serial {serial_of(good)}, " not in _log(node.root, s) for s in SERVICES)
