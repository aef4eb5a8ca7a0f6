"""The analytics catalog and its pure functions: checking samples, row ids whose order is
the time order, per-minute aggregation and counter increases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import analytics
from services.common.analytics import Deltas, InvalidSample, Sample, aggregate, make_sample

MINUTE = 1_763_793_000_000 - 1_763_793_000_000 % 60_000
PEER = ("server-two",)


def test_aggregate_sums_counters_and_averages_gauges_per_label_values() -> None:
    samples = [
        Sample("replication-sent-bytes", MINUTE + 1000, 100.0, PEER),
        Sample("replication-sent-bytes", MINUTE + 5000, 50.0, PEER),
        Sample("replication-sent-bytes", MINUTE + 7000, 7.0, ("server-three",)),
        Sample("log-size", MINUTE, 10.0),
        Sample("log-size", MINUTE + 1000, 30.0),
        Sample("log-size", MINUTE + 2000, 20.0),
    ]
    rows = aggregate(samples, MINUTE)
    assert rows == [
        {
            "id": f"log-size/{MINUTE}",
            "metric": "log-size",
            "time": MINUTE,
            "period": 60_000,
            "count": 3,
            "sum": 60,
            "min": 10,
            "max": 30,
            "mean": 20.0,
        },
        {
            "id": f"replication-sent-bytes/{MINUTE}/server-three",
            "metric": "replication-sent-bytes",
            "time": MINUTE,
            "period": 60_000,
            "count": 1,
            "sum": 7,
            "min": 7,
            "max": 7,
            "mean": 7.0,
            "peer": "server-three",
        },
        {
            "id": f"replication-sent-bytes/{MINUTE}/server-two",
            "metric": "replication-sent-bytes",
            "time": MINUTE,
            "period": 60_000,
            "count": 2,
            "sum": 150,
            "min": 50,
            "max": 100,
            "mean": 75.0,
            "peer": "server-two",
        },
    ]


def test_aggregate_weighs_timings_by_their_observations() -> None:
    method = ("shoal.storage.v1.StorageService/Insert",)
    samples = [
        Sample("request-duration", MINUTE, 0.010, method, count=1),
        Sample("request-duration", MINUTE + 1000, 0.001, method, count=9),
    ]
    [row] = aggregate(samples, MINUTE)
    assert row["count"] == 10
    assert row["sum"] == pytest.approx(0.019)
    assert row["mean"] == pytest.approx(0.0019)  # every call counts once, not every second
    assert (row["min"], row["max"]) == (0.001, 0.010)
    assert row["method"] == method[0]


def test_aggregate_of_nothing_is_nothing() -> None:
    assert aggregate([], MINUTE) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=60))
def test_a_counter_aggregate_sums_its_seconds(values: list[int]) -> None:
    samples = [
        Sample("local-transactions", MINUTE + 1000 * i, float(v)) for i, v in enumerate(values)
    ]
    [row] = aggregate(samples, MINUTE)
    assert row["sum"] == sum(values)
    assert row["count"] == len(values)
    assert (row["min"], row["max"]) == (min(values), max(values))
    assert math.isclose(row["mean"], sum(values) / len(values))


times = st.integers(0, analytics.MAX_TIME_MS)
label_values = st.tuples(st.sampled_from(("a", "b", "server-two")), st.sampled_from(("data", "x")))


@settings(max_examples=300, deadline=None)
@given(times, times, times, label_values)
def test_id_bounds_hold_exactly_the_rows_of_the_time_range(
    start: int, end: int, time_ms: int, labels: tuple[str, str]
) -> None:
    start, end = min(start, end), max(start, end)
    low, high = analytics.id_bounds("replication-lag", start, end)
    row = analytics.row_id("replication-lag", time_ms, labels)
    bare = analytics.row_id("replication-lag", time_ms)
    inside = start <= time_ms <= end
    assert (low <= row <= high) == inside
    assert (low <= bare <= high) == inside
    other = analytics.row_id("replication-latency", time_ms, labels[:1])
    assert not low <= other <= high


def test_make_sample_checks_the_metric_labels_time_and_value() -> None:
    sample = make_sample("replication-lag", 5000, 0.5, {"peer": "b", "database": "data"})
    assert sample.labels == ("b", "data")
    assert analytics.raw_row(sample) == {
        "id": "replication-lag/0000000005000/b/data",
        "metric": "replication-lag",
        "time": 5000,
        "period": 1000,
        "value": 0.5,
        "peer": "b",
        "database": "data",
    }
    problems: list[tuple[str, int, float, dict[str, str], int, str]] = [
        ("nope", 5000, 1, {}, 0, "unknown metric"),
        ("replication-lag", 5000, 1, {"peer": "b"}, 0, "labels"),
        ("log-size", 5000, 1, {"peer": "b"}, 0, "unknown labels"),
        ("log-size", 5500, 1, {}, 0, "whole second"),
        ("log-size", 0, 1, {}, 0, "whole second"),
        ("log-size", 5000, math.nan, {}, 0, "finite"),
        ("log-size", 5000, 1, {}, 3, "only timings"),
    ]
    for name, time_ms, value, labels, count, words in problems:
        with pytest.raises(InvalidSample, match=words):
            make_sample(name, time_ms, value, labels, count)


def test_deltas_count_increases_and_survive_resets() -> None:
    deltas = Deltas()
    assert deltas.increase("requests", ("m",), 3) == 3  # a new series counts from zero
    assert deltas.increase("requests", ("m",), 3) == 0
    assert deltas.increase("requests", ("m",), 10) == 7
    assert deltas.increase("requests", ("other",), 1) == 1
    assert deltas.increase("requests", ("m",), 2) == 2  # reset: the new value is the increase


def test_time_helpers() -> None:
    assert analytics.second_of(12_345) == 11_000
    assert analytics.minute_of(MINUTE + 59_999) == MINUTE
    assert analytics.until_next_second(12_345, 20) == pytest.approx(0.675)


def test_metric_names_fit_ids() -> None:
    for spec in analytics.METRICS:
        assert "/" not in spec.name and spec.name == spec.name.lower()
        assert spec.kind in ("counter", "gauge", "timing")
