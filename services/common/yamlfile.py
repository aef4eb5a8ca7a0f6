"""Rewriting shoal.yaml by program without losing what the operator wrote.

``cluster_set_routes`` and ``set_configuration`` change a few keys of a file that an
operator keeps by hand. The file is read and written with ruamel.yaml's round trip, so
its comments, key order, quoting and flow lists survive a rewrite; only the keys changed
are written anew (a list that is replaced, such as ``replication.routes``, loses comments
inside it, not the comment on its key). The configuration loader reads the file with
PyYAML: ``plain`` gives it the same data, so what is validated is what is written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap


def _yaml() -> YAML:
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 4096  # never fold a long value onto a second line
    rt.indent(mapping=2, sequence=4, offset=2)
    return rt


def load(path: Path) -> CommentedMap:
    """The file's top-level mapping, comments and all (empty for an empty file)."""
    data = _yaml().load(path.read_text(encoding="utf-8"))
    if data is None:
        return CommentedMap()
    if not isinstance(data, CommentedMap):
        raise ValueError(f"{path} does not hold a mapping at its top level")
    return data


def dump(data: Any) -> str:
    """``data`` as YAML text; a ``load``ed mapping keeps its comments and layout."""
    out = io.StringIO()
    _yaml().dump(data, out)
    return out.getvalue()


def plain(data: Any) -> Any:
    """``data`` as plain dicts, lists and scalars: what the loader reads from ``dump``."""
    return yaml.safe_load(dump(data))


def write(path: Path, data: Any) -> None:
    """Replace the file atomically with ``data`` (written and synced beside it, then
    renamed)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump(data), encoding="utf-8")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
