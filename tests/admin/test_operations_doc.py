"""docs/operations.md stays true: every operation and typed RPC is documented, every JSON
example parses and names a real operation, and the examples of the data, log and user
sections run, in order, against a fresh node with exactly the documented responses."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from shoal.admin.v1 import admin_pb2

from services.admin.operations import OPERATIONS
from tests.conftest import MakeNode

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
RUN_SECTIONS = ("Data and schema", "Logs", "Users and roles")
# Compared by type only: times, versions, origins and size estimates.
VOLATILE = {
    "timestamp",
    "version",
    "origin",
    "__createdtime__",
    "__updatedtime__",
    "table_size",
    "db_size",
    "db_audit_size",
    "last_updated_record",
}


def blocks() -> list[tuple[str, Any]]:
    """(## section, parsed JSON) of every ```json block, in document order."""
    section = ""
    out: list[tuple[str, Any]] = []
    lines = DOC.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```json":
            end = lines.index("```", i + 1)
            text = "\n".join(lines[i + 1 : end])
            try:
                out.append((section, orjson.loads(text)))
            except orjson.JSONDecodeError as exc:
                raise AssertionError(f"operations.md line {i + 2}: not JSON: {exc}") from exc
            i = end
        i += 1
    return out


def pairs(section_names: tuple[str, ...]) -> list[tuple[dict[str, Any], Any]]:
    """Request/response pairs: a block with "operation" followed by its response."""
    found = [(s, b) for s, b in blocks() if s in section_names]
    out = []
    for (_, request), (_, response) in pairwise(found):
        if isinstance(request, dict) and "operation" in request:
            out.append((request, response))
    return out


def test_every_operation_and_rpc_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name in OPERATIONS if not re.search(rf"\b{name}\b", text)]
    assert missing == [], f"operations missing from docs/operations.md: {missing}"
    headings = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    rpcs = [m.name for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods]
    undocumented = [r for r in rpcs if r != "Execute" and f"`{r}`" not in headings]
    assert undocumented == [], f"typed RPCs without a heading in operations.md: {undocumented}"


def test_every_example_names_a_real_operation() -> None:
    requests = [b for _, b in blocks() if isinstance(b, dict) and "operation" in b]
    assert len(requests) > 30
    unknown = sorted({r["operation"] for r in requests} - set(OPERATIONS))
    assert unknown == []


def same(documented: Any, actual: Any, path: str = "") -> list[str]:
    """Differences between a documented and an actual response."""
    if isinstance(documented, dict) and isinstance(actual, dict):
        if set(documented) != set(actual):
            return [f"{path}: keys {sorted(documented)} != {sorted(actual)}"]
        problems: list[str] = []
        for key, value in documented.items():
            if key in VOLATILE:
                if type(value) is not type(actual[key]):
                    problems.append(f"{path}.{key}: type {type(actual[key]).__name__}")
                continue
            problems += same(value, actual[key], f"{path}.{key}")
        return problems
    if isinstance(documented, list) and isinstance(actual, list):
        if len(documented) != len(actual):
            return [f"{path}: {len(documented)} items documented, {len(actual)} answered"]
        problems = []
        for i, (d, a) in enumerate(zip(documented, actual, strict=True)):
            problems += same(d, a, f"{path}[{i}]")
        return problems
    return [] if documented == actual else [f"{path}: {documented!r} != {actual!r}"]


@pytest.mark.parametrize("sections", [RUN_SECTIONS])
def test_documented_examples_run_as_documented(
    make_node: MakeNode, sections: tuple[str, ...]
) -> None:
    node = make_node(services=("storage", "replicator", "admin"))
    admin = node.admin()
    examples = pairs(sections)
    assert len(examples) >= 20
    for request, documented in examples:
        actual, code = admin.execute(request)
        assert code == 0, f"{request['operation']}: {actual}"
        problems = same(documented, actual)
        assert problems == [], f"{request['operation']} answered differently: {problems}"
