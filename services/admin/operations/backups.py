"""Backups: get_backup writes a backup into the node's backups folder, restore_backup
restores one from it (the typed path is the admin service's GetBackup / RestoreBackup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.admin.v1 import admin_pb2 as apb

from services.admin.backup import Backups
from services.admin.backup_archive import ArchiveReader
from services.admin.operations.body import Body, Json, harper_time
from services.admin.operations.execute import Execute
from services.common.errors import InvalidArgument


def _versions_json(positions: Any) -> Json:
    return [
        {"origin": p.origin, "version": p.version, "time": harper_time(p.version)}
        for p in positions
    ]


@dataclass(frozen=True)
class GetBackup:
    database: str
    name: str | None  # the backup's name (None: one made of the database and the time)


def parse_get_backup(body: Body) -> GetBackup:
    database = body.text("database", "schema")
    return GetBackup(database, body.text("name", required=False) or None)


async def get_backup(ex: Execute, request: GetBackup) -> Json:
    """Write a backup into the node's backups folder (Harper answers the archive itself
    over HTTP; JSON cannot carry it: the typed GetBackup streams it)."""
    saved = await Backups(ex.node).save(request.database, request.name)
    info = saved.result.info()
    return {
        "message": f"backup of database '{request.database}' saved as '{saved.name}'",
        "name": saved.name,
        "file": saved.file,
        "database": info.database,
        "node_name": info.node_name,
        "taken_at": info.taken_at_ms,
        "node_time": info.node_time,
        "rows": info.rows,
        "transactions": info.transactions,
        "size": info.size_bytes,
        "sha256": info.sha256,
        "positions": _versions_json(info.positions),
        "horizons": _versions_json(info.horizons),
    }


async def restore_backup(ex: Execute, body: Body) -> Json:
    """Restore a backup of the node's backups folder, optionally to a point in time. Its
    body is read here (parser: ``whole``): the named backups are looked up in the folder
    before the last field is read."""
    raw_until = body.value("until")
    if raw_until is not None and (
        isinstance(raw_until, bool) or not isinstance(raw_until, int | float)
    ):
        raise InvalidArgument("restore_backup: 'until' must be a time in Unix milliseconds")
    until = None if raw_until is None else body.millis(raw_until, "until")
    backups = Backups(ex.node)
    name = body.text("backup", "name")
    log_name = body.text("log_backup", required=False)
    base = ArchiveReader(backups.path_of(name), f"backup '{name}'")
    log = ArchiveReader(backups.path_of(log_name), f"backup '{log_name}'") if log_name else None
    result = await backups.restore(
        base, log, until, body.text("database", "schema", required=False)
    )
    response = result.response()
    mode = apb.RestoreMode.Name(response.mode).removeprefix("RESTORE_MODE_").lower()
    if until is not None:
        state = f"as of {until}"
    elif log_name:
        state = f"rolled forward through the log of '{log_name}'"
    else:
        state = "as backed up"
    return {
        "message": f"database '{response.database}' restored from backup '{name}' ({state})",
        "database": response.database,
        "mode": mode,
        "rows": response.rows,
        "logged_transactions": response.logged_transactions,
        "replayed_transactions": response.replayed_transactions,
        "positions": _versions_json(response.positions),
    }
