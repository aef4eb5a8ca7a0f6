"""Write confirmation's pure pieces: the replicator's record of peers' positions, and
storage's validation, time budget and error."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from shoal.storage.v1 import types_pb2

from services.common.errors import InvalidArgument
from services.replicator.confirmation import Confirmations, Group
from services.storage.confirmation import (
    DEFAULT_WAIT_S,
    REASON,
    REASON_IMPOSSIBLE,
    Need,
    not_confirmed,
    plan,
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
    error = not_confirmed(42, Need(3), ["b"], 2.5)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == REASON
    assert "committed locally" in error.message and "will still replicate" in error.message
    assert "2 of 3" in error.message and "confirmed by b" in error.message
    assert error.metadata == {"version": "42", "confirmed": "1", "missing": "2"}


async def test_a_group_counts_only_its_own_peers() -> None:
    confirmations = Confirmations("a")
    residents = Group(frozenset({"c", "d"}), 2)
    waiting = asyncio.create_task(confirmations.wait("db", 10, 0, 5.0, [residents]))
    await asyncio.sleep(0)
    confirmations.record("b", [position("db", "a", 10)])  # holds a stub: not a resident
    confirmations.record("c", [position("db", "a", 10)])
    await asyncio.sleep(0)
    assert not waiting.done()
    confirmations.record("d", [position("db", "a", 11)])
    assert await asyncio.wait_for(waiting, 1) == ["b", "c", "d"]
    # A count and groups must all be met.
    both = [Group(frozenset({"c"}), 1), Group(frozenset({"e", "f"}), 1)]
    assert await confirmations.wait("db", 10, 1, 0.05, both) == ["b", "c", "d"]


def test_plan_counts_the_writer_only_where_it_holds_records_whole() -> None:
    recipients = ["b", "c", "d"]
    # Without residents: N peers of any kind.
    assert plan("a", 2, "db", recipients, [("t", (), True)]) == Need(2)
    # The writer is a resident: N other residents.
    need = plan("a", 1, "db", recipients, [("t", ("a", "c"), True)])
    assert need.count == 0 and [(g.peers, g.count) for g in need.groups] == [(("c",), 1)]
    # The writer holds stubs: N + 1 residents, so the write is whole on N + 1 nodes.
    need = plan("a", 1, "db", recipients, [("t", ("d", "b"), False), ("u", ("b", "d"), False)])
    assert [(g.residents, g.peers, g.count, g.tables) for g in need.groups] == [
        (("b", "d"), ("b", "d"), 2, ("t", "u"))
    ]
    # Mixed: records without residents and groups, each with its own requirement.
    need = plan("a", 1, "db", recipients, [("t", (), True), ("r", ("a", "b"), True)])
    assert need.count == 1 and len(need.groups) == 1
    assert need.missing(["c"]) == [(1, 1, need.groups[0])]
    assert need.missing(["b"]) == []


def test_plan_refuses_what_the_residents_cannot_confirm() -> None:
    with pytest.raises(InvalidArgument) as refused:
        plan("a", 2, "db", ["b", "c", "d"], [("t", ("a", "c"), True)])
    assert refused.value.reason == REASON_IMPOSSIBLE
    assert "whole on 3 nodes" in refused.value.message
    assert "nothing was written" in refused.value.message
    with pytest.raises(InvalidArgument, match="holds only stubs"):
        plan("a", 2, "db", ["b", "c", "d"], [("t", ("b", "c"), False)])
    # A resident that cannot receive the write (not a recipient) cannot confirm it.
    with pytest.raises(InvalidArgument, match=r"and 1 can receive the write \(c\)"):
        plan("a", 1, "db", ["c"], [("t", ("b", "c"), False)])


def test_the_timeout_error_names_the_residents_still_missing() -> None:
    need = plan("a", 1, "db", ["b", "c", "d"], [("t", ("b", "d"), False)])
    error = not_confirmed(7, need, ["b", "c"], 1.0)
    assert "1 of 2" in error.message
    assert "1 more of the residents b, d of records of t" in error.message
    assert "holds only stubs" in error.message
    assert error.metadata["missing"] == "1"
