"""The root ``shoal`` command: its one global option (``--ca``) and the connection
settings it puts on the typer context for every command."""

from __future__ import annotations

import typer

from services.cli.settings import CaOption, Settings

app = typer.Typer(help="Shoal: a replicated document database.", no_args_is_help=True)


@app.callback()
def defaults(ctx: typer.Context, ca: CaOption = None) -> None:
    """Shoal's command line. Node and credentials come from flags, else the environment
    (SHOAL_NODE, SHOAL_USERNAME, SHOAL_PASSWORD, SHOAL_CA), else ~/.config/shoal/cli.yaml
    (`node:`, `username:`, `password:`, `ca:`; keep it private, mode 0600). With a CA
    (`--ca`, before the command), the CLI speaks TLS and verifies the node with it."""
    ctx.obj = Settings.load(ca)
