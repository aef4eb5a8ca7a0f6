"""A peer whose certificate a node revokes (by a route's revokedCertificates, a member
row's revoked_certificates or a CRL of tls.crl) is shown disconnected in that node's
cluster_status as soon as its session is cut, and stays so while it keeps dialing."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import MakeCluster
from tests.harness.certs import serial_of
from tests.harness.wait import wait_for

pytestmark = pytest.mark.cluster

ALL = ("storage", "replicator", "admin")


@pytest.mark.parametrize("how", ["route", "member row", "crl"])
def test_a_revoked_peer_shows_disconnected(
    make_cluster: MakeCluster, tmp_path: Path, how: str
) -> None:
    crl = tmp_path / "revoked.crl"
    cluster = make_cluster(
        size=2,
        topology=lambda names: {n: [] for n in names},
        services=ALL,
        gossip=True,
        node_config={0: {"tls": {"crl": str(crl)}}} if how == "crl" else None,
    )
    a, b = cluster
    assert cluster.ca is not None
    crl.write_bytes(cluster.ca.crl([]))
    a.admin().ok({"operation": "add_node", "hostname": b.name})
    cluster.routes = {a.name: [b.name], b.name: []}
    cluster.wait_connected()

    pem = Path(b.config["tls"]["certificate"]).read_bytes()
    serial = serial_of(pem)
    if how == "route":
        routed = a.admin().ok(
            {
                "operation": "cluster_set_routes",
                "routes": [{"host": b.name, "port": 9933, "revokedCertificates": [serial]}],
            }
        )
        assert routed["skipped"] == [], routed
    elif how == "member row":
        a.admin().ok(
            {"operation": "update_node", "hostname": b.name, "revoked_certificates": [serial]}
        )
    else:
        crl.write_bytes(cluster.ca.crl([pem]))

    wait_for(lambda: not a.connected(b.name), 10, "a to show b disconnected")
    assert "is revoked" in a.last_error(b.name)
    # a's log names b, its address, its serial and its subject.
    assert re.search(
        rf"closing the connection with {re.escape(b.name)} at \S+ \(certificate serial"
        rf" {serial}, subject CN=[^)]+\): .*is revoked",
        a.log_path("replicator").read_text(),
    )
    # b keeps dialing and is refused; a still shows it disconnected, in every database.
    wait_for(
        lambda: (
            "closed the connection after the TLS handshake" in b.last_error(a.name)
            or "is revoked" in b.last_error(a.name)
        ),
        30,
        "b to be refused again",
    )
    status = a.admin().ok({"operation": "cluster_status"})
    (row,) = [c for c in status["connections"] if c["name"] == b.name]
    assert row["connected"] is False, row
    assert all(d["connected"] is False for d in row["database_sockets"]), row
    assert not b.connected(a.name)


def test_the_revoked_side_ends_its_session_too(make_cluster: MakeCluster) -> None:
    """Three routed nodes, b writing while a member row revokes its certificate: b's end
    of the session a dialed (whose call gRPC cancels while the session is closing) is
    shown disconnected on b too (the row is cluster-wide, so c cuts b as well)."""
    cluster = make_cluster(size=3, services=ALL)
    a, b, c = cluster
    cluster.wait_connected()
    a.client().create_table("d", "t")
    writes = b.client()
    for i in range(40):
        writes.insert("d", "t", [{"id": i, "x": "y" * 1000}])
    serial = serial_of(Path(b.config["tls"]["certificate"]).read_bytes())
    a.admin().ok({"operation": "update_node", "hostname": b.name, "revoked_certificates": [serial]})
    for i in range(40, 70):
        writes.insert("d", "t", [{"id": i, "x": "y" * 1000}])
    for here, there in ((a, b), (c, b), (b, a), (b, c)):
        wait_for(
            partial(lambda x, y: not x.connected(y.name), here, there),
            15,
            f"{here.name} to show {there.name} disconnected",
        )
    wait_for(lambda: "is revoked" in b.last_error(a.name), 10, "b to show why")
