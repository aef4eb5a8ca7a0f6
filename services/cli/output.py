"""How the CLI answers: data on stdout (JSON, or a table for people), messages on stderr,
and the exit status of a failure."""

from __future__ import annotations

import enum
import sys
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.table import Table


class Output(enum.StrEnum):
    """What ``-o`` selects for a command that lists or shows things."""

    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table or json")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``shoal: message`` on stderr and exit with ``code``."""
    typer.echo(f"shoal: {message}", err=True)
    raise typer.Exit(code)


def emit(result: Any, output: Output = Output.json, columns: list[str] | None = None) -> None:
    """JSON (stable, for scripts) or, for a list with ``columns``, a table for people."""
    if output is Output.json or columns is None or not isinstance(result, list):
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(*columns)
    for row in result:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    Console().print(table)
