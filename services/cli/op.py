"""``shoal op``: any Harper-style operation, through the admin service.

The operation goes as given (once checked to be JSON); the answer's JSON is printed on
stdout as the node sent it, an error's ``{"error": ...}`` included, and the exit status
is the answer's gRPC status code (0: success; 3 INVALID_ARGUMENT, 5 NOT_FOUND, 6
ALREADY_EXISTS, 7 PERMISSION_DENIED, 14 UNAVAILABLE, 16 UNAUTHENTICATED, ...); 2 for a
command line that is not right (no operation, not JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from services.cli.app import app
from services.cli.calls import execute_json
from services.cli.output import fail
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
        json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"not valid JSON: {exc}", 2)
    answer, code = execute_json(settings, text.encode())
    sys.stdout.write(answer.decode() + "\n")
    if code:
        raise typer.Exit(code)
