"""Every ``ErrorInfo.reason`` Shoal sends is in the table of docs/clients.md (section
"Errors"), with the status code it is sent with, and the table lists no reason the code
no longer sends.

The reasons are read from the source: the ``reason=`` of every construction of a
``ShoalError`` class (a string, or a module constant such as ``REASON`` or
``copy.RESTORING``), and the default reason of each class that is raised without one or
that ``from_rpc_error`` passes on. A ``reason=`` this test cannot read fails it too: name
the reason with a constant, or pass it on through ``from_rpc_error``.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from services.common import errors

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "clients.md"
ROW = re.compile(r"^\| `(?P<reason>[A-Z0-9_]+)` \| (?P<codes>[A-Z_, ]+) \| .+ \|$")


def documented() -> dict[str, set[str]]:
    """Reason -> status codes, from the table of the section "Errors"."""
    section = DOC.read_text().split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            codes = {code.strip() for code in match["codes"].split(",")}
            table.setdefault(match["reason"], set()).update(codes)
    return table


def _error_classes() -> dict[str, str]:
    """Class name -> status code name, for ShoalError and every subclass of it."""
    return {
        name: value.code.name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.ShoalError)
    }


@functools.cache
def sent() -> tuple[frozenset[tuple[str, str]], tuple[str, ...]]:
    """(reason, status code) pairs the code sends, and the ``reason=`` it cannot read."""
    classes = _error_classes()
    trees = {path: ast.parse(path.read_text()) for path in (ROOT / "services").rglob("*.py")}
    for tree in trees.values():  # subclasses defined outside errors.py
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
                if bases:
                    classes.setdefault(node.name, classes[bases[0]])
    constants: dict[tuple[str, str], str] = {}
    for path, tree in trees.items():
        for statement in tree.body:
            if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant):
                for target in statement.targets:
                    if isinstance(target, ast.Name) and isinstance(statement.value.value, str):
                        constants[(path.stem, target.id)] = statement.value.value
    pairs: set[tuple[str, str]] = set()
    unread: list[str] = []
    defaults: set[str] = {cls.__name__ for cls in errors._BY_CODE.values()}
    defaults.add(errors.Internal.__name__)  # from_rpc_error's and the edge's fallback
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = getattr(func, "id", None) or getattr(func, "attr", None)
            if name not in classes:
                continue
            given = [k.value for k in node.keywords if k.arg == "reason"]
            if not given:
                defaults.add(name)
                continue
            value = given[0]
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                pairs.add((value.value, classes[name]))
            elif isinstance(value, ast.Name) and (path.stem, value.id) in constants:
                pairs.add((constants[(path.stem, value.id)], classes[name]))
            elif (
                isinstance(value, ast.Attribute)
                and isinstance(value.value, ast.Name)
                and (value.value.id, value.attr) in constants
            ):
                pairs.add((constants[(value.value.id, value.attr)], classes[name]))
            else:
                where = path.relative_to(ROOT)
                unread.append(f"{where}:{node.lineno}: {name}(reason={ast.unparse(value)})")
    for name in defaults:
        cls = getattr(errors, name, None)
        if cls is not None:
            pairs.add((cls.default_reason, cls.code.name))
    return frozenset(pairs), tuple(unread)


def test_every_reason_sent_is_documented_with_its_code() -> None:
    table = documented()
    pairs, unread = sent()
    assert unread == (), "reasons this test cannot read (use a constant)"
    assert len(pairs) > 30, "the source scan found too few reasons: is it still right?"
    missing = sorted(f"{reason} ({code})" for reason, code in pairs if reason not in table)
    assert missing == [], "reasons sent but missing from docs/clients.md, section Errors"
    wrong = sorted(
        f"{reason}: sent as {code}, documented as {', '.join(sorted(table[reason]))}"
        for reason, code in pairs
        if reason in table and code not in table[reason]
    )
    assert wrong == []


def test_every_documented_reason_is_still_sent() -> None:
    pairs, _ = sent()
    sent_reasons = {reason for reason, _ in pairs}
    assert sorted(set(documented()) - sent_reasons) == []


def test_the_table_is_read() -> None:
    table = documented()
    assert table["TABLE_NOT_FOUND"] == {"NOT_FOUND"}
    assert table["SIGN_IN_THROTTLED"] == {"RESOURCE_EXHAUSTED"}
