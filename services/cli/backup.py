"""``shoal backup``: a database's backup (tar.gz) and point-in-time recovery, streamed
through a node's admin service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from shoal.admin.v1 import admin_pb2 as apb

from services.cli.calls import admin_stub, rpc_failed
from services.cli.output import emit, fail
from services.cli.settings import Settings, connected
from services.common.auth import basic_metadata

backup_app = typer.Typer(
    help="Backups of a database (through a node's admin service).", no_args_is_help=True
)
BACKUP_CHUNK = 1024 * 1024


def _positions_json(positions: Any) -> list[dict[str, Any]]:
    return [{"origin": p.origin, "version": p.version} for p in positions]


def _bytes_progress(label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed:,} bytes"),
        console=Console(stderr=True),
        transient=True,
    )


@backup_app.command("create")
@connected()
def backup_create(
    settings: Settings,
    database: Annotated[str, typer.Option("--database", "-d", help="database to back up")],
    out: Annotated[Path, typer.Option("--out", help="the .tar.gz file to write (never replaced)")],
) -> None:
    """Stream a consistent backup of DATABASE into a file; prints what it holds as JSON."""
    if out.exists():
        fail(f"{out} exists; choose another file", 6)
    partial = out.with_name(out.name + ".partial")
    channel, stub = admin_stub(settings)
    info = None
    try:
        with channel, partial.open("wb") as file, _bytes_progress("backup") as bar:
            task = bar.add_task("backup", total=None)
            stream = stub.GetBackup(
                apb.GetBackupRequest(database=database),
                metadata=basic_metadata(settings.username, settings.password),
            )
            for message in stream:
                file.write(message.chunk)
                bar.advance(task, len(message.chunk))
                if message.HasField("info"):
                    info = message.info
        if info is None:
            fail("the node ended the backup without saying what it holds", 1)
        partial.rename(out)
    except grpc.RpcError as exc:
        rpc_failed(settings, exc)
    finally:
        partial.unlink(missing_ok=True)
    summary = {
        "file": str(out),
        "database": info.database,
        "node_name": info.node_name,
        "taken_at": info.taken_at_ms,
        "rows": info.rows,
        "transactions": info.transactions,
        "size": info.size_bytes,
        "sha256": info.sha256,
        "positions": _positions_json(info.positions),
        "horizons": _positions_json(info.horizons),
    }
    emit(summary)


@backup_app.command("restore")
@connected()
def backup_restore(
    settings: Settings,
    file: Annotated[Path, typer.Argument(help="a backup (.tar.gz)", exists=True, dir_okay=False)],
    until: Annotated[
        int | None, typer.Option("--until", help="restore the state as of this Unix ms time")
    ] = None,
    log: Annotated[
        Path | None,
        typer.Option(
            "--log", help="a later backup whose log is replayed", exists=True, dir_okay=False
        ),
    ] = None,
    database: Annotated[str, typer.Option(help="restore under this database name")] = "",
) -> None:
    """Restore a backup into a node where its database does not exist or has no rows."""
    header = apb.RestoreBackupHeader(database=database)
    if until is not None:
        header.until_ms = until
    total = file.stat().st_size + (log.stat().st_size if log is not None else 0)
    channel, stub = admin_stub(settings)
    with channel, _bytes_progress("restore") as bar:
        task = bar.add_task("restore", total=total)

        def requests() -> Iterator[apb.RestoreBackupRequest]:
            yield apb.RestoreBackupRequest(header=header)
            for chunk, is_log in _chunks(file, log):
                if is_log:
                    yield apb.RestoreBackupRequest(log_chunk=chunk)
                else:
                    yield apb.RestoreBackupRequest(chunk=chunk)
                bar.advance(task, len(chunk))

        try:
            response = stub.RestoreBackup(
                requests(), metadata=basic_metadata(settings.username, settings.password)
            )
        except grpc.RpcError as exc:
            rpc_failed(settings, exc)
    mode = apb.RestoreMode.Name(response.mode).removeprefix("RESTORE_MODE_").lower()
    result = {
        "database": response.database,
        "mode": mode,
        "rows": response.rows,
        "logged_transactions": response.logged_transactions,
        "replayed_transactions": response.replayed_transactions,
        "positions": _positions_json(response.positions),
    }
    emit(result)


def _chunks(file: Path, log: Path | None) -> Iterator[tuple[bytes, bool]]:
    """The backup's bytes, then the later backup's whose log is replayed: (chunk, is_log)."""
    for path, is_log in ((file, False), (log, True)):
        if path is None:
            continue
        with path.open("rb") as source:
            while chunk := source.read(BACKUP_CHUNK):
                yield chunk, is_log
