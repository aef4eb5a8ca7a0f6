"""The edge application of Harper's IoT example, written against Shoal's gRPC API.

It only ever talks to its own node (localhost): it reads the thresholds that replicate
down from the cloud, stores every sensor reading in a table that never leaves the edge
(`replicate: false`), and when a reading crosses its threshold it writes an alert that
carries the readings of the preceding window; the alert replicates up to the cloud.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import orjson
from shoal.storage.v1 import storage_pb2 as pb
from shoal.storage.v1 import storage_pb2_grpc

DATABASE = "iot"
WINDOW_MS = 60_000


class EdgeApp:
    """Sensor readings in, alerts out."""

    def __init__(self, storage_address: str, metadata: Sequence[tuple[str, str]]) -> None:
        self._channel = grpc.insecure_channel(storage_address)
        self._stub = storage_pb2_grpc.StorageServiceStub(self._channel)
        self._metadata = tuple(metadata)

    def close(self) -> None:
        self._channel.close()

    def setup(self) -> None:
        """The edge's own tables: readings stay local, alerts replicate."""
        for table, replicate, indexed in (
            ("sensor_data", False, ["sensor", "at"]),
            ("alerts", True, []),
        ):
            request = pb.CreateTableRequest(
                database=DATABASE, table=table, indexed_attributes=indexed
            )
            request.replicate = replicate
            try:
                self._stub.CreateTable(request, metadata=self._metadata, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise

    def threshold(self, sensor: str) -> float | None:
        request = pb.SearchByIdRequest(
            database=DATABASE, table="thresholds", ids=[orjson.dumps(sensor)]
        )
        try:
            for chunk in self._stub.SearchById(request, metadata=self._metadata, timeout=10):
                for record in chunk.records:
                    return float(orjson.loads(record)["max"])
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        return None

    def _window(self, sensor: str, now_ms: int) -> list[dict[str, Any]]:
        conditions = [
            pb.Condition(
                comparison=pb.Comparison(
                    attribute="sensor", comparator=pb.COMPARATOR_EQUALS, value=orjson.dumps(sensor)
                )
            ),
            pb.Condition(
                comparison=pb.Comparison(
                    attribute="at",
                    comparator=pb.COMPARATOR_GREATER_THAN_EQUAL,
                    value=orjson.dumps(now_ms - WINDOW_MS),
                )
            ),
        ]
        request = pb.SearchByConditionsRequest(
            database=DATABASE,
            table="sensor_data",
            conditions=conditions,
            sort=[pb.SortKey(attribute="at")],
        )
        records: list[dict[str, Any]] = []
        for chunk in self._stub.SearchByConditions(request, metadata=self._metadata, timeout=10):
            records.extend(orjson.loads(r) for r in chunk.records)
        return records

    def reading(self, sensor: str, value: float, at_ms: int | None = None) -> str | None:
        """Store one reading; returns the alert id when it crossed the threshold."""
        at = at_ms if at_ms is not None else time.time_ns() // 1_000_000
        record = {"id": str(uuid.uuid4()), "sensor": sensor, "value": value, "at": at}
        self._stub.Insert(
            pb.InsertRequest(
                database=DATABASE, table="sensor_data", records=[orjson.dumps(record)]
            ),
            metadata=self._metadata,
            timeout=10,
        )
        limit = self.threshold(sensor)
        if limit is None or value <= limit:
            return None
        alert = {
            "id": str(uuid.uuid4()),
            "sensor": sensor,
            "value": value,
            "threshold": limit,
            "at": at,
            "readings": self._window(sensor, at),
        }
        self._stub.Insert(
            pb.InsertRequest(database=DATABASE, table="alerts", records=[orjson.dumps(alert)]),
            metadata=self._metadata,
            timeout=10,
        )
        return str(alert["id"])
