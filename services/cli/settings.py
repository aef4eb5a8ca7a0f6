"""What the CLI connects with, resolved once: each value from its flag, else its environment
variable, else the CLI config (cli.yaml), else the default.

The root command loads cli.yaml into a :class:`Settings` and puts it on the typer context;
a command decorated with :func:`connected` gets the ``--node``, ``--username`` and
``--password`` options and is called with the settings its flags make of it. Flags and
environment variables are read by the options themselves (``envvar=``), so ``--help``
names them; cli.yaml fills what they leave unset.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from services.cli.output import fail

CA_ENV = "SHOAL_CA"
CONFIG_ENV = "SHOAL_CLI_CONFIG"
# cli.yaml's keys and the environment variables that take precedence over them.
CLI_CONFIG_KEYS = {
    "node": "SHOAL_NODE",
    "username": "SHOAL_USERNAME",
    "password": "SHOAL_PASSWORD",
    "ca": CA_ENV,
}

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="path to shoal.yaml", exists=True)
]
StorageNodeOption = Annotated[
    str,
    typer.Option("--node", envvar="SHOAL_NODE", help="HOST[:PORT] of the node's storage service"),
]
AdminNodeOption = Annotated[
    str,
    typer.Option(
        "--node", envvar="SHOAL_NODE", help="HOST[:PORT] of the node's admin service (port 9925)"
    ),
]
HostOption = Annotated[str, typer.Option("--node", envvar="SHOAL_NODE", help="HOST of the node")]
UserOption = Annotated[str, typer.Option("--username", "-u", envvar="SHOAL_USERNAME")]
PasswordOption = Annotated[str, typer.Option("--password", "-p", envvar="SHOAL_PASSWORD")]
CaOption = Annotated[
    Path | None,
    typer.Option(
        "--ca",
        envvar=CA_ENV,
        help="CA certificate (PEM) to verify nodes whose ports serve TLS",
    ),
]


@dataclass(frozen=True)
class Settings:
    """The node the CLI talks to, the credentials it signs in with and the CA certificate
    it verifies TLS ports with (None: plaintext)."""

    node: str = "127.0.0.1"
    username: str = "admin"
    password: str = ""
    ca: Path | None = None

    @classmethod
    def load(cls, ca: Path | None = None) -> Settings:
        """The settings before any command's flags: ``ca`` (``--ca`` or SHOAL_CA), else
        cli.yaml; cli.yaml's values only where their environment variable is unset."""
        path = cli_config_path()
        values = read_cli_config(path) if path.is_file() else {}
        found: dict[str, Any] = {}
        for key, env in CLI_CONFIG_KEYS.items():
            if key in values and env not in os.environ:
                found[key] = str(values[key])
        if "ca" in found:  # relative to the CLI config's folder
            found["ca"] = path.parent / Path(found["ca"]).expanduser()
        if ca is not None:
            found["ca"] = ca
        return cls(**found)

    def given(self, **flags: Any) -> Settings:
        """These settings with the values of the flags (or their environment variables)
        that were given."""
        return dataclasses.replace(self, **flags)

    def require_password(self) -> None:
        if not self.password:
            fail("no password: use --password or SHOAL_PASSWORD", 2)

    def address(self, default_port: int) -> str:
        """The node as HOST:PORT, with ``default_port`` when it names no port."""
        return self.node if ":" in self.node else f"{self.node}:{default_port}"


def cli_config_path() -> Path:
    """$SHOAL_CLI_CONFIG, else ~/.config/shoal/cli.yaml."""
    default = Path.home() / ".config" / "shoal" / "cli.yaml"
    return Path(os.environ.get(CONFIG_ENV, default))


def read_cli_config(path: Path) -> dict[str, Any]:
    """The CLI config's mapping; exits 2 when it is not one of CLI_CONFIG_KEYS."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        fail(f"{path}: not valid YAML: {exc}", 2)
    if not isinstance(values, dict) or not set(values) <= set(CLI_CONFIG_KEYS):
        fail(f"{path}: expected a mapping with {', '.join(CLI_CONFIG_KEYS)}", 2)
    return values


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether a parameter's value came from the command line or the environment."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def connected(
    node_option: Any = AdminNodeOption, credentials: bool = True
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the ``--node`` option (``node_option``; None: none) and, with
    ``credentials``, ``--username`` and ``--password``; the command is called with the
    resolved :class:`Settings` as its first argument instead."""
    names = {} if node_option is None else {"node": node_option}
    if credentials:
        names |= {"username": UserOption, "password": PasswordOption}
    added = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=getattr(Settings, name),
            annotation=kind,
        )
        for name, kind in names.items()
    ]
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        kept = list(signature.parameters.values())[1:]  # the first one takes the Settings

        @functools.wraps(command)
        def run(ctx: typer.Context, **kwargs: Any) -> None:
            values = {name: kwargs.pop(name) for name in names}
            flags = {k: v for k, v in values.items() if _given(ctx, k)}
            found = ctx.find_object(Settings)
            settings = found if found is not None else Settings.load()
            command(settings.given(**flags), **kwargs)

        parameters = [*kept, *added, context]
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
        return run

    return decorate
