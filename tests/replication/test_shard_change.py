"""Changing a node's shard while it runs (`set_configuration` of `replication.shard`): the
node hands over the sharded databases of its old shard (removed only once another node
of that shard holds every write it held), then receives its new shard's; nothing is
lost. Real nodes (storage, replicator, admin), TLS between replicators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from shoal.admin.v1 import admin_pb2 as apb

from tests.conftest import MakeCluster
from tests.harness.addresses import next_address
from tests.harness.certs import CertificateAuthority
from tests.harness.client import StorageClient, error_info, expect_error
from tests.harness.node import PASSWORD, Node
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

SERVICES = ("storage", "replicator", "admin")
DATABASES = ["*", {"name": "metrics", "sharded": True}]
CHANGE_TIMEOUT_S = 150.0  # hand-over (a minute at most) and the replicator's restart


def _ids(node: Node, database: str, table: str) -> set[Any]:
    try:
        return {r["id"] for r in node.internal_client().all_records(database, table)}
    except grpc.RpcError as exc:
        if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
            return set()
        raise


def _ensure_table(node: Node, database: str, table: str) -> None:
    try:
        node.client().create_table(database, table)
    except grpc.RpcError as exc:
        if not (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.ALREADY_EXISTS):
            raise


def _holds(node: Node, database: str, table: str, ids: set[Any]) -> bool:
    return _ids(node, database, table) == ids


def _has(node: Node, key: Any) -> bool:
    return key in _ids(node, "metrics", "m")


def _shards_in_rows(node: Node) -> dict[str, Any]:
    rows = node.internal_client().all_records("system", "hdb_nodes", "name")
    return {r["name"]: r.get("shard") for r in rows}


def _rows_are(node: Node, expected: dict[str, Any]) -> bool:
    return _shards_in_rows(node) == expected


def _configured_shard(node: Node) -> Any:
    data = yaml.safe_load(node.config_path.read_text(encoding="utf-8"))
    return (data.get("replication") or {}).get("shard")


def _change_shard(node: Node, shard: int, **extra: Any) -> Any:
    result, code = node.admin().execute(
        {"operation": "set_configuration", "replication_shard": shard, **extra},
        timeout=CHANGE_TIMEOUT_S,
    )
    assert code == 0, f"set_configuration on {node.name} failed ({code}): {result}"
    return result


def test_a_node_moved_to_another_shard_hands_over_its_old_shards_data(
    make_cluster: MakeCluster,
) -> None:
    shards = [1, 1, 2, 2]
    cluster = make_cluster(
        size=4,
        services=SERVICES,
        config={"replication": {"databases": DATABASES}},
        node_config={i: {"replication": {"shard": s}} for i, s in enumerate(shards)},
    )
    cluster.wait_connected()
    cluster.wait_members()
    nodes = list(cluster)
    keeper, mover, new_a, new_b = nodes
    for node in (keeper, new_a):
        _ensure_table(node, "metrics", "m")
    _ensure_table(keeper, "shared", "s")
    for i, node in enumerate(nodes):
        node.client().insert("metrics", "m", [{"id": f"n{i}-{k}"} for k in range(20)])
        node.client().insert("shared", "s", [{"id": f"n{i}"}])
    shard_one = {f"n{i}-{k}" for i in (0, 1) for k in range(20)}
    shard_two = {f"n{i}-{k}" for i in (2, 3) for k in range(20)}
    everywhere = {f"n{i}" for i in range(4)}
    for node, expected in zip(nodes, (shard_one, shard_one, shard_two, shard_two), strict=True):
        wait_for(partial(_holds, node, "metrics", "m", expected), 60, f"metrics on {node.name}")
    for node in nodes:
        wait_for(partial(_holds, node, "shared", "s", everywhere), 60, f"shared on {node.name}")

    # Writes only the mover holds: the keeper's replicator is stopped while they are made,
    # and the shard change starts as soon as it is back, before it has caught up.
    keeper.stop("replicator")
    late = {f"late-{k}" for k in range(300)}
    for start in range(0, 300, 100):
        mover.client().insert(
            "metrics", "m", [{"id": f"late-{k}"} for k in range(start, start + 100)]
        )
    assert late <= _ids(mover, "metrics", "m")
    assert not late & _ids(keeper, "metrics", "m")
    keeper.start("replicator")

    result = _change_shard(mover, 2)

    # At the answer, without waiting: the keeper holds every write the mover held of
    # shard 1's metrics, and the mover holds none of them any more.
    assert _ids(keeper, "metrics", "m") == shard_one | late
    assert not _ids(mover, "metrics", "m") & (shard_one | late)
    change = result["shardChange"]
    assert change["previousShard"] == 1 and change["shard"] == 2 and not change["kept"]
    assert change["handedOver"] == [{"database": "metrics", "heldBy": [keeper.name]}]
    assert _configured_shard(mover) == 2
    assert mover.status().shard == 2

    # The mover receives shard 2's metrics from its new shard; the unsharded data stays.
    wait_for(partial(_holds, mover, "metrics", "m", shard_two), 60, "shard 2's rows on the mover")
    assert _ids(mover, "shared", "s") == everywhere
    # Every member learns the new shard from the mover's system.hdb_nodes row.
    expected_rows = {n.name: s for n, s in zip(nodes, [1, 2, 2, 2], strict=True)}
    for node in nodes:
        wait_for(partial(_rows_are, node, expected_rows), 30, f"shards in rows on {node.name}")

    # From now on the mover is of shard 2: its sharded writes reach shard 2 only, and
    # shard 1's stay there; a marker after each shows where they would have gone.
    mover.client().insert("metrics", "m", [{"id": "after-move"}])
    keeper.client().insert("metrics", "m", [{"id": "after-keeper"}])
    for writer in (mover, keeper):
        writer.client().insert("shared", "s", [{"id": f"marker-{writer.name}"}])
    markers = everywhere | {f"marker-{mover.name}", f"marker-{keeper.name}"}
    for node in nodes:
        wait_for(partial(_holds, node, "shared", "s", markers), 60, f"markers on {node.name}")
    for node in (mover, new_a, new_b):
        wait_for(partial(_has, node, "after-move"), 60, f"the mover's write on {node.name}")
    assert _ids(mover, "metrics", "m") == shard_two | {"after-move"}
    assert _ids(keeper, "metrics", "m") == shard_one | late | {"after-keeper"}
    for node in (new_a, new_b):
        assert _ids(node, "metrics", "m") == shard_two | {"after-move"}
    for peer in (keeper, new_a, new_b):
        assert "refused" not in mover.connection(peer.name).last_connection_error


def test_a_shard_change_whose_data_no_other_node_holds_changes_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(
        size=2,
        services=SERVICES,
        config={"replication": {"databases": DATABASES}},
        node_config={0: {"replication": {"shard": 1}}, 1: {"replication": {"shard": 2}}},
    )
    cluster.wait_connected()
    cluster.wait_members()
    alone, other = cluster[0], cluster[1]
    _ensure_table(alone, "metrics", "m")
    alone.client().insert("metrics", "m", [{"id": k} for k in range(50)])

    # alone is the only node of shard 1: nobody could take its metrics over.
    request = apb.SetConfigurationRequest(settings=orjson.dumps({"replication.shard": 2}))
    error = expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        partial(alone.admin().call, "SetConfiguration", request, CHANGE_TIMEOUT_S),
        "metrics",
        "only here",
    )
    assert error_info(error).reason == "NOT_HELD_ELSEWHERE"

    # Nothing changed: the same shard, in the file and running; the data; and writes to
    # the database are accepted again.
    assert _configured_shard(alone) == 1
    assert alone.status().shard == 1
    assert _ids(alone, "metrics", "m") == set(range(50))
    alone.client().insert("metrics", "m", [{"id": "after"}])
    assert _ids(alone, "metrics", "m") == set(range(50)) | {"after"}
    assert _ids(other, "metrics", "m") == set()

    # With keep_sharded_data the node moves and keeps what it holds: shard 2 gets it.
    result = _change_shard(alone, 2, keep_sharded_data=True)
    change = result["shardChange"]
    assert change["kept"] and change["handedOver"] == [] and change["shard"] == 2
    wanted = set(range(50)) | {"after"}
    wait_for(partial(_holds, other, "metrics", "m", wanted), 60, "the kept rows on shard 2")
    assert _ids(alone, "metrics", "m") == wanted

    # Leaving every shard: handed over to the other node of shard 2, and the node's row
    # says it has no shard any more, on both nodes.
    result, code = alone.admin().execute(
        {"operation": "set_configuration", "replication_shard": None}, timeout=CHANGE_TIMEOUT_S
    )
    assert code == 0, result
    assert result["shardChange"]["handedOver"] == [{"database": "metrics", "heldBy": [other.name]}]
    assert _ids(alone, "metrics", "m") == set() and _configured_shard(alone) is None
    assert _ids(other, "metrics", "m") == wanted
    rows = {alone.name: None, other.name: 2}
    for node in (alone, other):
        wait_for(partial(_rows_are, node, rows), 30, f"the shards in the rows on {node.name}")


def test_a_replicated_shard_change_moves_every_member_and_merges_their_shards(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(
        size=2,
        services=SERVICES,
        config={"replication": {"databases": DATABASES}},
        node_config={0: {"replication": {"shard": 1}}, 1: {"replication": {"shard": 2}}},
    )
    cluster.wait_connected()
    cluster.wait_members()
    a, b = cluster[0], cluster[1]
    for node in (a, b):
        _ensure_table(node, "metrics", "m")
        node.client().insert("metrics", "m", [{"id": f"{node.name}-{k}"} for k in range(30)])
    union = {f"{n.name}-{k}" for n in (a, b) for k in range(30)}

    result = _change_shard(a, 7, replicated=True)
    assert result["shardChange"]["kept"] and result["shardChange"]["shard"] == 7
    assert result["replicated"] == [{"node": b.name, "ok": True}]
    for node in (a, b):
        assert _configured_shard(node) == 7
        assert node.status().shard == 7
    for node in (a, b):
        wait_for(partial(_holds, node, "metrics", "m", union), 60, f"both shards on {node.name}")


# -- shoal node clone into another shard ---------------------------------------------------


@pytest.fixture
def clone_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """`shoal node clone` processes (each runs the new node): always stopped."""
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


def _write_ca(authority: CertificateAuthority, folder: Path) -> Path:
    """The cluster's CA as `--ca-dir` wants it (ca.key, ca.crt)."""
    folder.mkdir(parents=True)
    key = authority.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "ca.key").write_bytes(key)
    (folder / "ca.crt").write_bytes(authority.pem)
    return folder


