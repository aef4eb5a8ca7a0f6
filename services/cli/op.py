"""``shoal op``: any Harper-style operation, through the admin service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from services.cli.app import app
from services.cli.calls import execute
from services.cli.output import emit, fail
from services.cli.settings import Settings, connected


@app.command("op")
@connected()
def op(
    settings: Settings,
    operation: Annotated[str | None, typer.Argument(help="a Harper JSON operation")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="read the operation from a file")
    ] = None,
) -> None:
    """Run any Harper-style operation, e.g. shoal op '{"operation": "describe_all"}'."""
    text = file.read_text() if file is not None else operation
    if not text:
        fail("give the operation as an argument or with --file", 2)
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"not valid JSON: {exc}", 2)
    emit(execute(settings, parsed))
