"""examples/edge runs end to end: the edge only dials out; thresholds flow down, alerts
with their readings flow up, sensor readings never leave the edge."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.edge.scenario import run
from tests.harness.addresses import next_address

pytestmark = pytest.mark.cluster


def test_edge_scenario(tmp_path: Path) -> None:
    outcome = run(tmp_path, cloud_host=next_address(), edge_host=next_address())
    assert len(outcome.alert_ids) == 2
    assert [a["id"] for a in outcome.alerts_on_cloud] == outcome.alert_ids
    first, second = outcome.alerts_on_cloud
    assert (first["value"], first["threshold"]) == (31.5, 30.0)
    # Each alert carries the readings of its window, up to and including the crossing one.
    assert [r["value"] for r in first["readings"]] == [21.0, 24.5, 28.0, 31.5]
    assert [r["value"] for r in second["readings"]][-1] == 33.0
    assert outcome.readings_on_edge == 6
    assert "iot.sensor_data" in outcome.edge_tables
    assert "iot.sensor_data" not in outcome.cloud_tables
    assert {"iot.thresholds", "iot.alerts"} <= outcome.cloud_tables
