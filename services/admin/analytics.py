"""get_analytics and list_metrics, shared by Execute and the typed RPCs: the node-local
analytics tables (``system.hdb_raw_analytics`` per second, ``system.hdb_analytics`` per
minute; rows in ``services.common.analytics``) are read through storage's
SearchByConditions with the caller's own credentials, as one primary-key range per
metric and time range, plus the caller's conditions.

Decisions: an unknown metric is NOT_FOUND (the metrics are a fixed, built-in list, so a
name outside it is a mistake, not an empty history); a known metric without rows in the
range answers an empty list. A result is bounded by ``analytics.maxRows``: more matching
rows are refused with RESOURCE_EXHAUSTED rather than silently cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import storage_pb2 as spb

from services.admin.node import AdminNode, Caller
from services.common import analytics
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted

TABLES = {
    analytics.RAW_PERIOD_MS: analytics.RAW_TABLE,
    analytics.AGGREGATE_PERIOD_MS: analytics.AGGREGATE_TABLE,
}
METRIC_TYPES = ("builtin", "custom")
SYSTEM_DATABASE = "system"


@dataclass(frozen=True)
class AnalyticsQuery:
    """One get_analytics request: a metric, an inclusive time range of the rows' ``time``
    (Unix milliseconds), the period (1000: per-second rows, 60000: per-minute rows),
    attributes to return (all when empty) and conditions every row must also match."""

    metric: str
    start_ms: int = 0
    end_ms: int = analytics.MAX_TIME_MS
    period_ms: int = analytics.AGGREGATE_PERIOD_MS
    attributes: tuple[str, ...] = ()
    conditions: tuple[spb.Condition, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        """INVALID_ARGUMENT or NOT_FOUND naming the problem."""
        if not self.metric:
            raise InvalidArgument("get_analytics: 'metric' is required")
        if self.metric not in analytics.BY_NAME:
            raise NotFound(
                f"get_analytics: unknown metric {self.metric!r}; list_metrics lists them"
                f" ({', '.join(m.name for m in analytics.METRICS)})"
            )
        for name, value in (("start_time", self.start_ms), ("end_time", self.end_ms)):
            if not 0 <= value <= analytics.MAX_TIME_MS:
                raise InvalidArgument(
                    f"get_analytics: '{name}' must be a time in Unix milliseconds"
                    f" between 0 and {analytics.MAX_TIME_MS}"
                )
        if self.end_ms < self.start_ms:
            raise InvalidArgument("get_analytics: 'end_time' is before 'start_time'")
        if self.period_ms not in TABLES:
            raise InvalidArgument(
                "get_analytics: 'period' must be 1000 (per-second rows) or 60000 (per-minute rows)"
            )

    def request(self, max_rows: int) -> spb.SearchByConditionsRequest:
        """The storage search: the metric's id range, then the caller's conditions; one
        row more than ``max_rows`` to tell a result that is too large."""
        low, high = analytics.id_bounds(self.metric, self.start_ms, self.end_ms)
        in_range = spb.Condition(
            comparison=spb.Comparison(
                attribute="id",
                comparator=spb.COMPARATOR_BETWEEN,
                value=orjson.dumps([low, high]),
            )
        )
        return spb.SearchByConditionsRequest(
            database=SYSTEM_DATABASE,
            table=TABLES[self.period_ms],
            operator=spb.LOGICAL_OPERATOR_AND,
            conditions=[in_range, *self.conditions],
            get_attributes=list(self.attributes),
            limit=max_rows + 1,
        )


async def get_analytics(node: AdminNode, caller: Caller, query: AnalyticsQuery) -> list[Any]:
    """The rows of the query, oldest first (then by label values). Super user only."""
    caller.require_super_user("get_analytics")
    query.validate()
    max_rows = node.config.analytics.max_rows
    chunks = await node.stream(
        node.storage.SearchByConditions, query.request(max_rows), caller.metadata
    )
    rows = [orjson.loads(r) for chunk in chunks for r in chunk.records]
    if len(rows) > max_rows:
        raise ResourceExhausted(
            f"get_analytics: more than {max_rows} rows match (analytics.maxRows); narrow"
            " start_time and end_time, or add conditions"
        )
    return rows


def list_metrics(caller: Caller, metric_types: Sequence[str] = ("builtin",)) -> list[str]:
    """Names of the metrics get_analytics reads. Shoal's metrics are all built in; there
    are no custom metrics, so ``custom`` adds none. Super user only."""
    caller.require_super_user("list_metrics")
    unknown = sorted(set(metric_types) - set(METRIC_TYPES))
    if unknown:
        raise InvalidArgument(
            f"list_metrics: unknown metric type {unknown[0]!r}; use 'builtin' or 'custom'"
        )
    if "builtin" not in metric_types:
        return []
    return [m.name for m in analytics.METRICS]


# -- typed messages ------------------------------------------------------------------------


def query_from_proto(request: apb.GetAnalyticsRequest) -> AnalyticsQuery:
    """The query of a typed request: zero times and period take their defaults; labels
    must equal the given values."""
    conditions = tuple(
        spb.Condition(
            comparison=spb.Comparison(
                attribute=label, comparator=spb.COMPARATOR_EQUALS, value=orjson.dumps(value)
            )
        )
        for label, value in sorted(request.labels.items())
    )
    spec = analytics.BY_NAME.get(request.metric)
    if spec is not None:
        unknown = sorted(set(request.labels) - set(spec.labels))
        if unknown:
            raise InvalidArgument(
                f"get_analytics: {request.metric} has no label {unknown[0]!r}"
                f" (its labels: {', '.join(spec.labels) or 'none'})"
            )
    return AnalyticsQuery(
        metric=request.metric,
        start_ms=request.start_time_ms,
        end_ms=request.end_time_ms or analytics.MAX_TIME_MS,
        period_ms=request.period_ms or analytics.AGGREGATE_PERIOD_MS,
        conditions=conditions,
    )


def row_to_proto(row: dict[str, Any]) -> apb.AnalyticsRow:
    """A row as the typed AnalyticsRow."""
    spec = analytics.BY_NAME.get(str(row.get("metric")))
    labels = {k: str(row[k]) for k in (spec.labels if spec else ()) if k in row}
    message = apb.AnalyticsRow(
        id=str(row.get("id", "")),
        metric=str(row.get("metric", "")),
        time_ms=int(row.get("time", 0)),
        period_ms=int(row.get("period", 0)),
        labels=labels,
    )
    for name in ("value", "count", "sum", "min", "max", "mean"):
        value = row.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            setattr(message, name, float(value))
    return message