def test_a_clone_into_another_shard_never_copies_the_source_shards_data(
    make_cluster: MakeCluster, tmp_path: Path, clone_processes: list[subprocess.Popen[bytes]]
) -> None:
    cluster = make_cluster(
        size=2,
        services=SERVICES,
        config={"replication": {"databases": DATABASES}},
        node_config={0: {"replication": {"shard": 1}}, 1: {"replication": {"shard": 2}}},
    )
    cluster.wait_connected()
    cluster.wait_members()
    source, other = cluster[0], cluster[1]
    for node in (source, other):
        _ensure_table(node, "metrics", "m")
        node.client().insert("metrics", "m", [{"id": f"{node.name}-{k}"} for k in range(40)])
    _ensure_table(source, "shared", "s")
    source.client().insert("shared", "s", [{"id": k} for k in range(40)])
    wait_for(partial(_holds, other, "shared", "s", set(range(40))), 60, "shared rows on other")

    assert cluster.ca is not None
    ca_dir = _write_ca(cluster.ca, tmp_path / "cluster-ca")
    target, folder, output = next_address(), tmp_path / "clone", tmp_path / "clone.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update({"SHOAL_USERNAME": "admin", "SHOAL_PASSWORD": PASSWORD})
    with output.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.cli", "--ca", str(ca_dir / "ca.crt")),
                *("node", "clone", "--from", source.host, "--hostname", target),
                *("--data", str(folder), "--ca-dir", str(ca_dir), "--shard", "2"),
                *("--timeout", "120"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    clone_processes.append(process)
    wait_for(
        lambda: "caught up" in output.read_text() or process.poll() is not None,
        150,
        "the clone to catch up",
    )
    assert process.poll() is None, output.read_text()
    config = yaml.safe_load((folder / "shoal.yaml").read_text())
    assert config["replication"]["shard"] == 2

    credentials = grpc.ssl_channel_credentials(root_certificates=cluster.ca.pem)
    with grpc.secure_channel(f"{target}:9926", credentials) as channel:
        client = StorageClient.basic(f"{target}:9926", "admin", PASSWORD, channel)

        def metrics() -> set[Any]:
            try:
                return {r["id"] for r in client.all_records("metrics", "m")}
            except grpc.RpcError as exc:
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                    return set()
                raise

        # Shard 2's metrics come from shard 2's member; none of the source's, ever.
        shard_two = {f"{other.name}-{k}" for k in range(40)}
        wait_for(lambda: metrics() == shard_two, 60, "shard 2's metrics on the clone")
        assert {r["id"] for r in client.all_records("shared", "s")} == set(range(40))
        # A later sharded write of the source stays in shard 1; the unsharded marker
        # written after it shows it would have arrived by now.
        source.client().insert("metrics", "m", [{"id": "late"}])
        source.client().insert("shared", "s", [{"id": "marker"}])
        wait_for(lambda: client.get("shared", "s", ["marker"]), 30, "the marker on the clone")
        assert metrics() == shard_two
    assert not {r["id"] for r in other.internal_client().all_records("metrics", "m")} & {
        f"{source.name}-{k}" for k in range(40)
    }
