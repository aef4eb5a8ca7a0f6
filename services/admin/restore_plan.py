"""Which state a restore rebuilds, and from what: a pure function of the archives'
manifests and the requested time.

A backup B holds its database's rows as of its consistent point, the positions P (per
origin, every transaction at or below P[o] is reflected) and its retained log, which
holds every transaction above the horizons H (per origin) up to P. The state as of a time
T is the effect of every transaction whose version is at or before T. So:

* **snapshot**: without ``until``, the backup's rows (the state when it was taken). Its
  log is written to the node's log as history; nothing is replayed.
* **snapshot and log**: the rows of a backup A taken before T (every P_A[o] <= T), then
  the transactions of a log archive L (A itself, or a later backup) above P_A and at or
  before T. L must be taken after T and its log must reach back to A: for every origin,
  H_L[o] <= P_A[o] (nothing between A and L was purged) and P_L[o] >= P_A[o].
  Without ``until`` but with a log archive, every transaction of L is replayed.
* **log**: when A was taken after T but L's log goes back to the database's first
  transaction (every horizon is 0), an empty database with L's transactions up to T.

Anything else cannot give the state at T and is refused (FAILED_PRECONDITION) with the
reason. "The state at T" is as recorded by the node the log archive comes from: a
transaction committed elsewhere before T but received there after the backup was taken
is not in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from shoal.admin.v1 import admin_pb2 as apb
from shoal.storage.v1 import types_pb2

from services.admin.backup_archive import Manifest
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.hlc import MAX_VERSION, format_version, version_from_ms, version_ms


@dataclass(frozen=True)
class RestorePlan:
    """What the restore sends to storage."""

    mode: apb.RestoreMode.ValueType
    database: str  # target database
    positions: dict[str, int]  # what the rows reflect (empty in log mode)
    horizons: dict[str, int]  # log horizons once restored
    tables: tuple[types_pb2.TableSchema, ...]
    send_rows: bool  # the base archive's rows
    log_from_base: bool  # whose log is sent: the base archive's or the log archive's
    replay_until: int  # version bound of replayed transactions (0: none)


def until_version(until_ms: int) -> int:
    """The greatest version at or before Unix millisecond ``until_ms``."""
    return min(version_from_ms(until_ms + 1) - 1, MAX_VERSION)


def when(version: int) -> str:
    """A version as a readable UTC time."""
    ms = version_ms(version)
    try:
        stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms"
    return f"{stamp}Z ({ms} ms)"


def _check_log_reaches(base: Manifest, log: Manifest, log_label: str, base_label: str) -> None:
    """The log archive holds every transaction after the base's positions."""
    for origin in sorted(set(log.positions) | set(log.horizons)):
        horizon = log.horizons.get(origin, 0)
        if horizon > base.positions.get(origin, 0):
            raise FailedPrecondition(
                f"the log of {log_label} does not reach back to {base_label}: transactions"
                f" of {origin} up to version {format_version(horizon)} were purged before"
                f" {log_label} was taken, and {base_label} has them only up to"
                f" {format_version(base.positions.get(origin, 0))}; use an older base"
                " backup or a log backup taken sooner after it"
            )
    for origin, position in sorted(base.positions.items()):
        if log.positions.get(origin, 0) < position:
            raise FailedPrecondition(
                f"{log_label} is older than {base_label} for origin {origin} (version"
                f" {format_version(log.positions.get(origin, 0))} < {format_version(position)});"
                " the log backup must be taken after the base backup"
            )


def plan_restore(
    base: Manifest,
    log: Manifest | None,
    until_ms: int | None,
    database: str = "",
    base_label: str = "the backup",
    log_label: str = "the log backup",
) -> RestorePlan:
    """Choose how to rebuild the database (see the module docstring)."""
    target = database or base.database
    if log is not None and log.database != base.database:
        raise InvalidArgument(
            f"{log_label} is of database {log.database!r}, {base_label} of {base.database!r}"
        )
    if until_ms is None:
        if log is None:
            return RestorePlan(
                apb.RESTORE_MODE_SNAPSHOT,
                target,
                dict(base.positions),
                dict(base.horizons),
                base.tables,
                send_rows=True,
                log_from_base=True,
                replay_until=0,
            )
        _check_log_reaches(base, log, log_label, base_label)
        return RestorePlan(
            apb.RESTORE_MODE_SNAPSHOT_AND_LOG,
            target,
            dict(base.positions),
            dict(log.horizons),
            base.tables,
            send_rows=True,
            log_from_base=False,
            replay_until=MAX_VERSION,
        )
    bound = until_version(until_ms)
    source, source_label = (log, log_label) if log is not None else (base, base_label)
    if version_ms(source.node_time) <= until_ms:
        hint = (
            "; give a backup taken after that time as the log backup"
            if log is None
            else "; give a log backup taken after that time"
        )
        raise FailedPrecondition(
            f"{source_label} was taken at {when(source.node_time)}, not after"
            f" {when(bound)}: its log cannot tell what happened until then{hint}"
        )
    if all(v <= bound for v in base.positions.values()):
        if log is not None:
            _check_log_reaches(base, log, log_label, base_label)
        return RestorePlan(
            apb.RESTORE_MODE_SNAPSHOT if log is None else apb.RESTORE_MODE_SNAPSHOT_AND_LOG,
            target,
            dict(base.positions),
            dict(source.horizons),
            base.tables,
            send_rows=True,
            log_from_base=log is None,
            replay_until=bound,
        )
    if not any(source.horizons.values()):
        return RestorePlan(
            apb.RESTORE_MODE_LOG,
            target,
            {},
            {},
            (),
            send_rows=False,
            log_from_base=log is None,
            replay_until=bound,
        )
    newest = max(base.positions.values())
    raise FailedPrecondition(
        f"{base_label} holds transactions up to {when(newest)}, after {when(bound)}, and the"
        f" log of {source_label} no longer goes back to the database's first transaction"
        " (older entries were purged): restore a backup taken before that time, with this"
        " one as the log backup"
    )
