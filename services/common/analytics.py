"""Analytics kept as history: the built-in metrics, their per-second samples, row ids and
the per-minute aggregation (pure functions, shared by the services that sample and the
admin service that reads).

Every node keeps two node-local tables in its ``system`` database, created with
``replicate: false`` and written outside the transaction log (so they never replicate and
never count as transactions):

* ``hdb_raw_analytics``: one row per metric, second and label values, e.g.
  ``{"id": "records-written/1763793012000/dev/dog", "metric": "records-written",
  "time": 1763793012000, "period": 1000, "value": 12, "database": "dev", "table": "dog"}``;
* ``hdb_analytics``: one row per metric, minute and label values, aggregating the raw rows
  of that minute: ``count``, ``sum``, ``min``, ``max`` and ``mean``.

A row's id is ``<metric>/<time, 13 digits>`` followed by ``/<label value>`` per label, so
the rows of one metric sort by time and a time range of one metric is one key range.

Sampling: a counter contributes a row for each second in which it grew (``value`` is the
increase); a gauge one row per second (``value`` is its value then); a timing one row per
second with observations (``value`` is their mean, ``count`` how many there were).
Aggregating weighs a timing's rows by their ``count`` (so ``mean`` is the mean of every
observation of the minute) and counts every other row once (so a counter's ``sum`` is its
increase over the minute).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

RAW_TABLE = "hdb_raw_analytics"
AGGREGATE_TABLE = "hdb_analytics"
RAW_PERIOD_MS = 1000
AGGREGATE_PERIOD_MS = 60_000
MAX_SAMPLES_PER_REQUEST = 10_000
MAX_TIME_MS = 10**13 - 1  # ids carry 13 digits of Unix milliseconds (until the year 2286)

Kind = Literal["counter", "gauge", "timing"]


@dataclass(frozen=True)
class MetricSpec:
    """One built-in metric."""

    name: str
    kind: Kind
    unit: str
    labels: tuple[str, ...]
    service: str  # the service that samples it
    description: str


SHOAL_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "requests",
        "counter",
        "calls",
        ("method",),
        "storage",
        "storage RPC calls started, per gRPC method (package.Service/Method)",
    ),
    MetricSpec(
        "request-duration",
        "timing",
        "seconds",
        ("method",),
        "storage",
        "duration of the storage RPC calls that ended, per gRPC method",
    ),
    MetricSpec(
        "local-transactions",
        "counter",
        "transactions",
        (),
        "storage",
        "transactions committed with this node as origin",
    ),
    MetricSpec(
        "applied-transactions",
        "counter",
        "transactions",
        (),
        "storage",
        "transactions of other origins applied (replication)",
    ),
    MetricSpec(
        "records-written",
        "counter",
        "records",
        ("database", "table"),
        "storage",
        "records written by local transactions (insert, update, upsert, delete), per table",
    ),
    MetricSpec(
        "log-size",
        "gauge",
        "bytes",
        (),
        "storage",
        "estimated size of the transaction log and its indexes",
    ),
    MetricSpec(
        "replication-connected",
        "gauge",
        "boolean",
        ("peer",),
        "replicator",
        "1 while a connection with the peer is up, else 0",
    ),
    MetricSpec(
        "replication-latency",
        "gauge",
        "seconds",
        ("peer",),
        "replicator",
        "last heartbeat round trip to the peer",
    ),
    MetricSpec(
        "replication-lag",
        "gauge",
        "seconds",
        ("peer", "database"),
        "replicator",
        "how far behind the peer's commits this node's copy of a database is",
    ),
    MetricSpec(
        "replication-backlog",
        "gauge",
        "transactions",
        ("peer", "database"),
        "replicator",
        "transactions sent to the peer and not yet acknowledged",
    ),
    MetricSpec(
        "replication-sent-transactions",
        "counter",
        "transactions",
        ("peer",),
        "replicator",
        "transactions sent to the peer",
    ),
    MetricSpec(
        "replication-sent-bytes",
        "counter",
        "bytes",
        ("peer",),
        "replicator",
        "serialized size of the batches sent to the peer",
    ),
    MetricSpec(
        "replication-received-transactions",
        "counter",
        "transactions",
        ("peer",),
        "replicator",
        "transactions received from the peer",
    ),
    MetricSpec(
        "replication-received-bytes",
        "counter",
        "bytes",
        ("peer",),
        "replicator",
        "serialized size of the batches received from the peer",
    ),
)
# Harper's metric names, sampled next to Shoal's own (Harper's rows hold several figures;
# each of these holds one `value`, as Shoal's rows do).
HARPER_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "db-read",
        "counter",
        "records",
        ("database", "table"),
        "storage",
        "records read by searches, per table (Harper's db-read)",
    ),
    MetricSpec(
        "db-write",
        "counter",
        "records",
        ("database", "table"),
        "storage",
        "records written by local transactions, per table (Harper's db-write)",
    ),
    MetricSpec(
        "success",
        "counter",
        "calls",
        ("method",),
        "storage",
        "storage RPC calls that ended successfully, per gRPC method (Harper's success)",
    ),
    MetricSpec(
        "resource-usage",
        "gauge",
        "percent",
        ("service",),
        "storage, replicator",
        "CPU used by the service's process over the second, in percent of one core"
        " (Harper's resource-usage cpuUtilization)",
    ),
    MetricSpec(
        "bytes-sent",
        "counter",
        "bytes",
        ("peer",),
        "replicator",
        "bytes of replication batches sent to the peer (Harper's bytes-sent)",
    ),
    MetricSpec(
        "bytes-received",
        "counter",
        "bytes",
        ("peer",),
        "replicator",
        "bytes of replication batches received from the peer (Harper's bytes-received)",
    ),
)
METRICS: tuple[MetricSpec, ...] = SHOAL_METRICS + HARPER_METRICS
BY_NAME: Mapping[str, MetricSpec] = {m.name: m for m in METRICS}


class InvalidSample(ValueError):
    """A sample does not fit its metric."""


@dataclass(frozen=True)
class Sample:
    """One per-second sample: ``labels`` are the metric's label values, in its order."""

    metric: str
    time_ms: int
    value: float
    labels: tuple[str, ...] = ()
    count: int = 0  # timings: how many observations ``value`` is the mean of


