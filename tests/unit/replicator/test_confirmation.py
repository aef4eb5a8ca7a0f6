"""Write confirmation's pure pieces: the replicator's record of peers' positions, and
storage's validation, time budget and error."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from shoal.storage.v1 import types_pb2

from services.common.errors import InvalidArgument
from services.replicator.confirmation import Confirmations
from services.storage.confirmation import (
    DEFAULT_WAIT_S,
    REASON,
    not_confirmed,
    requested,
    wait_budget,
)


def position(database: str, origin: str, version: int) -> types_pb2.Position:
    return types_pb2.Position(database=database, origin=origin, version=version)


async def test_a_wait_ends_when_enough_distinct_peers_reach_the_version() -> None:
    confirmations = Confirmations("a")
    waiting = asyncio.create_task(confirmations.wait("db", 10, 2, 5.0))
    await asyncio.sleep(0)
    confirmations.record("b", [position("db", "a", 9)])  # not yet
    confirmations.record("b", [position("other", "a", 50)])  # another database
    confirmations.record("b", [position("db", "c", 50)])  # another origin
    confirmations.record("b", [position("db", "a", 10)])
    confirmations.record("b", [position("db", "a", 12)])  # the same peer again
    await asyncio.sleep(0)
    assert not waiting.done()
    confirmations.record("c", [position("db", "a", 11)])
    assert await asyncio.wait_for(waiting, 1) == ["b", "c"]


async def test_confirmations_reported_before_the_wait_count_and_never_go_back() -> None:
    confirmations = Confirmations("a")
    confirmations.record("b", [position("db", "a", 20)])
    confirmations.record("b", [position("db", "a", 5)])  # an older report
    assert await confirmations.wait("db", 20, 1, 0.01) == ["b"]


async def test_a_wait_that_times_out_answers_with_the_peers_so_far() -> None:
    confirmations = Confirmations("a")
    confirmations.record("b", [position("db", "a", 30)])
    assert await confirmations.wait("db", 30, 2, 0.05) == ["b"]
    assert await confirmations.wait("db", 31, 1, 0.05) == []


def test_requested_confirmation_must_not_be_negative() -> None:
    assert requested(0) == 0 and requested(3) == 3
    with pytest.raises(InvalidArgument, match="-2"):
        requested(-2)


def test_the_wait_keeps_a_margin_before_the_deadline() -> None:
    assert wait_budget(None) == DEFAULT_WAIT_S
    assert wait_budget(3.0) == pytest.approx(2.7)
    assert wait_budget(60.0) == pytest.approx(59.5)
    assert wait_budget(0.0) == 0.0


def test_the_timeout_error_says_the_write_is_committed_and_what_is_missing() -> None:
    error = not_confirmed(42, 3, ["b"], 2.5)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == REASON
    assert "committed locally" in error.message and "will still replicate" in error.message
    assert "2 of 3" in error.message and "confirmed by b" in error.message
    assert error.metadata == {"version": "42", "confirmed": "1", "missing": "2"}
