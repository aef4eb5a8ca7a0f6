"""``shoal user`` and ``shoal role``: users and roles of a node (never replicated)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from services.cli.calls import execute
from services.cli.output import Output, OutputOption, emit, fail
from services.cli.settings import Settings, connected

user_app = typer.Typer(help="Users of a node (never replicated).", no_args_is_help=True)
role_app = typer.Typer(help="Roles of a node (never replicated).", no_args_is_help=True)


@user_app.command("list")
@connected()
def user_list(settings: Settings, output: OutputOption = Output.table) -> None:
    """The node's users (users are local to each node)."""
    users = execute(settings, {"operation": "list_users"})
    for user in users:
        user["role"] = user["role"].get("role", "") if isinstance(user["role"], dict) else ""
    emit(users, output, ["username", "role", "active"])


@user_app.command("add")
@connected()
def user_add(
    settings: Settings,
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str, typer.Option(help="role name (super_user, or one of `role list`)")],
    new_password: Annotated[
        str,
        typer.Option(
            "--new-password",
            envvar="SHOAL_NEW_PASSWORD",
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="the new user's password (prompted when not given)",
        ),
    ],
) -> None:
    """Add a user to the node."""
    body = {"operation": "add_user", "username": name, "password": new_password, "role": role}
    emit(execute(settings, body))


@user_app.command("alter")
@connected()
def user_alter(
    settings: Settings,
    name: Annotated[str, typer.Argument(help="user name")],
    role: Annotated[str | None, typer.Option(help="new role")] = None,
    active: Annotated[
        bool | None, typer.Option("--active/--inactive", help="allow or block sign-in")
    ] = None,
    new_password: Annotated[
        str | None,
        typer.Option("--new-password", envvar="SHOAL_NEW_PASSWORD", help="new password"),
    ] = None,
) -> None:
    """Change a user's role, password or whether it may sign in."""
    body: dict[str, Any] = {"operation": "alter_user", "username": name}
    if role is not None:
        body["role"] = role
    if active is not None:
        body["active"] = active
    if new_password is not None:
        body["password"] = new_password
    if len(body) == 2:
        fail("nothing to change: give --role, --active/--inactive or --new-password", 2)
    emit(execute(settings, body))


@user_app.command("drop")
@connected()
def user_drop(settings: Settings, name: Annotated[str, typer.Argument(help="user name")]) -> None:
    """Remove a user from the node."""
    emit(execute(settings, {"operation": "drop_user", "username": name}))


@role_app.command("list")
@connected()
def role_list(settings: Settings, output: OutputOption = Output.json) -> None:
    """The node's roles and their permissions."""
    roles = execute(settings, {"operation": "list_roles"})
    for role in roles:
        role["super_user"] = bool(role["permission"].get("super_user"))
    emit(roles, output, ["role", "super_user"])
