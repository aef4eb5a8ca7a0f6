"""Harper's HTTP form of the operations API (``operationsApi.network.httpPort``): POST /
with a JSON body, Harper's status codes and ``{"error": ...}`` bodies, Basic and Bearer
(operation token) authorization, TLS like the admin port; real node processes."""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from shoal.storage.v1 import storage_pb2 as spb

from services.common.auth import bearer_metadata
from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority
from tests.harness.client import StorageClient
from tests.harness.node import PASSWORD, Node

ALL = ("storage", "replicator", "admin")
HTTP_PORT = 9924


def basic(username: str = "admin", password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class Http:
    """A client of a node's operations API over HTTP, as curl would send it."""

    def __init__(self, node: Node, context: ssl.SSLContext | None = None) -> None:
        self.node = node
        self.context = context

    def connection(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(
                self.node.host, HTTP_PORT, context=self.context, timeout=30
            )
        return http.client.HTTPConnection(self.node.host, HTTP_PORT, timeout=30)

    def raw(
        self,
        body: bytes,
        authorization: str | None = basic(),
        method: str = "POST",
        path: str = "/",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, parsed JSON body, headers)."""
        sent = {"Content-Type": "application/json", **(headers or {})}
        if authorization is not None:
            sent["Authorization"] = authorization
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()
        assert answer_headers.get("content-type", "").startswith("application/json"), data
        return response.status, orjson.loads(data), answer_headers

    def post(
        self, operation: dict[str, Any], authorization: str | None = basic()
    ) -> tuple[int, Any]:
        status, body, _ = self.raw(orjson.dumps(operation), authorization)
        return status, body


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    return make_node(services=ALL)


@pytest.fixture
def http_client(node: Node) -> Http:
    return Http(node)


def test_harper_request_and_answer_with_basic(http_client: Http) -> None:
    status, body = http_client.post({"operation": "create_database", "database": "dev"})
    assert (status, body) == (200, {"message": "database 'dev' successfully created"})
    status, _ = http_client.post(
        {"operation": "create_table", "database": "dev", "table": "dog", "primary_key": "id"}
    )
    assert status == 200
    status, body = http_client.post(
        {"operation": "insert", "database": "dev", "table": "dog", "records": [{"id": 1}]}
    )
    assert status == 200 and body["inserted_hashes"] == [1]
    status, body = http_client.post(
        {
            "operation": "search_by_id",
            "database": "dev",
            "table": "dog",
            "ids": [1],
            "get_attributes": ["id"],
        }
    )
    assert (status, body) == (200, [{"id": 1}])
    status, body = http_client.post({"operation": "describe_all"})
    assert status == 200 and isinstance(body, dict) and "dev" in body


def test_credentials_and_their_status_codes(node: Node, http_client: Http) -> None:
    status, body = http_client.post({"operation": "describe_all"}, authorization=None)
    assert (status, body) == (401, {"error": "Must login"})
    status, body = http_client.post({"operation": "describe_all"}, basic("admin", "wrong"))
    assert (status, body) == (401, {"error": "Login failed"})
    status, body = http_client.post({"operation": "describe_all"}, basic("nobody", "x"))
    assert (status, body) == (401, {"error": "Login failed"})
    # A user without the right: 403.
    http_client.post(
        {"operation": "add_role", "role": "reader", "permission": {"super_user": False}}
    )
    status, _ = http_client.post(
        {"operation": "add_user", "username": "ann", "password": "pw-ann", "role": "reader"}
    )
    assert status == 200
    status, body = http_client.post({"operation": "cluster_status"}, basic("ann", "pw-ann"))
    assert status == 403 and isinstance(body["error"], str)


def test_errors_in_harper_form(http_client: Http) -> None:
    status, body = http_client.post({"operation": "no_such_thing"})
    assert (status, body) == (400, {"error": "Operation 'no_such_thing' not found"})
    status, body = http_client.post({"operation": "describe_database", "database": "nope"})
    assert (status, body) == (404, {"error": "Database 'nope' does not exist"})
    http_client.post({"operation": "create_database", "database": "dev"})
    status, body = http_client.post(
        {"operation": "describe_table", "database": "dev", "table": "t"}
    )
    assert (status, body) == (404, {"error": "Table 'dev.t' does not exist"})
    status, body = http_client.post({"operation": "create_database", "database": "dev"})
    assert status == 409 and set(body) == {"error"}
    status, body = http_client.post(
        {"operation": "add_user", "username": "admin", "password": "x", "role": "super_user"}
    )
    assert (status, body) == (409, {"error": "User admin already exists"})


def test_malformed_requests(node: Node, http_client: Http) -> None:
    status, body, _ = http_client.raw(b"{not json")
    assert status == 400 and body["error"].startswith("the operation is refused")
    status, body, _ = http_client.raw(b"[1, 2]")
    assert status == 400 and body == {"error": "the operation must be a JSON object"}
    status, body, headers = http_client.raw(b"{}", method="GET")
    assert status == 405 and headers["allow"] == "POST" and "error" in body
    status, body, _ = http_client.raw(b"{}", path="/elsewhere")
    assert status == 404 and "error" in body
    limit = 16 * 1024 * 1024  # storage.maxMessageBytes
    big = b'{"operation": "describe_all", "pad": "' + b"x" * limit + b'"}'
    status, body, _ = http_client.raw(big)
    assert status == 413 and "storage.maxMessageBytes" in body["error"]


def test_closed_when_null(make_node: MakeNode) -> None:
    node = make_node(services=ALL, config={"operationsApi": {"network": {"httpPort": None}}})
    with pytest.raises(ConnectionRefusedError):
        Http(node).post({"operation": "describe_all"})


def test_tls_like_the_admin_port(make_node: MakeNode, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    host = next_address()
    tls = ca.write_node_files(tmp_path / "tls", host, [host])
    node = make_node(host=host, services=ALL, config={"tls": tls})
    context = ssl.create_default_context(cadata=ca.pem.decode())
    status, body = Http(node, context).post({"operation": "user_info"})
    assert status == 200 and body["username"] == "admin"
    # Plaintext to the TLS port: no answer in the clear.
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        Http(node).post({"operation": "user_info"})
    # New certificate files: the next connection gets the new certificate, no restart.
    first = served_certificate(node, context)
    key, certificate = ca.issue(host, [host])
    replace_file(Path(tls["privateKey"]), key)
    replace_file(Path(tls["certificate"]), certificate)
    assert served_certificate(node, context) == x509.load_pem_x509_certificate(certificate)
    assert served_certificate(node, context) != first
    assert Http(node, context).post({"operation": "user_info"})[0] == 200


def served_certificate(node: Node, context: ssl.SSLContext) -> x509.Certificate:
    connection = http.client.HTTPSConnection(node.host, HTTP_PORT, context=context, timeout=30)
    try:
        connection.connect()
        assert isinstance(connection.sock, ssl.SSLSocket)
        der = connection.sock.getpeercert(binary_form=True)
    finally:
        connection.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def replace_file(path: Path, data: bytes) -> None:
    spare = path.with_suffix(".new")
    spare.write_bytes(data)
    spare.chmod(0o600)
    os.replace(spare, path)


def test_client_certificates_like_the_admin_port(make_node: MakeNode, tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    host = next_address()
    tls = ca.write_node_files(tmp_path / "tls", host, [host])
    node = make_node(
        host=host, services=ALL, config={"tls": tls, "operationsApi": {"mtls": {"required": True}}}
    )

    def client(common_name: str | None) -> Http:
        context = ssl.create_default_context(cadata=ca.pem.decode())
        if common_name is not None:
            key, certificate = ca.issue(common_name, [common_name])
            (tmp_path / f"{common_name}.key").write_bytes(key)
            (tmp_path / f"{common_name}.crt").write_bytes(certificate)
            context.load_cert_chain(
                tmp_path / f"{common_name}.crt", tmp_path / f"{common_name}.key"
            )
        return Http(node, context)

    # The certificate's user, without a password; a password still wins.
    status, body = client("admin").post({"operation": "user_info"}, authorization=None)
    assert status == 200 and body["username"] == "admin"
    status, body = client("admin").post({"operation": "user_info"}, basic("admin", "wrong"))
    assert (status, body) == (401, {"error": "Login failed"})
    status, body = client("nobody").post({"operation": "user_info"}, authorization=None)
    assert status == 401 and "nobody" in body["error"]
    # No certificate: no TLS session, no answer.
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client(None).post({"operation": "user_info"}, authorization=None)


def test_tokens_as_harper_documents_them(node: Node, http_client: Http) -> None:
    # No Authorization header: the body's credentials.
    status, tokens = http_client.post(
        {"operation": "create_authentication_tokens", "username": "admin", "password": PASSWORD},
        authorization=None,
    )
    assert status == 200 and set(tokens) == {"operation_token", "refresh_token"}
    assert all(isinstance(t, str) and t.count(".") == 2 for t in tokens.values())
    operation = "Bearer " + tokens["operation_token"]
    status, body = http_client.post({"operation": "user_info"}, operation)
    assert status == 200 and body["username"] == "admin"
    # The refresh token buys an operation token, as the Bearer (Harper's form) or in the body.
    status, body = http_client.post(
        {"operation": "refresh_operation_token"}, "Bearer " + tokens["refresh_token"]
    )
    assert status == 200 and set(body) == {"operation_token"}
    status, body = http_client.post({"operation": "user_info"}, "Bearer " + body["operation_token"])
    assert status == 200 and body["username"] == "admin"
    status, body = http_client.post(
        {"operation": "refresh_operation_token", "refresh_token": tokens["refresh_token"]},
        authorization=None,
    )
    assert status == 200 and set(body) == {"operation_token"}
    # Neither token stands for the other.
    status, body = http_client.post(
        {"operation": "describe_all"}, "Bearer " + tokens["refresh_token"]
    )
    assert (status, body) == (401, {"error": "invalid token"})
    status, body = http_client.post(
        {"operation": "refresh_operation_token"}, "Bearer " + tokens["operation_token"]
    )
    assert (status, body) == (401, {"error": "invalid token"})
    # A wrong password, an altered token, no credentials at all.
    status, body = http_client.post(
        {"operation": "create_authentication_tokens", "username": "admin", "password": "no"},
        authorization=None,
    )
    assert (status, body) == (401, {"error": "Login failed"})
    altered = tokens["operation_token"][:-2] + (
        "AA" if not tokens["operation_token"].endswith("AA") else "BB"
    )
    status, body = http_client.post({"operation": "user_info"}, "Bearer " + altered)
    assert (status, body) == (401, {"error": "invalid token"})
    status, body = http_client.post({"operation": "create_authentication_tokens"}, None)
    assert (status, body) == (401, {"error": "Must login"})
    # The caller's own tokens, for a caller signed in another way.
    status, body = http_client.post({"operation": "create_authentication_tokens"})
    assert status == 200 and set(body) == {"operation_token", "refresh_token"}


def test_tokens_over_grpc_and_their_end(node: Node, http_client: Http) -> None:
    admin = node.admin()
    admin.ok({"operation": "add_role", "role": "reader", "permission": {"super_user": False}})
    admin.ok({"operation": "add_user", "username": "bob", "password": "pw-bob", "role": "reader"})
    tokens = admin.ok(
        {"operation": "create_authentication_tokens", "username": "bob", "password": "pw-bob"}
    )
    bearer = "Bearer " + tokens["operation_token"]
    # On the storage port and the admin port, as gRPC metadata.
    storage = StorageClient.bearer(
        node.storage_address, tokens["operation_token"], node.channel("storage")
    )
    assert storage.call("Authenticate", spb.AuthenticateRequest()).username == "bob"
    token_admin = node.admin()
    token_admin.metadata = bearer_metadata(tokens["operation_token"])
    assert token_admin.ok({"operation": "user_info"})["username"] == "bob"
    # A changed password ends the user's tokens, refresh tokens included.
    admin.ok({"operation": "alter_user", "username": "bob", "password": "pw-bob-2"})
    status, body = http_client.post({"operation": "user_info"}, bearer)
    assert (status, body) == (401, {"error": "invalid token"})
    status, body = http_client.post(
        {"operation": "refresh_operation_token"}, "Bearer " + tokens["refresh_token"]
    )
    assert (status, body) == (401, {"error": "invalid token"})
    # So does dropping the user.
    fresh = admin.ok(
        {"operation": "create_authentication_tokens", "username": "bob", "password": "pw-bob-2"}
    )
    assert (
        http_client.post({"operation": "user_info"}, "Bearer " + fresh["operation_token"])[0] == 200
    )
    admin.ok({"operation": "drop_user", "username": "bob"})
    status, body = http_client.post(
        {"operation": "user_info"}, "Bearer " + fresh["operation_token"]
    )
    assert (status, body) == (401, {"error": "invalid token"})
    storage.close()


def test_harpers_curl_examples_run_but_for_the_port(node: Node) -> None:
    """Harper's documented curl form, byte for byte but for the port."""

    def curl(*args: str) -> tuple[int, Any]:
        done = subprocess.run(
            ["curl", "-s", "-w", "\\n%{http_code}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        body, _, status = done.stdout.rpartition("\n")
        return int(status), orjson.loads(body)

    url = f"http://{node.host}:{HTTP_PORT}"
    status, body = curl(
        "--location", "--request", "POST", url,
        "--header", "Content-Type: application/json",
        "--header", f"Authorization: {basic()}",
        "--data-raw", '{"operation": "create_database", "database": "dev"}',
    )  # fmt: skip
    assert (status, body) == (200, {"message": "database 'dev' successfully created"})
    status, tokens = curl(
        "--location", "--request", "POST", url,
        "--header", "Content-Type: application/json",
        "--data-raw", orjson.dumps(
            {"operation": "create_authentication_tokens", "username": "admin", "password": PASSWORD}
        ).decode(),
    )  # fmt: skip
    assert status == 200
    status, body = curl(
        "-X", "POST", url,
        "-H", "Content-Type: application/json",
        "-H", f"Authorization: Bearer {tokens['operation_token']}",
        "-d", '{"operation": "describe_all"}',
    )  # fmt: skip
    assert status == 200 and "dev" in body
    status, body = curl(
        "-X", "POST", url,
        "-H", "Content-Type: application/json",
        "-H", f"Authorization: Bearer {tokens['refresh_token']}",
        "-d", '{"operation": "refresh_operation_token"}',
    )  # fmt: skip
    assert status == 200 and set(body) == {"operation_token"}
