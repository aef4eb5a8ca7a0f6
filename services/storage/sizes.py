"""Estimated sizes of tables and databases on this node (Harper's ``table_size``,
``db_size`` and ``db_audit_size`` in the describe operations).

Every database of a node shares one RocksDB, so sizes are estimates: RocksDB's own
estimate of each column family (live data plus memtables), apportioned by record count.
Records are the data and index column families; the audit is the log and its two
indexes. Reading them costs a few property reads, whatever the data size.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.storage.db import Store

RECORD_FAMILIES = ("data", "index", "tomb")
AUDIT_FAMILIES = ("log", "logidx", "logkey")
_PROPERTIES = ("rocksdb.estimate-live-data-size", "rocksdb.cur-size-all-mem-tables")


def family_bytes(store: Store, families: tuple[str, ...]) -> int:
    total = 0
    for name in families:
        for prop in _PROPERTIES:
            total += store.cf[name].property_int_value(prop) or 0
    return total


@dataclass(frozen=True)
class Sizes:
    """Bytes of records and of the audit on this node, and its records, for apportioning."""

    records_bytes: int
    audit_bytes: int
    records: int

    @classmethod
    def read(cls, store: Store, counts: dict[int, int]) -> Sizes:
        return cls(
            family_bytes(store, RECORD_FAMILIES),
            family_bytes(store, AUDIT_FAMILIES),
            sum(counts.values()),
        )

    def of_records(self, records: int) -> int:
        """Estimated bytes of ``records`` of this node's records."""
        return self.records_bytes * records // self.records if self.records else 0

    def of_audit(self, records: int) -> int:
        """Estimated bytes of the audit of a database holding ``records`` records."""
        return self.audit_bytes * records // self.records if self.records else 0
