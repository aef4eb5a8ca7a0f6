"""The ``shoal`` command line.

    shoal local up              a local cluster on 127.0.0.1..N (what `make run` does)
    shoal certs init            a CA (made once) and a node certificate signed by it
    shoal node start -c FILE    one node: its services as supervised processes
    shoal storage|replicator|admin -c FILE
                                one service in the foreground (containers use these)
    shoal data insert|get|search
                                talk to a node's storage service
    shoal op '<json>'           any Harper-style operation, through the admin service
    shoal backup create|restore a database's backup (tar.gz), point-in-time recovery
    shoal cluster status|nodes|add-node|remove-node|routes
                                cluster operations
    shoal user list|add|alter|drop, shoal role list
                                users and roles of a node

Credentials come from --username/--password or SHOAL_USERNAME / SHOAL_PASSWORD. A node
whose ports serve TLS is verified against the CA certificate given with ``shoal --ca FILE``,
SHOAL_CA or ``ca:`` in the CLI config; without one the CLI speaks plaintext. Data goes to
stdout (JSON, one record per line); messages go to stderr. Exit codes follow the gRPC
status of a failed call (e.g. 5 for NOT_FOUND, 16 for UNAUTHENTICATED).
"""

from __future__ import annotations

from services.cli import node, op  # noqa: F401  (their commands join the root app)
from services.cli.app import app
from services.cli.backup import backup_app
from services.cli.certs import certs_app
from services.cli.cluster import cluster_app
from services.cli.data import data_app
from services.cli.local import local_app
from services.cli.users import role_app, user_app

app.add_typer(local_app, name="local")
app.add_typer(node.node_app, name="node")
app.add_typer(data_app, name="data")
app.add_typer(cluster_app, name="cluster")
app.add_typer(user_app, name="user")
app.add_typer(role_app, name="role")
app.add_typer(certs_app, name="certs")
app.add_typer(backup_app, name="backup")

__all__ = ["app", "main"]


def main() -> None:
    app()
