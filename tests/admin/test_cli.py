"""The `shoal` command line end to end, as a user runs it: real processes, real nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from services.common.config import DEFAULT_HEALTH_ADMIN_PORT
from services.local import healthy
from tests.conftest import MakeNode
from tests.harness.addresses import next_address
from tests.harness.client import StorageClient
from tests.harness.node import PASSWORD, Node
from tests.harness.wait import WaitTimeout, wait_for

ALL = ("storage", "replicator", "admin")
INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, UNAUTHENTICATED = 3, 5, 6, 16


def shoal(*args: str, password: str = PASSWORD, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": password}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        **kwargs,
    )


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    return make_node(services=ALL, config={"replication": {"gossip": True}})


def test_operations_users_and_exit_codes(node: Node) -> None:
    host = node.host
    done = shoal("op", "--node", host, '{"operation": "create_table", "table": "dog"}')
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["message"].startswith("table 'data.dog'")
    bad = shoal("op", "--node", host, "{not json")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    # An error answer: its JSON body on stdout, as the node sent it; its code as the status.
    missing = shoal("op", "--node", host, '{"operation": "describe_database", "database": "no"}')
    assert missing.returncode == NOT_FOUND
    assert missing.stdout == '{"error":"Database \'no\' does not exist"}\n'
    unknown = shoal("op", "--node", host, '{"operation": "nope"}')
    assert unknown.returncode == INVALID_ARGUMENT
    assert orjson.loads(unknown.stdout) == {"error": "Operation 'nope' not found"}
    refused = shoal("op", "--node", host, '{"operation": "user_info"}', password="wrong")
    assert refused.returncode == UNAUTHENTICATED
    assert orjson.loads(refused.stdout) == {"error": "Login failed"}
    denied = shoal("cluster", "status", "--node", host, password="wrong-password")
    assert denied.returncode == UNAUTHENTICATED and "UNAUTHENTICATED" in denied.stderr

    added = shoal(
        "user", "add", "reader", "--role", "super_user", "--new-password", "s3cret-pw",
        "--node", host,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = shoal("user", "list", "--node", host, "-o", "json")
    users = {u["username"]: u["role"] for u in orjson.loads(listed.stdout)}
    assert users == {"admin": "super_user", "reader": "super_user"}
    table = shoal("user", "list", "--node", host)
    assert "reader" in table.stdout and "super_user" in table.stdout
    again = shoal(
        "user", "add", "reader", "--role", "super_user", "--new-password", "x-123456",
        "--node", host,
    )  # fmt: skip
    assert again.returncode == ALREADY_EXISTS and "reader" in again.stderr
    assert shoal("user", "alter", "reader", "--inactive", "--node", host).returncode == 0
    listed = orjson.loads(shoal("user", "list", "--node", host, "-o", "json").stdout)
    assert {u["username"]: u["active"] for u in listed} == {"admin": True, "reader": False}
    assert shoal("user", "alter", "reader", "--node", host).returncode == 2
    assert shoal("user", "drop", "reader", "--node", host).returncode == 0

    nodes = shoal("cluster", "nodes", "--node", host, "-o", "json")
    assert [n["name"] for n in orjson.loads(nodes.stdout)] == [node.name]
    itself = shoal("cluster", "add-node", node.name, "--node", host)
    assert itself.returncode == 3 and "this node itself" in itself.stderr


@pytest.fixture
def clone_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Clone processes started by a test: always stopped (with their node's services)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def test_node_clone_copies_configuration_schema_and_data(
    node: Node, tmp_path: Path, clone_process: list[subprocess.Popen[bytes]]
) -> None:
    client = node.client()
    client.create_table("dev", "dog", indexed=["breed"])
    for start in range(0, 3000, 500):
        client.insert(
            "dev", "dog", [{"id": i, "breed": f"b{i % 7}"} for i in range(start, start + 500)]
        )
    target = next_address()
    folder = tmp_path / "clone"
    log = (tmp_path / "clone.log").open("wb")
    env = {**os.environ, "SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": PASSWORD}
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "services.cli", "node", "clone", "--from", node.host),
            *("--hostname", target, "--data", str(folder), "--timeout", "150"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    clone_process.append(process)
    output = tmp_path / "clone.log"
    try:
        wait_for(
            lambda: "caught up" in output.read_text() or process.poll() is not None,
            180,
            "the clone to catch up",
        )
    except WaitTimeout:
        logs = "".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in folder.glob("*.log"))
        raise AssertionError(f"{output.read_text()}\n{logs}") from None
    assert process.poll() is None, output.read_text()
    assert "3,000 rows" in output.read_text()  # the progress bar shows what was copied

    config = yaml.safe_load((folder / "shoal.yaml").read_text())
    assert config["replication"]["hostname"] == target
    assert config["replication"]["routes"] == [node.name]
    assert "admin" not in config and "tls" not in config
    assert PASSWORD not in (folder / "shoal.yaml").read_text()

    copied = StorageClient.basic(f"{target}:9926", "admin", PASSWORD)
    try:
        assert copied.describe("dev", "dog").record_count == 3000
        assert len(copied.by_value("dev", "dog", "breed", "b3")) == len(range(3, 3000, 7))
        assert copied.describe("dev", "dog").primary_key == "id"
    finally:
        copied.close()
    members = node.admin().ok(
        {
            "operation": "search_by_value",
            "database": "system",
            "table": "hdb_nodes",
            "attribute": "name",
            "value": "*",
        }
    )
    assert {m["name"] for m in members} == {node.name, target}
    # A write on the source after the clone reaches the clone: it is a member.
    client.insert("dev", "dog", [{"id": "late"}])
    late = StorageClient.basic(f"{target}:9926", "admin", PASSWORD)
    try:
        wait_for(lambda: late.get("dev", "dog", ["late"]), 20, "a later write to reach the clone")
    finally:
        late.close()

    # Ctrl-C (SIGTERM) stops the clone's services.
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert not healthy(f"{target}:9926")

    again = shoal("node", "clone", "--from", node.host, "--hostname", target, "--data", str(folder))
    assert again.returncode == ALREADY_EXISTS and "empty folder" in again.stderr


def _child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    return children


def _service_pid(clone_pid: int, service: str) -> int | None:
    """The process of one service of the node a `shoal node clone` runs."""
    for child in _child_pids(clone_pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"services.{service}".encode() in command:
            return child
    return None


def test_node_clone_supervises_its_services_while_copying(
    node: Node, tmp_path: Path, clone_process: list[subprocess.Popen[bytes]]
) -> None:
    """A service of the new node that dies while the clone is still catching up is
    restarted at once (as `shoal node start` does), not only once the copy is over."""
    node.client().create_table("dev", "dog")
    node.client().insert("dev", "dog", [{"id": i} for i in range(20)])
    node.stop("replicator")  # the clone cannot catch up until it is back
    target = next_address()
    folder = tmp_path / "clone"
    output = tmp_path / "clone.log"
    env = {**os.environ, "SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": PASSWORD}
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.cli", "node", "clone", "--from", node.host),
                *("--hostname", target, "--data", str(folder), "--timeout", "150"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    clone_process.append(process)
    admin_health = f"{target}:{DEFAULT_HEALTH_ADMIN_PORT}"
    wait_for(
        lambda: "starting" in output.read_text() and healthy(admin_health),
        90,
        "the clone's services to start",
    )
    assert "caught up" not in output.read_text()
    first = _service_pid(process.pid, "admin")
    assert first is not None
    os.kill(first, signal.SIGKILL)

    def restarted() -> bool:
        again = _service_pid(process.pid, "admin")
        return again not in (None, first) and healthy(admin_health)

    wait_for(restarted, 60, "the clone's admin to be restarted while the clone is copying")
    text = output.read_text()
    assert f"admin of {target} exited (-9); restarting" in text, text
    assert "caught up" not in text and "still copying" not in text, text

    node.start("replicator")
    wait_for(lambda: "caught up" in output.read_text(), 120, "the clone to catch up")
    assert process.poll() is None, output.read_text()
    copied = StorageClient.basic(f"{target}:9926", "admin", PASSWORD)
    try:
        assert copied.describe("dev", "dog").record_count == 20
    finally:
        copied.close()


def test_load_csv_status_and_credentials_from_a_config_file(node: Node, tmp_path: Path) -> None:
    csv = tmp_path / "dogs.csv"
    csv.write_text("id,name,age\n" + "".join(f"{i},dog{i},{i % 15}\n" for i in range(5000)))
    node.client().create_table("dev", "dog")
    cli_config = tmp_path / "cli.yaml"
    cli_config.write_text(yaml.safe_dump({"node": node.host, "password": PASSWORD}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_CLI_CONFIG"] = str(cli_config)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    loaded = run("data", "load-csv", "dev", "dog", str(csv))
    assert loaded.returncode == 0, loaded.stderr
    assert orjson.loads(loaded.stdout) == {
        "rows": 5000,
        "written": 5000,
        "skipped": 0,
        "failed": 0,
        "errors": [],
    }
    assert "loading dogs.csv" in loaded.stderr  # the progress bar
    assert node.client().describe("dev", "dog").record_count == 5000
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,a,extra\n")
    failed = run("data", "load-csv", "dev", "dog", str(bad), "--action", "upsert")
    assert failed.returncode == 3 and orjson.loads(failed.stdout)["failed"] == 1

    status = run("node", "status", "-o", "json")
    assert status.returncode == 0, status.stderr
    assert {r["service"]: r["serving"] for r in orjson.loads(status.stdout)} == {
        "storage": True,
        "replicator": True,
        "admin": True,
    }
    nobody = run("node", "status", "--node", next_address())
    assert nobody.returncode == 14

    cli_config.write_text("- not a mapping\n")
    broken = run("cluster", "nodes")
    assert broken.returncode == 2 and "expected a mapping" in broken.stderr


def test_node_start_and_stop(tmp_path: Path) -> None:
    host = next_address()
    root = tmp_path / "solo"
    root.mkdir()
    config = root / "shoal.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "rootPath": str(root),
                "host": host,
                "replication": {"hostname": host},
                "admin": {"password": PASSWORD},
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "node", "start", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for((root / "shoal.pid").exists, 60, "the node to start")
        assert shoal("node", "status", "--node", host).returncode == 0
        stopped = shoal("node", "stop", "-c", str(config))
        assert stopped.returncode == 0, stopped.stderr
        assert process.wait(timeout=30) == 0
        assert not (root / "shoal.pid").exists()
        assert shoal("node", "status", "--node", host).returncode == 14
        again = shoal("node", "stop", "-c", str(config))
        assert again.returncode == 5 and "no node runs" in again.stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def test_a_second_start_on_taken_addresses_refuses_at_once(make_node: MakeNode) -> None:
    """Starting a node's services (what `shoal local up` does per node) while that node
    already runs refuses before starting anything: it names every address taken, says a
    cluster may already be running there, and exits 6 (ALREADY_EXISTS). The running
    node keeps serving."""
    node = make_node(services=("storage", "replicator", "admin"))
    node.client().create_table("data", "dog")
    node.client().insert("data", "dog", [{"id": 1}])
    second = shoal("node", "start", "--config", str(node.config_path))
    assert second.returncode == 6, second.stderr
    message = second.stderr
    assert f"storage of {node.name} on {node.host}:9926" in message
    assert f"admin of {node.name} on {node.host}:9925" in message
    assert f"replication of {node.name} on {node.host}:" in message
    assert "may already be running there" in message
    assert [r["id"] for r in node.client().all_records("data", "dog")] == [1]
    assert all(node.running(service) for service in node.services)
