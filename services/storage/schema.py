"""The catalog: databases, tables and attributes of one node.

Persisted in the ``meta`` column family, one JSON document per database under
``schema/<database>``::

    {"tables": {"dog": {"id": 7, "primaryKey": "id", "indexed": ["breed"],
                        "replicate": true, "attributes": ["age", "breed", "id"],
                        "types": {"age": "Int"}, "schemaDefined": true,
                        "timestamps": false}}}

``types`` (declared attribute types, checked by ``attribute_types.py``), ``schemaDefined``
and ``timestamps`` (records get ``__createdtime__``/``__updatedtime__``,
``timestamps.py``) are left out while false or empty, and read as such when absent.

Table ids are local to the node (allocated from ``meta:next_table_id``) and never leave
it; other nodes know tables by name. The in-memory catalog is changed together with the
write batch that persists it; if that write fails the catalog is reloaded from disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import orjson

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, shown

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_$][A-Za-z0-9_$-]{0,249}$")
SCHEMA_PREFIX = b"schema/"
NEXT_TABLE_ID_KEY = b"next_table_id"
CREATED_TIME = "__createdtime__"
UPDATED_TIME = "__updatedtime__"
TIMESTAMP_ATTRIBUTES = (CREATED_TIME, UPDATED_TIME)


def check_name(kind: str, name: str) -> str:
    """Validate a database, table or attribute name (INVALID_ARGUMENT naming the problem)."""
    if not name:
        raise InvalidArgument(f"{kind} name is required")
    if not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"invalid {kind} name {shown(name)}: use 1-250 characters from A-Z a-z 0-9 _ $ -"
            " (not starting with -)"
        )
    return name


@dataclass
class Table:
    """One table's schema."""

    database: str
    name: str
    table_id: int
    primary_key: str = "id"
    indexed: tuple[str, ...] = ()
    replicate: bool = True
    attributes: set[str] = field(default_factory=set)
    types: dict[str, str] = field(default_factory=dict)
    schema_defined: bool = False
    timestamps: bool = False
    prefix: bytes = b""
    _index_prefixes: dict[str, bytes] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.prefix = self.table_id.to_bytes(4, "big")

    def index_prefix(self, attribute: str) -> bytes:
        """Prefix of one attribute's entries in the index CF (see keys.py)."""
        cached = self._index_prefixes.get(attribute)
        if cached is None:
            cached = self.prefix + attribute.encode("utf-8") + b"\x00"
            self._index_prefixes[attribute] = cached
        return cached

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.table_id,
            "primaryKey": self.primary_key,
            "indexed": list(self.indexed),
            "replicate": self.replicate,
            "attributes": sorted(self.attributes),
        }
        if self.types:
            out["types"] = dict(sorted(self.types.items()))
        if self.schema_defined:
            out["schemaDefined"] = True
        if self.timestamps:
            out["timestamps"] = True
        return out


@dataclass
class Database:
    """One database: its tables by name."""

    name: str
    tables: dict[str, Table] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps({"tables": {n: t.to_json() for n, t in sorted(self.tables.items())}})


class Catalog:
    """All databases of the node, in memory, mirrored in the meta column family."""

    def __init__(self) -> None:
        self.databases: dict[str, Database] = {}
        self.next_table_id = 1

    def load(self, items: Iterable[tuple[bytes, bytes]], next_table_id: int) -> None:
        """Rebuild from ``schema/*`` entries of the meta CF."""
        self.databases = {}
        self.next_table_id = next_table_id
        for key, value in items:
            name = key[len(SCHEMA_PREFIX) :].decode()
            raw = orjson.loads(value)
            db = Database(name)
            for tname, t in raw["tables"].items():
                db.tables[tname] = Table(
                    database=name,
                    name=tname,
                    table_id=int(t["id"]),
                    primary_key=t["primaryKey"],
                    indexed=tuple(t["indexed"]),
                    replicate=bool(t["replicate"]),
                    attributes=set(t["attributes"]),
                    types=dict(t.get("types", {})),
                    schema_defined=bool(t.get("schemaDefined", False)),
                    timestamps=bool(t.get("timestamps", False)),
                )
            self.databases[name] = db

    def database(self, name: str) -> Database:
        db = self.databases.get(name)
        if db is None:
            check_name("database", name)
            raise NotFound(f"Database '{name}' does not exist", reason="DATABASE_NOT_FOUND")
        return db

    def table(self, database: str, name: str) -> Table:
        db = self.database(database)
        table = db.tables.get(name)
        if table is None:
            check_name("table", name)
            raise NotFound(f"Table '{database}.{name}' does not exist", reason="TABLE_NOT_FOUND")
        return table

    def find_table(self, database: str, name: str) -> Table | None:
        db = self.databases.get(database)
        return None if db is None else db.tables.get(name)

    def add_database(self, name: str) -> Database:
        check_name("database", name)
        if name in self.databases:
            raise AlreadyExists(f"database {name!r} already exists")
        db = Database(name)
        self.databases[name] = db
        return db

    def add_table(
        self,
        database: str,
        name: str,
        primary_key: str,
        indexed: Iterable[str],
        replicate: bool,
        types: Mapping[str, str] | None = None,
        schema_defined: bool = False,
        timestamps: bool = False,
    ) -> Table:
        """Create a table (and its database when missing); ``types`` are declared
        attribute types (Harper's names, checked by the caller)."""
        check_name("table", name)
        check_name("primary key attribute", primary_key)
        indexed_names = tuple(dict.fromkeys(check_name("attribute", a) for a in indexed))
        declared = {check_name("attribute", a): t for a, t in (types or {}).items()}
        db = self.databases.get(database) or self.add_database(database)
        if name in db.tables:
            raise AlreadyExists(f"table {database}.{name} already exists")
        table = Table(
            database=database,
            name=name,
            table_id=self.next_table_id,
            primary_key=primary_key,
            indexed=tuple(a for a in indexed_names if a != primary_key),
            replicate=replicate,
            attributes={primary_key, *indexed_names, *declared},
            types=declared,
            schema_defined=schema_defined,
            timestamps=timestamps,
        )
        if timestamps:
            table.attributes.update(TIMESTAMP_ATTRIBUTES)
        self.next_table_id += 1
        db.tables[name] = table
        return table

    def tables(self) -> Iterator[Table]:
        for db in self.databases.values():
            yield from db.tables.values()

    def table_by_id(self, table_id: int) -> Table | None:
        for table in self.tables():
            if table.table_id == table_id:
                return table
        return None