def metric(name: str) -> MetricSpec:
    """The built-in metric ``name``; KeyError when there is none."""
    return BY_NAME[name]


def check(sample: Sample) -> MetricSpec:
    """The sample's metric, after checking the sample fits it (``InvalidSample``)."""
    spec = BY_NAME.get(sample.metric)
    if spec is None:
        raise InvalidSample(f"unknown metric {sample.metric!r}")
    if len(sample.labels) != len(spec.labels) or not all(sample.labels):
        raise InvalidSample(
            f"{sample.metric}: needs the labels {', '.join(spec.labels) or '(none)'}"
        )
    if not 0 < sample.time_ms <= MAX_TIME_MS or sample.time_ms % RAW_PERIOD_MS:
        raise InvalidSample(f"{sample.metric}: time {sample.time_ms} is not a whole second")
    if not math.isfinite(sample.value):
        raise InvalidSample(f"{sample.metric}: the value must be a finite number")
    if sample.count < 0 or (sample.count and spec.kind != "timing"):
        raise InvalidSample(f"{sample.metric}: only timings carry a count")
    return spec


def make_sample(
    name: str, time_ms: int, value: float, labels: Mapping[str, str], count: int = 0
) -> Sample:
    """A checked sample from named labels (``InvalidSample`` when it does not fit)."""
    spec = BY_NAME.get(name)
    if spec is None:
        raise InvalidSample(f"unknown metric {name!r}")
    extra = sorted(set(labels) - set(spec.labels))
    if extra:
        raise InvalidSample(f"{name}: unknown labels {', '.join(extra)}")
    sample = Sample(name, time_ms, value, tuple(labels.get(k, "") for k in spec.labels), count)
    check(sample)
    return sample


def row_id(name: str, time_ms: int, labels: Iterable[str] = ()) -> str:
    """The primary key of a row: ``<metric>/<13-digit time>[/<label value>...]``."""
    return "/".join((name, f"{time_ms:013d}", *labels))


def id_bounds(name: str, start_ms: int, end_ms: int) -> tuple[str, str]:
    """Inclusive string bounds of the ids of ``name`` whose time is in [start, end]:
    ``/`` sorts before every digit, so ``<end>0`` follows every ``<end>/...``."""
    return row_id(name, start_ms), row_id(name, end_ms) + "0"


