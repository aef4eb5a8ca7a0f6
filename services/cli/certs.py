"""``shoal certs``: TLS certificates of nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from services.cli.output import fail
from services.common import certs

certs_app = typer.Typer(help="TLS certificates of nodes.", no_args_is_help=True)


@certs_app.command("init")
def certs_init(
    data: Annotated[Path, typer.Option(help="the node's rootPath (keys go to DATA/keys)")],
    name: Annotated[str, typer.Option(help="the node's name (replication.hostname)")],
    ca_dir: Annotated[
        Path | None,
        typer.Option(help="CA folder (ca.key, ca.crt), made when empty; default DATA/ca"),
    ] = None,
    san: Annotated[
        list[str] | None,
        typer.Option(help="another DNS name or IP address of the node (repeatable)"),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="replace an existing node certificate and key")
    ] = False,
) -> None:
    """Make (or reuse) a CA and issue a node certificate signed by it; prints the tls
    section for the node's shoal.yaml."""
    keys = data / "keys"
    if not force and (keys / certs.NODE_CERT_FILE).exists():
        fail(f"{keys / certs.NODE_CERT_FILE} exists; --force replaces it", 2)
    try:
        authority = certs.ensure_authority(ca_dir or data / "ca", f"Shoal-CA-{name}")
        files = certs.ensure_node_files(keys, authority, name, san or [], replace=True)
    except (certs.CertificateError, OSError) as exc:
        fail(str(exc), 2)
    section = {
        "tls": {
            "certificate": str(files.certificate.relative_to(data)),
            "privateKey": str(files.private_key.relative_to(data)),
            "certificateAuthority": str(files.certificate_authority.relative_to(data)),
        }
    }
    typer.echo(f"node certificate for {name} in {keys}/; add to {data}/shoal.yaml:", err=True)
    typer.echo(yaml.safe_dump(section, sort_keys=False), nl=False)
