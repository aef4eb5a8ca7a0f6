"""Positions that stand for some tables only.

A position (database, origin) says this node holds every write of that origin up to that
version. A subscription to some tables only (explicit subscriptions, on either side of a
connection) moves the position past the origin's writes to the other tables without
applying them, so from then on the position stands only for the tables it carried. This
module keeps that record, per (database, origin), under ``limited/<database>\\0<origin>``
(a JSON list of table names) in the same write as the data that narrows or widens it:

- an Apply limited to tables T narrows the position to T (intersected with what it
  already stood for);
- a completed copy of tables C (None: every table) from a source whose position is
  above this node's stands for C from then on (None: no longer limited); one whose
  position equals this node's adds C; one below it changes nothing, because the
  position stays this node's own.

A receiver whose subscription carries more tables than a position stands for copies them
before it subscribes (``services/replicator/inbound.py``), which is how a widened
subscription catches up on the writes it was not subscribed to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import orjson

from services.storage import keys

if TYPE_CHECKING:
    from services.storage.commit import BatchWriter
    from services.storage.engine import Engine

LIMITED_PREFIX = b"limited/"  # limited/<database>\0<origin> -> JSON list of tables

Key = tuple[str, str]  # (database, origin)


def limited_key(database: str, origin: str) -> bytes:
    """Meta key of a limited position."""
    return LIMITED_PREFIX + database.encode() + b"\x00" + origin.encode()


def load(engine: Engine) -> None:
    """Read every limited position into ``engine.limited``."""
    for key, value in engine.store.scan("meta", LIMITED_PREFIX, keys.prefix_end(LIMITED_PREFIX)):
        database, _, origin = key[len(LIMITED_PREFIX) :].partition(b"\x00")
        engine.limited[(database.decode(), origin.decode())] = frozenset(orjson.loads(value))


def current(engine: Engine, writer: BatchWriter, key: Key) -> frozenset[str] | None:
    """What the position stands for, this batch's changes included (None: every table)."""
    if key in writer.limited_marks:
        return writer.limited_marks[key]
    return engine.limited.get(key)


def set_tables(
    engine: Engine, writer: BatchWriter, key: Key, tables: frozenset[str] | None
) -> None:
    """Record (in ``writer``'s batch) that the position stands for ``tables`` (None:
    every table)."""
    if current(engine, writer, key) == tables:
        return
    meta = writer.store.handle["meta"]
    if tables is None:
        writer.batch.delete(limited_key(*key), meta)
    else:
        writer.batch.put(limited_key(*key), orjson.dumps(sorted(tables)), meta)
    writer.limited_marks[key] = tables
    writer.empty = False


def narrow(engine: Engine, writer: BatchWriter, key: Key, tables: Iterable[str]) -> None:
    """An Apply limited to ``tables`` moved the position: it stands for no more than them."""
    chosen = frozenset(tables)
    now = current(engine, writer, key)
    set_tables(engine, writer, key, chosen if now is None else now & chosen)


def after_copy(
    engine: Engine,
    writer: BatchWriter,
    database: str,
    copied: Mapping[str, int],
    tables: frozenset[str] | None,
) -> None:
    """A copy of ``tables`` (None: every table) at positions ``copied`` completed; call
    before the positions are adopted."""
    for origin, version in copied.items():
        key = (database, origin)
        mine = engine.positions.get(key, 0)
        if version > mine:
            set_tables(engine, writer, key, tables)
        elif version == mine:
            now = current(engine, writer, key)
            if now is not None:
                set_tables(engine, writer, key, None if tables is None else now | tables)


def forget(engine: Engine, writer: BatchWriter, database: str) -> list[Key]:
    """Drop the database's limited positions (its positions are being replaced)."""
    stale = [k for k in engine.limited if k[0] == database]
    for key in stale:
        set_tables(engine, writer, key, None)
    return stale
