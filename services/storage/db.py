"""Opening the node's RocksDB and the column families Shoal keeps in it.

Everything is in raw mode (bytes keys and values). Column families:

    meta     schema, positions, log horizons, copy progress, clock, counters, users
    data     records                   (layouts in keys.py)
    index    secondary indexes
    tomb     tombstones by version, for purging
    log      the transaction log, by local commit time
    logidx   the log by (database, origin, version)
    logkey   the log by (database, table, key), for the audit log

A WriteBatch spanning column families is atomic, which is what lets one write carry a
transaction's data, index changes, log entry and new positions together.

The folder holds every record in the clear, so only its owner may read it: folders 0700,
files 0600, fixed at every open, and the storage process runs with umask 077 so the files
RocksDB makes later are 0600 too.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import rocksdict

log = logging.getLogger("shoal.storage.db")
COLUMN_FAMILIES = ("meta", "data", "index", "tomb", "log", "logidx", "logkey")
PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600
PRIVATE_UMASK = 0o077  # the storage process's umask: RocksDB's new files are 0600


def _options() -> rocksdict.Options:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    options.set_max_background_jobs(2)
    options.set_compression_type(rocksdict.DBCompressionType.lz4())
    return options


def make_private(path: Path) -> int:
    """Restrict a folder tree to its owner: 0700 for folders, 0600 for files (links are
    left alone). Returns how many modes it changed (a folder made by an older version,
    or copied in with looser modes)."""
    changed = 0
    for folder, _, files in os.walk(path):
        entries = [(Path(folder), PRIVATE_FOLDER)]
        entries += [(Path(folder) / name, PRIVATE_FILE) for name in files]
        for entry, mode in entries:
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode) or stat.S_IMODE(info.st_mode) == mode:
                continue
            os.chmod(entry, mode)
            changed += 1
    return changed


class Store:
    """An open RocksDB with Shoal's column families, in a folder only its owner may read
    (``make_private`` at open; the storage process's umask keeps new files 0600)."""

    def __init__(self, path: Path, sync_writes: bool) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_FOLDER)
        changed = make_private(path)
        if changed:
            log.warning("made %d files and folders of %s private to this user", changed, path)
        self.path = path
        cf_options = {name: _options() for name in COLUMN_FAMILIES}
        self.db = rocksdict.Rdict(str(path), _options(), column_families=cf_options)
        self.cf = {name: self.db.get_column_family(name) for name in COLUMN_FAMILIES}
        self.handle = {name: self.db.get_column_family_handle(name) for name in COLUMN_FAMILIES}
        self.write_options = rocksdict.WriteOptions()
        self.write_options.sync = sync_writes
        self._unsynced = rocksdict.WriteOptions()  # never fsyncs (see write_unsynced)
        self.meta = self.cf["meta"]
        self.data = self.cf["data"]
        self.index = self.cf["index"]
        self.log = self.cf["log"]
        self.logidx = self.cf["logidx"]
        self.logkey = self.cf["logkey"]
        self.tomb = self.cf["tomb"]

    def multi_get(self, cf: str, keys: list[bytes]) -> list[bytes | None]:
        """Values of many keys of one column family (None where missing)."""
        if not keys:
            return []
        values = self.cf[cf].get(keys)  # type: ignore[arg-type]
        assert isinstance(values, list)
        return values

    def batch(self) -> rocksdict.WriteBatch:
        return rocksdict.WriteBatch(raw_mode=True)

    def write(self, batch: rocksdict.WriteBatch) -> None:
        """Write atomically (with an fsync when ``storage.syncWrites`` is on)."""
        self.db.write(batch, self.write_options)

    def write_unsynced(self, batch: rocksdict.WriteBatch) -> None:
        """Write atomically without an fsync whatever ``storage.syncWrites`` says: for
        node-local data whose last writes may be lost in a machine crash (analytics)."""
        self.db.write(batch, self._unsynced)

    def scan(
        self, cf: str, start: bytes, end: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys in [start, end) of one column family, in order (or reversed).

        The iterator is a consistent point-in-time view from its first step.
        """
        it = self.cf[cf].iter()
        if reverse:
            if end is None:
                it.seek_to_last()
            else:
                it.seek_for_prev(end)
                if it.valid() and it.key() >= end:
                    it.prev()
            while it.valid():
                key = it.key()
                if key < start:
                    return
                yield key, it.value()
                it.prev()
            return
        it.seek(start)
        while it.valid():
            key = it.key()
            if end is not None and key >= end:
                return
            yield key, it.value()
            it.next()

    def flush(self) -> None:
        self.db.flush_wal(True)

    def close(self) -> None:
        """Close the database (its column families first: each holds it open)."""
        for family in self.cf.values():
            family.close()
        self.db.close()
