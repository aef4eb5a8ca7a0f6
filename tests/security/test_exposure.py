"""What a node shows to anyone who reaches it without credentials: the metrics endpoints
(only /metrics, optionally over TLS with basic-auth users, on a chosen address) and the
RocksDB folder on disk (0700, files 0600)."""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import stat
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority
from tests.harness.node import Node

METRICS_PORT = 9941  # storage's


def _get(
    url: str,
    method: str = "GET",
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_metrics_answer_only_on_metrics(make_node: MakeNode) -> None:
    node = make_node()
    node.client().create_table("secret_db", "secret_table")
    base = f"http://{node.host}:{METRICS_PORT}"
    status, body = _get(f"{base}/metrics")
    assert status == 200 and b"shoal_build_info" in body
    for path in ("/", "/favicon.ico", "/metrics/", "/debug", "/metricsx", "/metrics/../x"):
        status, body = _get(base + path)
        assert status == 404, path
        assert b"secret_db" not in body and b"shoal_" not in body
    status, _ = _get(f"{base}/metrics", method="POST")
    assert status == 405
    # A query string is still the metrics path (Prometheus may send one).
    assert _get(f"{base}/metrics?name[]=x")[0] == 200


def _write_web_config(node: Node, tmp_path: Path, users: dict[str, str]) -> CertificateAuthority:
    ca = CertificateAuthority.create("Metrics Test CA")
    folder = tmp_path / "metrics-web"
    folder.mkdir()
    key, certificate = ca.issue(node.host, [node.host])
    (folder / "metrics.key").write_bytes(key)
    (folder / "metrics.crt").write_bytes(certificate)
    hashed = {
        name: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode() for name, pw in users.items()
    }
    web = {
        "tls_server_config": {"cert_file": "metrics.crt", "key_file": "metrics.key"},
        "basic_auth_users": hashed,
    }
    (folder / "web.yaml").write_text(yaml.safe_dump(web))
    return ca


def _basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_metrics_web_config_tls_basic_auth_and_bind_address(
    make_node: MakeNode, tmp_path: Path
) -> None:
    metrics_host = next_address()
    node = make_node(start=False)
    ca = _write_web_config(node, tmp_path, {"prometheus": "scrape-secret"})
    node.update_config(
        {
            "metrics": {
                "host": metrics_host,
                "webConfigFile": str(tmp_path / "metrics-web" / "web.yaml"),
            }
        }
    )
    # The certificate names the node's address; the endpoint listens on metrics.host.
    node.start()
    tls = ssl.create_default_context(cadata=ca.pem.decode())
    tls.check_hostname = False
    url = f"https://{metrics_host}:{METRICS_PORT}/metrics"

    # Not on the node's own address any more.
    with pytest.raises(OSError):
        http.client.HTTPConnection(node.host, METRICS_PORT, timeout=5).connect()
    # Plain HTTP is refused (the TLS server closes it or answers garbage).
    with pytest.raises((OSError, http.client.HTTPException)):
        connection = http.client.HTTPConnection(metrics_host, METRICS_PORT, timeout=5)
        connection.request("GET", "/metrics")
        reply = connection.getresponse()
        assert reply.status != 200
        raise OSError("answered plain HTTP without metrics")

    status, body = _get(url, context=tls)
    assert status == 401 and b"shoal_" not in body
    status, body = _get(url, context=tls, headers=_basic("prometheus", "wrong"))
    assert status == 401 and b"shoal_" not in body
    status, body = _get(url, context=tls, headers=_basic("nobody", "scrape-secret"))
    assert status == 401
    status, body = _get(url, context=tls, headers=_basic("prometheus", "scrape-secret"))
    assert status == 200 and b"shoal_build_info" in body
    # Cached or not, the right password keeps working and a wrong one keeps failing.
    assert _get(url, context=tls, headers=_basic("prometheus", "scrape-secret"))[0] == 200
    assert _get(url, context=tls, headers=_basic("prometheus", "scrape-secre"))[0] == 401
    # Other paths are 404 only once signed in; before, 401 (nothing is told).
    other = f"https://{metrics_host}:{METRICS_PORT}/"
    assert _get(other, context=tls, headers=_basic("prometheus", "scrape-secret"))[0] == 404


def test_a_bad_web_config_stops_the_node_naming_the_key(
    make_node: MakeNode, tmp_path: Path
) -> None:
    node = make_node(start=False)
    web = tmp_path / "web.yaml"
    web.write_text(
        yaml.safe_dump(
            {"tls_server_config": {"cert_file": "missing.crt"}, "basic_auth_users": {"p": "plain"}}
        )
    )
    node.update_config({"metrics": {"webConfigFile": str(web)}})
    node.start_service("storage", wait=False)
    assert node.processes["storage"].wait(timeout=30) != 0
    log = node.log_path("storage").read_text()
    assert "metrics.webConfigFile" in log
    assert "tls_server_config.cert_file" in log
    assert "tls_server_config.key_file" in log
    assert "basic_auth_users.p" in log and "plain" not in log.split("basic_auth_users.p")[1][:80]


def _modes(root: Path) -> tuple[set[int], set[int]]:
    folders, files = {stat.S_IMODE(root.stat().st_mode)}, set()
    for folder, names, entries in os.walk(root):
        folders |= {stat.S_IMODE((Path(folder) / n).stat().st_mode) for n in names}
        files |= {stat.S_IMODE((Path(folder) / n).lstat().st_mode) for n in entries}
    return folders, files


def test_the_data_folder_is_private(make_node: MakeNode) -> None:
    node = make_node()
    client = node.client()
    client.create_table("dev", "dog")
    client.insert("dev", "dog", [{"id": i, "name": f"dog {i}"} for i in range(100)])
    database = Path(node.config["rootPath"]) / "database"
    folders, files = _modes(database)
    assert files and folders == {0o700} and files == {0o600}, (folders, files)

    # A folder left with loose modes (an older version, a copy) is fixed at start-up.
    node.stop()
    for folder, _, entries in os.walk(database):
        os.chmod(folder, 0o755)
        for name in entries:
            os.chmod(Path(folder) / name, 0o644)
    node.start()
    client = node.client()
    client.insert("dev", "dog", [{"id": 1000 + i} for i in range(100)])
    assert len(client.all_records("dev", "dog")) == 200
    folders, files = _modes(database)
    assert folders == {0o700} and files == {0o600}, (folders, files)