def id_prefix(name: str) -> str:
    """Every id of metric ``name`` starts with this."""
    return name + "/"


def raw_row(sample: Sample) -> dict[str, Any]:
    """The ``hdb_raw_analytics`` row of a checked sample."""
    spec = BY_NAME[sample.metric]
    row: dict[str, Any] = {
        "id": row_id(sample.metric, sample.time_ms, sample.labels),
        "metric": sample.metric,
        "time": sample.time_ms,
        "period": RAW_PERIOD_MS,
        "value": _number(sample.value),
    }
    if spec.kind == "timing":
        row["count"] = sample.count
    row.update(zip(spec.labels, sample.labels, strict=True))
    return row


def sample_of(row: Mapping[str, Any]) -> Sample | None:
    """The sample a raw row holds; None for a row that is not one (never written by Shoal)."""
    spec = BY_NAME.get(str(row.get("metric")))
    value = row.get("value")
    time_ms = row.get("time")
    if spec is None or not isinstance(value, int | float) or not isinstance(time_ms, int):
        return None
    labels = tuple(str(row.get(label, "")) for label in spec.labels)
    count = row.get("count", 0)
    return Sample(spec.name, time_ms, float(value), labels, count if isinstance(count, int) else 0)


@dataclass
class _Accumulator:
    count: float = 0.0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf


def aggregate(samples: Iterable[Sample], period_start_ms: int) -> list[dict[str, Any]]:
    """The ``hdb_analytics`` rows of one period (a minute) from its raw samples.

    One row per metric and label values, with ``count``, ``sum``, ``min``, ``max`` and
    ``mean`` of the samples' values. A timing sample weighs ``count`` observations whose
    mean is its value; any other sample weighs one. Rows come sorted by id.
    """
    groups: dict[tuple[str, tuple[str, ...]], _Accumulator] = {}
    for sample in samples:
        spec = BY_NAME.get(sample.metric)
        if spec is None:
            continue
        weight = float(sample.count) if spec.kind == "timing" else 1.0
        if weight <= 0:
            continue
        acc = groups.get((sample.metric, sample.labels))
        if acc is None:
            acc = groups[(sample.metric, sample.labels)] = _Accumulator()
        acc.count += weight
        acc.sum += sample.value * weight
        acc.min = min(acc.min, sample.value)
        acc.max = max(acc.max, sample.value)
    rows: list[dict[str, Any]] = []
    for (name, labels), acc in groups.items():
        spec = BY_NAME[name]
        row: dict[str, Any] = {
            "id": row_id(name, period_start_ms, labels),
            "metric": name,
            "time": period_start_ms,
            "period": AGGREGATE_PERIOD_MS,
            "count": _number(acc.count),
            "sum": _number(acc.sum),
            "min": _number(acc.min),
            "max": _number(acc.max),
            "mean": acc.sum / acc.count,
        }
        row.update(zip(spec.labels, labels, strict=True))
        rows.append(row)
    rows.sort(key=lambda r: str(r["id"]))
    return rows


def _number(value: float) -> int | float:
    """Whole numbers as integers (counts and counter sums read naturally in JSON)."""
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


class Deltas:
    """Increases of monotonic counters between two samples, per series.

    A series seen for the first time counts from zero (its counter started with the
    process, or with the peer, after the previous sample); a counter that went down was
    reset, and its new value is the increase.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def increase(self, name: str, labels: tuple[str, ...], value: float) -> float:
        key = (name, labels)
        current = float(value)
        last = self._last.get(key, 0.0)
        self._last[key] = current
        return current - last if current >= last else current


def second_of(now_ms: int) -> int:
    """The start of the second that ended last before ``now_ms``."""
    return (now_ms // RAW_PERIOD_MS) * RAW_PERIOD_MS - RAW_PERIOD_MS


def minute_of(time_ms: int) -> int:
    """The start of the minute holding ``time_ms``."""
    return (time_ms // AGGREGATE_PERIOD_MS) * AGGREGATE_PERIOD_MS


def until_next_second(now_ms: int, offset_ms: int = 0) -> float:
    """Seconds to sleep until ``offset_ms`` past the next whole second."""
    return ((now_ms // RAW_PERIOD_MS + 1) * RAW_PERIOD_MS + offset_ms - now_ms) / 1000
