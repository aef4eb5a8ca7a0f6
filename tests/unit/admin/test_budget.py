"""The admin service's memory budget: the estimate from a request's bytes, and the
per-request and per-process limits."""

from __future__ import annotations

import orjson
import pytest

from services.admin.budget import (
    MIB,
    TEXT_FACTOR,
    VALUE_BYTES,
    BudgetSettings,
    MemoryBudget,
    estimate,
)
from services.common.errors import ResourceExhausted


def test_the_estimate_counts_values_and_text() -> None:
    assert estimate(b"1") == VALUE_BYTES + TEXT_FACTOR
    raw = orjson.dumps({"records": [{}, {}, {}]})
    # ":" once, "[" once, "," twice, plus the document itself.
    assert estimate(raw) == VALUE_BYTES * 5 + TEXT_FACTOR * len(raw)
    # Characters inside strings count too: an overestimate, never an underestimate.
    assert estimate(b'"a,b:c[d"') > estimate(b'"abcdefg"')


def test_a_request_over_its_limit_is_refused_for_good() -> None:
    budget = MemoryBudget(BudgetSettings(request_bytes=10 * MIB, process_bytes=20 * MIB))
    with pytest.raises(ResourceExhausted, match="maxRequestMemory") as info:
        budget.reserve(10 * MIB + 1)
    assert info.value.retry_after_s is None and info.value.reason == "REQUEST_TOO_LARGE"
    assert budget.used == 0


def test_requests_share_the_process_budget() -> None:
    budget = MemoryBudget(BudgetSettings(request_bytes=10 * MIB, process_bytes=18 * MIB))
    first = budget.reserve(8 * MIB)
    second = budget.reserve(8 * MIB)
    with pytest.raises(ResourceExhausted, match="maxMemory") as info:
        budget.reserve(8 * MIB)
    assert info.value.retry_after_s == 1.0
    # An answer grows its reservation under both limits.
    with pytest.raises(ResourceExhausted, match="maxRequestMemory"):
        first.grow(3 * MIB, "this answer")
    first.grow(2 * MIB, "this answer")
    with pytest.raises(ResourceExhausted, match="maxMemory"):
        second.grow(1 * MIB, "this answer")
    first.release()
    first.release()  # once only
    assert budget.used == 8 * MIB
    budget.reserve(10 * MIB).release()
    second.release()
    assert budget.used == 0
