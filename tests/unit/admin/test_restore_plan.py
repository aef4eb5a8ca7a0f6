"""Which state a restore rebuilds: snapshot, snapshot and log, or log alone; and what it
refuses, with the reason."""

from __future__ import annotations

import pytest
from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import types_pb2

from services.admin.backup_archive import Manifest
from services.admin.restore_plan import plan_restore, until_version
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.hlc import MAX_VERSION, version_from_ms

T0 = 1_700_000_000_000  # Unix ms
DOG = (types_pb2.TableSchema(name="dog", primary_key="id", replicate=True),)


def v(ms_after: int, counter: int = 0) -> int:
    """The version at T0 + ms_after."""
    return version_from_ms(T0 + ms_after) + counter


def backup(
    taken: int,
    positions: dict[str, int],
    horizons: dict[str, int] | None = None,
    database: str = "dev",
) -> Manifest:
    return Manifest(database, "a", v(taken), positions, horizons or {}, DOG)


def test_until_version_is_the_last_version_of_that_millisecond() -> None:
    assert until_version(T0) == version_from_ms(T0 + 1) - 1
    assert until_version(1 << 60) == MAX_VERSION


def test_without_until_the_backup_is_restored_as_it_was() -> None:
    base = backup(10, {"a": v(9), "b": v(5)}, {"a": v(2)})
    plan = plan_restore(base, None, None)
    assert plan.mode == apb.RESTORE_MODE_SNAPSHOT and plan.database == "dev"
    assert plan.positions == base.positions and plan.horizons == base.horizons
    assert plan.send_rows and plan.log_from_base and plan.replay_until == 0
    assert plan_restore(base, None, None, "copy").database == "copy"


def test_without_until_a_log_backup_is_replayed_whole() -> None:
    base = backup(10, {"a": v(9)})
    later = backup(20, {"a": v(19), "b": v(15)}, {"a": v(5)})
    plan = plan_restore(base, later, None)
    assert plan.mode == apb.RESTORE_MODE_SNAPSHOT_AND_LOG
    assert plan.positions == base.positions and plan.horizons == later.horizons
    assert not plan.log_from_base and plan.replay_until == MAX_VERSION


def test_until_between_a_base_and_a_later_log() -> None:
    base = backup(10, {"a": v(9)})
    later = backup(20, {"a": v(19), "b": v(15)}, {"a": v(5)})
    plan = plan_restore(base, later, T0 + 12)
    assert plan.mode == apb.RESTORE_MODE_SNAPSHOT_AND_LOG
    assert plan.replay_until == until_version(T0 + 12) and plan.send_rows
    assert not plan.log_from_base


def test_until_after_every_write_of_a_single_backup_is_that_backup() -> None:
    base = backup(10, {"a": v(5)})
    plan = plan_restore(base, None, T0 + 7)
    assert plan.mode == apb.RESTORE_MODE_SNAPSHOT and plan.log_from_base


def test_until_before_a_backup_with_its_whole_log_replays_it_from_empty() -> None:
    base = backup(10, {"a": v(9), "b": v(4)})
    plan = plan_restore(base, None, T0 + 5)
    assert plan.mode == apb.RESTORE_MODE_LOG
    assert plan.positions == {} and plan.tables == () and not plan.send_rows
    assert plan.log_from_base and plan.replay_until == until_version(T0 + 5)


def test_until_before_a_backup_whose_log_was_purged_is_refused() -> None:
    base = backup(10, {"a": v(9)}, {"a": v(3)})
    with pytest.raises(FailedPrecondition, match="first transaction"):
        plan_restore(base, None, T0 + 5)


def test_a_log_that_ends_before_until_is_refused() -> None:
    base = backup(10, {"a": v(9)})
    with pytest.raises(FailedPrecondition, match="not after"):
        plan_restore(base, None, T0 + 10)
    later = backup(20, {"a": v(19)})
    with pytest.raises(FailedPrecondition, match="give a log backup taken after"):
        plan_restore(base, later, T0 + 25)


def test_a_log_with_a_gap_after_the_base_is_refused() -> None:
    base = backup(10, {"a": v(9)})
    purged = backup(20, {"a": v(19)}, {"a": v(12)})
    with pytest.raises(FailedPrecondition, match="does not reach back"):
        plan_restore(base, purged, T0 + 15)
    new_origin = backup(20, {"a": v(19), "c": v(18)}, {"c": v(11)})
    with pytest.raises(FailedPrecondition, match="transactions of c"):
        plan_restore(base, new_origin, T0 + 15)


def test_a_log_older_than_the_base_is_refused() -> None:
    base = backup(10, {"a": v(9)})
    older = backup(5, {"a": v(4)})
    with pytest.raises(FailedPrecondition, match="older than"):
        plan_restore(base, older, None)


def test_archives_of_different_databases_do_not_mix() -> None:
    with pytest.raises(InvalidArgument, match="of database 'other'"):
        plan_restore(backup(10, {}), backup(20, {}, database="other"), None)
