"""Harper's edge scenario, end to end, on this machine.

    python examples/edge/scenario.py

Starts a cloud node and an edge node (each a storage and a replicator process, on their
own loopback addresses). The edge routes to the cloud and the cloud has no route to the
edge: the edge only dials out, yet receives. The edge subscribes to `iot.thresholds` and
publishes `iot.alerts` (explicit subscriptions on its route); `iot.sensor_data` is a
`replicate: false` table. Prints what each side ends up with, then stops everything.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

from examples.edge.app import DATABASE, EdgeApp
from services.common.auth import basic_metadata
from services.local import SERVICES, Supervisor, run_services


@dataclass
class Outcome:
    """What the cloud and the edge hold at the end."""

    alerts_on_cloud: list[dict[str, Any]]
    cloud_tables: set[str]
    edge_tables: set[str]
    readings_on_edge: int
    alert_ids: list[str]


def write_configs(workdir: Path, cloud_host: str, edge_host: str) -> tuple[Path, Path]:
    # Insecure mode (securePort: null): plaintext on one machine, no certificates. Both
    # dial from 127.0.0.1 (every node of one machine does), which the cloud must allow to
    # join as the edge; a real edge joins the cloud with a certificate instead.
    cloud = {
        "rootPath": "cloud",
        "host": cloud_host,
        "replication": {
            "hostname": cloud_host,
            "securePort": None,
            "allowedSources": ["127.0.0.1"],
        },
    }
    edge = {
        "rootPath": "edge",
        "host": edge_host,
        "replication": {
            "hostname": edge_host,
            "securePort": None,
            "routes": [
                {
                    "hostname": cloud_host,
                    "subscriptions": [
                        {
                            "database": DATABASE,
                            "table": "thresholds",
                            "subscribe": True,
                            "publish": False,
                        },
                        {
                            "database": DATABASE,
                            "table": "alerts",
                            "subscribe": False,
                            "publish": True,
                        },
                    ],
                }
            ],
        },
    }
    paths = (workdir / "cloud.yaml", workdir / "edge.yaml")
    for path, config in zip(paths, (cloud, edge), strict=True):
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def _wait(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _tables(stub: storage_pb2_grpc.StorageServiceStub, metadata: Any) -> set[str]:
    reply = stub.DescribeAll(pb.DescribeAllRequest(), metadata=metadata, timeout=10)
    return {f"{d.name}.{t.name}" for d in reply.databases for t in d.tables}


def _alerts(stub: storage_pb2_grpc.StorageServiceStub, metadata: Any) -> list[dict[str, Any]]:
    request = pb.SearchByValueRequest(
        database=DATABASE, table="alerts", attribute="id", value=b'"*"'
    )
    try:
        return [
            orjson.loads(r)
            for c in stub.SearchByValue(request, metadata=metadata, timeout=10)
            for r in c.records
        ]
    except grpc.RpcError:
        return []


def run(workdir: Path, cloud_host: str, edge_host: str) -> Outcome:
    password = secrets.token_urlsafe(12)
    metadata = basic_metadata("admin", password)
    cloud_config, edge_config = write_configs(workdir, cloud_host, edge_host)
    supervisor: Supervisor = run_services(
        [cloud_config, edge_config], SERVICES, {"SHOAL_ADMIN_PASSWORD": password}, logs=True
    )
    try:
        cloud = storage_pb2_grpc.StorageServiceStub(grpc.insecure_channel(f"{cloud_host}:9926"))
        cloud.CreateTable(
            pb.CreateTableRequest(database=DATABASE, table="thresholds"), metadata=metadata
        )
        cloud.Insert(
            pb.InsertRequest(
                database=DATABASE, table="thresholds", records=[b'{"id": "temperature", "max": 30}']
            ),
            metadata=metadata,
        )
        app = EdgeApp(f"{edge_host}:9926", metadata)
        app.setup()
        _wait(lambda: app.threshold("temperature") is not None, 30, "the threshold on the edge")
        now = time.time_ns() // 1_000_000
        alert_ids = []
        for i, value in enumerate([21.0, 24.5, 28.0, 31.5, 27.0, 33.0]):
            alert = app.reading("temperature", value, at_ms=now - 5000 + i * 1000)
            if alert:
                alert_ids.append(alert)
        alerts = _wait(
            lambda: (a := _alerts(cloud, metadata)) and len(a) == len(alert_ids) and a,
            30,
            "alerts on the cloud",
        )
        edge = storage_pb2_grpc.StorageServiceStub(grpc.insecure_channel(f"{edge_host}:9926"))
        readings = edge.DescribeTable(
            pb.DescribeTableRequest(database=DATABASE, table="sensor_data"), metadata=metadata
        )
        outcome = Outcome(
            alerts_on_cloud=sorted(alerts, key=lambda a: a["at"]),
            cloud_tables=_tables(cloud, metadata),
            edge_tables=_tables(edge, metadata),
            readings_on_edge=int(readings.table.record_count),
            alert_ids=alert_ids,
        )
        app.close()
        return outcome
    finally:
        supervisor.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default="127.0.0.21", help="cloud node address")
    parser.add_argument("--edge", default="127.0.0.22", help="edge node address")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-edge-") as tmp:
        outcome = run(Path(tmp), args.cloud, args.edge)
    print(f"cloud tables: {sorted(outcome.cloud_tables)}")
    print(f"edge tables:  {sorted(outcome.edge_tables)}")
    print(f"readings kept on the edge: {outcome.readings_on_edge}")
    for alert in outcome.alerts_on_cloud:
        values = [r["value"] for r in alert["readings"]]
        crossing = f"{alert['sensor']} {alert['value']} > {alert['threshold']}"
        print(f"alert on the cloud: {crossing}, readings {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
