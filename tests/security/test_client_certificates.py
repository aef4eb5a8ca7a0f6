"""Client certificates on the client ports (``storage.mtls``, ``operationsApi.mtls``): the
port requires a certificate from the node's CA, and a call without a password is the user
the certificate's common name names; real node processes, certificates made here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.admin import AdminClient
from tests.harness.certs import CertificateAuthority, self_signed
from tests.harness.client import StorageClient, expect_error
from tests.harness.node import PASSWORD, Node

ALL = ("storage", "replicator", "admin")
PORTS = ("storage", "admin")
REQUIRED = {"required": True}
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
READ_DOGS = {
    "super_user": False,
    "dev": {"tables": {"dog": {"read": True, "insert": False, "update": False, "delete": False}}},
}

KeyPair = tuple[bytes, bytes] | None  # (key PEM, certificate PEM), None: no certificate


def _start(
    make_node: MakeNode,
    tmp_path: Path,
    ca: CertificateAuthority,
    extra: dict[str, Any],
    crl: Path | None = None,
) -> Node:
    """A node with every service and certificates of ``ca`` (``tls.*``), plus ``extra``."""
    host = next_address()
    tls: dict[str, Any] = ca.write_node_files(tmp_path / f"tls-{host}", host, [host])
    if crl is not None:
        tls["crl"] = str(crl)
    return make_node(host=host, services=ALL, config={"tls": tls, **extra})


@contextmanager
def _channel(node: Node, service: str, pair: KeyPair) -> Iterator[grpc.Channel]:
    key, certificate = pair if pair is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(node.ca_pem(), key, certificate)
    with grpc.secure_channel(node.address_of(service), credentials) as channel:
        yield channel


@contextmanager
def _storage(
    node: Node, pair: KeyPair, user: str | None = None, password: str = PASSWORD
) -> Iterator[StorageClient]:
    """A storage client presenting ``pair``, signing in as ``user`` (None: no password)."""
    with _channel(node, "storage", pair) as channel:
        client = StorageClient.basic(node.storage_address, user or "-", password, channel)
        if user is None:
            client.metadata = ()
        yield client


@contextmanager
def _admin(
    node: Node, pair: KeyPair, user: str | None = None, password: str = PASSWORD
) -> Iterator[AdminClient]:
    """An admin client presenting ``pair``, signing in as ``user`` (None: no password)."""
    with _channel(node, "admin", pair) as channel:
        client = AdminClient(node.address_of("admin"), user or "-", password, channel)
        if user is None:
            client.metadata = ()
        yield client


def _read_dog(node: Node, service: str, pair: KeyPair, user: str | None = None) -> Any:
    if service == "storage":
        with _storage(node, pair, user) as client:
            return client.get("dev", "dog", [1], ["id", "name"])
    with _admin(node, pair, user) as admin:
        return admin.ok(
            {
                "operation": "search_by_id",
                "database": "dev",
                "table": "dog",
                "ids": [1],
                "get_attributes": ["id", "name"],  # not the record timestamps
            }
        )


def _calls(node: Node, pair: KeyPair, user: str | None = None) -> dict[str, Callable[[], Any]]:
    """One authenticated call per port, presenting ``pair``."""
    return {service: partial(_read_dog, node, service, pair, user) for service in PORTS}


def _prepare_data(node: Node, admin_pair: KeyPair) -> None:
    """A table dog with one record, a role that may only read it, and the user ann."""
    with _admin(node, admin_pair, "admin") as admin:
        admin.ok({"operation": "create_table", "database": "dev", "table": "dog"})
        admin.ok({"operation": "insert", "database": "dev", "table": "dog", "records": [
            {"id": 1, "name": "Penny"}
        ]})  # fmt: skip
        admin.ok({"operation": "add_role", "role": "reader", "permission": READ_DOGS})
        admin.ok({"operation": "add_user", "username": "ann", "password": "pw", "role": "reader"})


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("Shoal Client Test CA")


def test_mtls_off_needs_no_certificate_and_ignores_one(
    make_node: MakeNode, tmp_path: Path, ca: CertificateAuthority
) -> None:
    node = _start(make_node, tmp_path, ca, {})
    admin_pair = ca.issue("admin", ["admin"])
    _prepare_data(node, None)  # no certificate needed: the password is enough
    for service, call in _calls(node, None, "admin").items():
        assert call() == [{"id": 1, "name": "Penny"}], service
    # A certificate naming the super user is not asked for, so it names nobody.
    for call in _calls(node, admin_pair).values():
        expect_error(grpc.StatusCode.UNAUTHENTICATED, call, "Must login")


def test_a_certificate_signs_in_its_common_name(
    make_node: MakeNode, tmp_path: Path, ca: CertificateAuthority
) -> None:
    node = _start(
        make_node,
        tmp_path,
        ca,
        {"storage": {"mtls": REQUIRED}, "operationsApi": {"mtls": REQUIRED}},
    )
    admin_pair, ann_pair = ca.issue("admin", ["admin"]), ca.issue("ann", ["ann"])
    _prepare_data(node, admin_pair)  # certificate and password: the password's user

    # ann's certificate, no password: ann, who may read dogs and nothing else.
    for service, call in _calls(node, ann_pair).items():
        assert call() == [{"id": 1, "name": "Penny"}], service
    with _storage(node, ann_pair) as ann:
        expect_error(
            grpc.StatusCode.PERMISSION_DENIED,
            lambda: ann.insert("dev", "dog", [{"id": 2}]),
            "ann",
        )
        expect_error(grpc.StatusCode.PERMISSION_DENIED, lambda: ann.create_table("dev", "cat"))
    with _admin(node, ann_pair) as ann_admin:
        assert ann_admin.ok({"operation": "user_info"})["username"] == "ann"
        result, code = ann_admin.execute(
            {"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 2}]}
        )
        assert code == PERMISSION_DENIED and "ann" in result["reason"]
        result, code = ann_admin.execute({"operation": "cluster_status"})
        assert code == PERMISSION_DENIED and "super user" in result["reason"]
    with _storage(node, admin_pair, "admin") as admin:
        assert admin.get("dev", "dog", [2]) == []  # the refused inserts changed nothing

    # The header wins: ann's certificate with the admin's password is the admin.
    with _storage(node, ann_pair, "admin") as admin_on_ann:
        admin_on_ann.insert("dev", "dog", [{"id": 3}])
    # The admin's certificate alone: a super user on both ports, and the node's own
    # processes (which present the node's certificate) still reach storage.
    with _admin(node, admin_pair) as admin:
        admin.ok({"operation": "insert", "database": "dev", "table": "dog", "records": [
            {"id": 4}
        ]})  # fmt: skip
        assert admin.ok({"operation": "cluster_status"})["node_name"] == node.name
        # The node secret never leaves the node: members would need the caller's password.
        result, code = admin.execute(
            {"operation": "restart", "services": ["replicator"], "replicated": True}
        )
        assert code == FAILED_PRECONDITION and "client certificate" in result["error"]
    with _storage(node, admin_pair) as admin_storage:
        assert [r["id"] for r in admin_storage.get("dev", "dog", [3, 4])] == [3, 4]

    # Only the node's own services may act for a user.
    with _storage(node, ann_pair, "ann", "pw") as ann_signed_in:
        ann_signed_in.metadata = (*ann_signed_in.metadata, ("shoal-acting-for", "admin"))
        expect_error(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: ann_signed_in.get("dev", "dog", [1]),
            "only for this node's own services",
        )

    # A certificate for a user that does not exist, or is not active: UNAUTHENTICATED.
    for call in _calls(node, ca.issue("nobody", ["nobody"])).values():
        expect_error(grpc.StatusCode.UNAUTHENTICATED, call, "no user 'nobody'")
    with _admin(node, admin_pair) as admin:
        admin.ok({"operation": "alter_user", "username": "ann", "active": False})
    for call in _calls(node, ann_pair).values():
        expect_error(grpc.StatusCode.UNAUTHENTICATED, call, "'ann'", "not active")


def test_a_required_certificate_is_checked_in_the_handshake(
    make_node: MakeNode, tmp_path: Path, ca: CertificateAuthority
) -> None:
    node = _start(
        make_node,
        tmp_path,
        ca,
        {"storage": {"mtls": REQUIRED}, "operationsApi": {"mtls": REQUIRED}},
    )
    other = CertificateAuthority.create("Another CA")
    refused: list[KeyPair] = [
        None,
        other.issue("admin", ["admin"]),
        self_signed("admin", ["admin"]),
    ]
    for pair in refused:
        # A password is not enough: without a certificate of the node's CA the
        # connection ends in the TLS handshake, before any call.
        for call in _calls(node, pair, "admin").values():
            expect_error(grpc.StatusCode.UNAVAILABLE, call)
    admin_pair = ca.issue("admin", ["admin"])
    _prepare_data(node, admin_pair)
    for service, call in _calls(node, admin_pair, "admin").items():
        assert call() == [{"id": 1, "name": "Penny"}], service


def test_a_certificate_only_gates_with_user_null_and_crls_apply(
    make_node: MakeNode, tmp_path: Path, ca: CertificateAuthority
) -> None:
    gate = {"required": True, "user": None}
    good, revoked = ca.issue("admin", ["admin"]), ca.issue("admin", ["admin"])
    crl = tmp_path / "clients.crl"
    crl.write_bytes(ca.crl([revoked[1]]))
    node = _start(
        make_node,
        tmp_path,
        ca,
        {"storage": {"mtls": gate}, "operationsApi": {"mtls": gate}},
        crl=crl,
    )
    _prepare_data(node, good)
    # The certificate lets the connection in; the user still signs in.
    for call in _calls(node, good).values():
        expect_error(grpc.StatusCode.UNAUTHENTICATED, call, "Must login")
    for service, call in _calls(node, good, "admin").items():
        assert call() == [{"id": 1, "name": "Penny"}], service
    # A certificate revoked by a CRL of tls.crl is refused, password or not.
    for call in _calls(node, revoked, "admin").values():
        expect_error(grpc.StatusCode.UNAUTHENTICATED, call, "revoked", "tls.crl")
