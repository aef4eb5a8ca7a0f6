"""docs/configuration.md documents every key the loader reads, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.config import parse_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_every_key_is_documented() -> None:
    keys: set[str] = set()
    parse_config({"replication": {"hostname": "node-a"}}, env={}, trace=keys)
    documented = set(re.findall(r"^\| `([A-Za-z.]+)` \|", DOC.read_text(), flags=re.M))
    assert keys - documented == set(), "keys missing from docs/configuration.md"
    assert documented - keys == set(), "docs/configuration.md documents keys that do not exist"
