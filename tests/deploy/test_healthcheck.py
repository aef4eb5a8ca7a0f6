"""The container health probe (python -m services.healthcheck): exit 0 only when the
service answers SERVING, else exit 1 with one line saying why."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import MakeNode


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.healthcheck", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_probe_answers_for_a_running_service_and_explains_failures(make_node: MakeNode) -> None:
    node = make_node()  # storage, on its own address; health port 9936
    served = probe("--host", node.host, "--port", "9936")
    assert served.returncode == 0, served.stderr
    named = probe(
        "--host", node.host, "--port", "9936", "--service", "shoal.storage.v1.StorageService"
    )
    assert named.returncode == 0, named.stderr
    # The node's address from SHOAL_HOST, as inside a container of the node.
    from_env = probe("--port", "9936", env={"SHOAL_HOST": node.host, "PATH": "/usr/bin:/bin"})
    assert from_env.returncode == 0, from_env.stderr

    unknown = probe("--host", node.host, "--port", "9936", "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert "health check failed: NOT_FOUND" in unknown.stderr
    node.stop("storage")
    down = probe("--host", node.host, "--port", "9936", "--timeout", "1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr, down.stderr
    bad = probe("--port", "0")
    assert bad.returncode == 2 and "--port must be between 1 and 65535" in bad.stderr
