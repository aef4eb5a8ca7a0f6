"""Sign-in throttling against a real attacker address: an attacker hammering ``admin``
with wrong passwords from a network namespace of its own (127.200.S.2) while the real
user signs in from this namespace, to storage directly and through the admin service
(which vouches for its caller's address). On plain loopback every connection comes from
127.0.0.1, so the two could not be told apart and the test would prove nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import orjson
import psutil
import pytest
from shoal.storage.v1 import storage_pb2 as pb

from services.common.auth import basic_metadata
from tests.conftest import MakeNode
from tests.harness.client import StorageClient
from tests.harness.netns import IP, Subnet, unavailable
from tests.harness.node import PASSWORD, REPO, Node

pytestmark = pytest.mark.cluster

HAMMER_SECONDS = 12.0
MIB = 1024 * 1024


@pytest.fixture
def subnet() -> Iterator[Subnet]:
    reason = unavailable()
    if reason is not None:
        # Not skipped: without a second source address the throttling key is unproven.
        pytest.fail(f"sign-in throttling needs clients with their own addresses: {reason}")
    made = Subnet()
    try:
        yield made
    finally:
        made.close()
        assert made.leftovers() == [], "namespaces or links were left behind"


def _hammer(namespace: str, host: str, *args: str) -> dict[str, Any]:
    """Run tests/harness/signin_hammer.py inside ``namespace``; its JSON summary."""
    done = subprocess.run(
        [
            *(IP, "netns", "exec", namespace, sys.executable, "-m", "tests.harness.signin_hammer"),
            *("--host", host, "--seconds", str(HAMMER_SECONDS), *args),
        ],  # a --seconds in args wins (argparse keeps the last)
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HAMMER_SECONDS + 60,
        check=False,
    )
    assert done.stdout.strip(), done.stderr
    summary: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return summary


def _rss(node: Node, service: str) -> int:
    return int(psutil.Process(node.processes[service].pid).memory_info().rss)


def _real_user_signs_in(node: Node) -> None:
    """The real user, from this namespace, on both ports, each with a new connection."""
    whoami = node.client().call("Authenticate", pb.AuthenticateRequest())
    assert whoami.username == "admin"
    info = node.admin().ok({"operation": "user_info"})
    assert info["username"] == "admin"


def test_an_attacker_cannot_lock_the_real_user_out(make_node: MakeNode, subnet: Subnet) -> None:
    namespace, attacker = subnet.add()
    node = make_node(
        name=subnet.root_address,
        host=subnet.root_address,
        services=("storage", "admin"),
    )
    _real_user_signs_in(node)
    baseline = _rss(node, "storage")

    result: dict[str, Any] = {}
    hammer = threading.Thread(
        target=lambda: result.update(
            _hammer(namespace, node.host, "--user", "admin", "--password", PASSWORD)
        )
    )
    hammer.start()
    # While the attacker hammers, the real user keeps signing in from another address.
    signed_in = 0
    while hammer.is_alive():
        _real_user_signs_in(node)
        signed_in += 1
    hammer.join()
    assert signed_in >= 5

    codes = result["codes"]
    checked = sum(c.get("UNAUTHENTICATED", 0) for c in codes.values())
    refused = sum(c.get("RESOURCE_EXHAUSTED", 0) for c in codes.values())
    # Five wrong passwords were checked, then one more after each wait (1, 2, 4, 8 s...):
    # everything else was refused before any password work, on both ports.
    assert 5 <= checked <= 10, codes
    assert codes["storage"].get("RESOURCE_EXHAUSTED", 0) > 20, codes
    assert codes["admin"].get("RESOURCE_EXHAUSTED", 0) > 20, codes
    assert refused > 40 and "OK" not in codes["storage"] and "OK" not in codes["admin"]
    # Each refusal says when to try again (RetryInfo and words), and the wait doubles.
    assert len(result["delays"]) == refused
    assert max(result["delays"]) > 3.5  # 1, 2, 4 s: less what passed since
    # The refusals name the attacker's address, on the admin port too: the admin service
    # vouched for its caller's address, so storage did not throttle the admin's own.
    for port in ("storage", "admin"):
        refusal = result["messages"][f"{port} RESOURCE_EXHAUSTED"]
        assert f"from {attacker}:" in refusal and "try again in" in refusal, refusal
    messages = {m for k, m in result["messages"].items() if k.endswith("UNAUTHENTICATED")}
    assert messages == {"Login failed"}
    # From the attacker's address even the right password waits (it is not checked)...
    assert result["last"] == "RESOURCE_EXHAUSTED"
    # ...while from here it still works.
    _real_user_signs_in(node)
    assert _rss(node, "storage") - baseline < 64 * MIB


def test_spraying_user_names_is_throttled_per_address(make_node: MakeNode, subnet: Subnet) -> None:
    namespace, _ = subnet.add()
    node = make_node(
        name=subnet.root_address,
        host=subnet.root_address,
        services=("storage", "admin"),
        config={"authentication": {"sourceLockoutAttempts": 20}},
    )
    _real_user_signs_in(node)
    baseline = _rss(node, "storage")
    # A fixed number of attempts (refusals are instant), so a slow machine checks as many.
    result = _hammer(
        namespace, node.host, "--spray", "--user", "user", "--count", "120", "--seconds", "60"
    )
    codes = result["codes"]
    checked = sum(c.get("UNAUTHENTICATED", 0) for c in codes.values())
    # New names each time: 20 checked from this address, then one after each wait.
    assert 20 <= checked <= 25, codes
    assert sum(c.get("RESOURCE_EXHAUSTED", 0) for c in codes.values()) > 40, codes
    assert "any user name" in result["messages"]["storage RESOURCE_EXHAUSTED"]
    _real_user_signs_in(node)
    assert _rss(node, "storage") - baseline < 64 * MIB


def test_only_the_node_may_vouch_for_an_address(make_node: MakeNode) -> None:
    node = make_node()
    forged = _client_with(node, (("shoal-forwarded-for", "10.1.2.3 abcdef"),))
    with pytest.raises(grpc.RpcError) as info:
        forged.call("Authenticate", pb.AuthenticateRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "shoal-forwarded-for is only for this node's own services" in str(info.value.details())


def _client_with(node: Node, extra: tuple[tuple[str, str], ...]) -> StorageClient:
    """A client of ``node``'s storage sending the admin's password plus ``extra``."""
    client = StorageClient(
        node.storage_address, (*basic_metadata("admin", PASSWORD), *extra), node.channel("storage")
    )
    node._clients.append(client)
    return client
