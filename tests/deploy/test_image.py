"""The image's build stage without a container engine: the files deploy/Dockerfile copies
into its build stage are enough to build and install Shoal, and what is installed runs
the entry point of every service and the health probe, away from the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness.node import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def build_stage_copies(text: str) -> list[str]:
    """The sources of the COPY instructions of the stage named ``build`` (not --from)."""
    sources: list[str] = []
    in_build = False
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "FROM":
            in_build = words[-2:] == ["AS", "build"]
        elif in_build and words[0] == "COPY":
            arguments = [w for w in words[1:] if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in words), line
            sources.extend(arguments[:-1])
    return sources


def _run(*command: str | Path, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_build_stage_copies_enough_to_install_and_run_shoal(tmp_path: Path) -> None:
    sources = build_stage_copies(DOCKERFILE.read_text())
    assert {"pyproject.toml", "requirements.lock", "services/", "gen/"} <= set(sources)
    context = tmp_path / "context"
    context.mkdir()
    for source in sources:
        origin = REPO / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, context / source)

    # As the build stage does (dependencies come from the test's environment, which
    # installs the same lock): build the package from the copied files alone.
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run(
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
        "--no-build-isolation", "--target", site, context,
        cwd=tmp_path, env=env,
    )  # fmt: skip

    # What is installed, not the repository, is what runs.
    installed = {**env, "PYTHONPATH": str(site)}
    where = _run(
        sys.executable, "-c",
        "import services, shoal.storage.v1.storage_pb2 as s; print(services.__file__, s.__file__)",
        cwd=tmp_path, env=installed,
    )  # fmt: skip
    assert all(path.startswith(str(site)) for path in where.split()), where
    shoal = site / "bin" / "shoal"
    assert "storage" in _run(sys.executable, shoal, "--help", cwd=tmp_path, env=installed)
    for service in ("storage", "replicator", "admin", "node"):
        _run(sys.executable, shoal, service, "--help", cwd=tmp_path, env=installed)
    probe = _run(
        sys.executable, "-m", "services.healthcheck", "--help", cwd=tmp_path, env=installed
    )
    assert "--port" in probe
