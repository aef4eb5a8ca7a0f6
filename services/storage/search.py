"""Reading records: by id, by value, by conditions.

A search is a *source* of candidate records (a primary-key lookup, a range of the data
column family, a range of a secondary index, or a full table scan) followed by a filter
that re-checks every condition on the record itself, then sort, offset, limit and
projection. Index entries only narrow the candidates; the filter decides, so a record
changed between the index read and the record read is still judged on its current value.

Comparison semantics: equality is JSON equality within a type (``1`` equals ``1.0``,
``true`` does not equal ``1``); ordering comparisons (greater_than, between, ...) take
numbers or strings and only match values of the same type; on an array attribute a
condition matches when any element matches (which is also what the index stores).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from shoal.storage.v1 import storage_pb2

from services.common import jsoninput
from services.common.errors import InvalidArgument, ResourceExhausted, shown
from services.storage import keys, merge
from services.storage.engine import Engine
from services.storage.schema import Table
from services.storage.unreadable import Unreadable

C = storage_pb2
Doc = dict[str, Any]
Candidates = Iterator[tuple[bytes, merge.RecordState]]

_RANGE = {
    C.COMPARATOR_GREATER_THAN,
    C.COMPARATOR_GREATER_THAN_EQUAL,
    C.COMPARATOR_LESS_THAN,
    C.COMPARATOR_LESS_THAN_EQUAL,
    C.COMPARATOR_BETWEEN,
}
_STRING_ONLY = {C.COMPARATOR_STARTS_WITH, C.COMPARATOR_ENDS_WITH}
_NAMES = {v: k.removeprefix("COMPARATOR_").lower() for k, v in C.Comparator.items()}
PATTERN = -1  # internal comparator: a compiled wildcard pattern (search_by_value)


def _class(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool):
        return 2
    if isinstance(value, int | float):
        return 3
    if isinstance(value, str):
        return 4
    if isinstance(value, list):
        return 5
    return 6


def sort_key(value: Any) -> tuple[int, Any]:
    """A total order over JSON values (missing first, then null, bool, number, string)."""
    cls = _class(value)
    if cls in (5, 6):
        try:
            return cls, orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # nested too deep to serialize: sorts last
            return cls, b"\xff"
    if cls == 1:
        return cls, 0
    return cls, value


def _missing_key() -> tuple[int, Any]:
    return 0, 0


def same(a: Any, b: Any) -> bool:
    """JSON equality within a type."""
    return _class(a) == _class(b) and a == b


@dataclass(frozen=True)
class Compare:
    """A validated comparison."""

    attribute: str
    comparator: int
    value: Any

    def test(self, value: Any) -> bool:
        if isinstance(value, list) and self.comparator != C.COMPARATOR_CONTAINS:
            return any(self.test(item) for item in value)
        op = self.comparator
        target = self.value
        if op == PATTERN:
            return isinstance(value, str) and bool(target.match(value))
        if op == C.COMPARATOR_EQUALS:
            return same(value, target)
        if op == C.COMPARATOR_NOT_EQUAL:
            return not same(value, target)
        if op == C.COMPARATOR_CONTAINS:
            if isinstance(value, str) and isinstance(target, str):
                return target in value
            if isinstance(value, list):
                return any(same(item, target) for item in value)
            return False
        if op == C.COMPARATOR_STARTS_WITH:
            return isinstance(value, str) and value.startswith(target)
        if op == C.COMPARATOR_ENDS_WITH:
            return isinstance(value, str) and value.endswith(target)
        if op == C.COMPARATOR_BETWEEN:
            low, high = target
            return _class(value) == _class(low) and low <= value <= high
        if _class(value) != _class(target):
            return False
        if op == C.COMPARATOR_GREATER_THAN:
            return bool(value > target)
        if op == C.COMPARATOR_GREATER_THAN_EQUAL:
            return bool(value >= target)
        if op == C.COMPARATOR_LESS_THAN:
            return bool(value < target)
        return bool(value <= target)

    def matches(self, doc: Doc) -> bool:
        if self.attribute not in doc:
            return self.comparator == C.COMPARATOR_NOT_EQUAL
        return self.test(doc[self.attribute])


@dataclass(frozen=True)
class Group:
    """Conditions joined by AND or OR."""

    any_of: bool
    conditions: tuple[Compare | Group, ...]

    def matches(self, doc: Doc) -> bool:
        if not self.conditions:
            return True
        if self.any_of:
            return any(c.matches(doc) for c in self.conditions)
        return all(c.matches(doc) for c in self.conditions)


def _json(raw: bytes, what: str, max_depth: int) -> Any:
    try:
        return jsoninput.loads(raw, max_depth)
    except jsoninput.Refused as exc:
        raise InvalidArgument(f"{what}: {exc}") from None


def parse_comparison(c: storage_pb2.Comparison, max_depth: int) -> Compare:
    if not c.attribute:
        raise InvalidArgument("a condition needs an attribute")
    if c.comparator not in _NAMES or c.comparator == C.COMPARATOR_UNSPECIFIED:
        raise InvalidArgument(f"condition on {c.attribute!r}: comparator is required")
    name = _NAMES[c.comparator]
    value = _json(c.value, f"value of condition {shown(c.attribute)} {name}", max_depth)
    if c.comparator == C.COMPARATOR_BETWEEN:
        if not (isinstance(value, list) and len(value) == 2):
            raise InvalidArgument(f"{c.attribute} between: value must be [low, high]")
        if not all(_class(v) in (3, 4) for v in value) or _class(value[0]) != _class(value[1]):
            raise InvalidArgument(
                f"{c.attribute} between: bounds must be two numbers or two strings"
            )
        return Compare(c.attribute, c.comparator, (value[0], value[1]))
    if c.comparator in _RANGE and _class(value) not in (3, 4):
        raise InvalidArgument(f"{c.attribute} {name}: value must be a number or a string")
    if c.comparator in _STRING_ONLY and not isinstance(value, str):
        raise InvalidArgument(f"{c.attribute} {name}: value must be a string")
    if c.comparator in (
        C.COMPARATOR_EQUALS,
        C.COMPARATOR_NOT_EQUAL,
        C.COMPARATOR_CONTAINS,
    ) and isinstance(value, dict | list):
        raise InvalidArgument(f"{c.attribute} {name}: value must be a scalar")
    return Compare(c.attribute, c.comparator, value)


def parse_group(operator: int, conditions: Any, max_depth: int, depth: int = 0) -> Group:
    """Conditions joined by ``operator``; ``max_depth`` limits the nesting of values."""
    if depth > 16:
        raise InvalidArgument("conditions are nested more than 16 levels deep")
    parsed: list[Compare | Group] = []
    for cond in conditions:
        kind = cond.WhichOneof("kind")
        if kind == "comparison":
            parsed.append(parse_comparison(cond.comparison, max_depth))
        elif kind == "group":
            parsed.append(
                parse_group(cond.group.operator, cond.group.conditions, max_depth, depth + 1)
            )
        else:
            raise InvalidArgument("a condition must hold a comparison or a group")
    return Group(operator == C.LOGICAL_OPERATOR_OR, tuple(parsed))


# -- sources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where candidates come from."""

    score: int
    fetch: Callable[[], Candidates]
    ordered_by: str | None = None  # attribute whose ascending order the source yields


def _bounds(prefix: bytes, c: Compare) -> tuple[bytes, bytes]:
    """[start, end) of the keys under ``prefix`` whose value may satisfy ``c``."""
    op = c.comparator
    if op == C.COMPARATOR_EQUALS:
        enc = keys.encode_value(c.value)
        return prefix + enc, prefix + enc + b"\xff"
    if op == C.COMPARATOR_STARTS_WITH:
        start = prefix + keys.string_prefix(c.value)
        end = keys.prefix_end(start)
        assert end is not None
        return start, end
    low_value = c.value[0] if op == C.COMPARATOR_BETWEEN else c.value
    tag = keys.encode_value(low_value)[0]
    type_start, type_end = prefix + bytes([tag]), prefix + bytes([tag + 1])
    if op == C.COMPARATOR_BETWEEN:
        return prefix + keys.encode_value(c.value[0]), prefix + keys.encode_value(
            c.value[1]
        ) + b"\xff"
    # Bounds are inclusive even for > and <: numbers are encoded as doubles, so distinct
    # integers beyond 2^53 can share the bound's encoding. The filter applies strictness.
    enc = keys.encode_value(c.value)
    if op in (C.COMPARATOR_GREATER_THAN, C.COMPARATOR_GREATER_THAN_EQUAL):
        return prefix + enc, type_end
    return type_start, prefix + enc + b"\xff"


_SCORES: dict[int, int] = {
    C.COMPARATOR_EQUALS: 90,
    C.COMPARATOR_STARTS_WITH: 60,
    C.COMPARATOR_BETWEEN: 60,
    C.COMPARATOR_GREATER_THAN: 40,
    C.COMPARATOR_GREATER_THAN_EQUAL: 40,
    C.COMPARATOR_LESS_THAN: 40,
    C.COMPARATOR_LESS_THAN_EQUAL: 40,
}


class Reader:
    """Searches over one table."""

    def __init__(self, engine: Engine, table: Table) -> None:
        self.engine = engine
        self.table = table
        self.prefix = keys.table_prefix(table.table_id)
        # Records met that cannot be returned: skipped, named once the read ends.
        self.unreadable = Unreadable(table)
        self._read_key = (table.database, table.name)

    # candidate producers

    def _decoded(self, encoded: bytes, value: bytes) -> merge.RecordState | None:
        read = self.engine.records_read
        read[self._read_key] = read.get(self._read_key, 0) + 1
        try:
            return merge.decode_state(value)
        except ValueError:
            self.unreadable.add_key(encoded)
            return None

    def _states(self, encoded: list[bytes]) -> Candidates:
        raw = self.engine.store.multi_get("data", [self.prefix + e for e in encoded])
        for e, value in zip(encoded, raw, strict=True):
            if value is not None:
                state = self._decoded(e, value)
                if state is not None and state.visible:
                    yield e, state

    def scan(
        self, start: bytes | None = None, end: bytes | None = None, reverse: bool = False
    ) -> Candidates:
        lo = start or self.prefix
        hi = end or keys.prefix_end(self.prefix)
        n = len(self.prefix)
        for key, value in self.engine.store.scan("data", lo, hi, reverse=reverse):
            state = self._decoded(key[n:], value)
            if state is not None and state.visible:
                yield key[n:], state

    def index_scan(
        self, attribute: str, start: bytes, end: bytes, dedupe: bool, reverse: bool = False
    ) -> Candidates:
        iprefix = keys.index_prefix(self.table.table_id, attribute)
        n = len(iprefix)
        seen: set[bytes] = set()
        chunk: list[bytes] = []
        for key, _ in self.engine.store.scan("index", start, end, reverse=reverse):
            encoded = key[keys.skip_value(key, n) :]
            if dedupe:
                if encoded in seen:
                    continue
                seen.add(encoded)
            chunk.append(encoded)
            if len(chunk) >= 512:
                yield from self._states(chunk)
                chunk = []
        yield from self._states(chunk)

    def by_ids(self, encoded: list[bytes]) -> Candidates:
        for i in range(0, len(encoded), 512):
            yield from self._states(encoded[i : i + 512])

    def source_for(self, c: Compare, reverse: bool = False) -> Source | None:
        """The best way to find candidates for one comparison, if any beats a scan."""
        score = _SCORES.get(c.comparator)
        if score is None:
            return None
        if c.attribute == self.table.primary_key:
            if c.comparator == C.COMPARATOR_EQUALS:
                try:
                    enc = keys.encode_key(c.value)
                except keys.InvalidKey:
                    return Source(100, lambda: iter(()))
                return Source(100, lambda: self.by_ids([enc]), c.attribute)
            start, end = _bounds(self.prefix, c)
            return Source(score, lambda: self.scan(start, end, reverse), c.attribute)
        if c.attribute in self.table.indexed:
            start, end = _bounds(keys.index_prefix(self.table.table_id, c.attribute), c)
            dedupe = c.comparator != C.COMPARATOR_EQUALS
            return Source(
                score,
                lambda: self.index_scan(c.attribute, start, end, dedupe, reverse),
                c.attribute,
            )
        return None

    def plan(self, group: Group, sort: list[tuple[str, bool]]) -> Source:
        """Choose the candidate source for a group of conditions."""
        reverse = len(sort) == 1 and sort[0][1]
        full = Source(0, lambda: self.scan(reverse=reverse), self.table.primary_key)
        comparisons = [c for c in group.conditions if isinstance(c, Compare)]
        if not group.conditions:
            return full
        if group.any_of:
            if len(comparisons) != len(group.conditions):
                return full
            sources = [self.source_for(c) for c in comparisons]
            if any(s is None for s in sources):
                return full
            return Source(10, lambda: self._union([s.fetch for s in sources if s is not None]))
        best: Source | None = None
        for c in comparisons:
            wants_order = len(sort) == 1 and sort[0][0] == c.attribute
            candidate = self.source_for(c, reverse=wants_order and reverse)
            if candidate is None:
                continue
            if wants_order:
                candidate = Source(candidate.score + 5, candidate.fetch, candidate.ordered_by)
            if best is None or candidate.score > best.score:
                best = candidate
        return best or full

    def _union(self, fetchers: list[Callable[[], Candidates]]) -> Candidates:
        seen: set[bytes] = set()
        limit = self.engine.config.storage.max_sort_rows
        for fetch in fetchers:
            for encoded, state in fetch():
                if encoded in seen:
                    continue
                if len(seen) >= limit:
                    raise ResourceExhausted(
                        f"an OR search matched more than {limit} records (storage.maxSortRows);"
                        " narrow the conditions"
                    )
                seen.add(encoded)
                yield encoded, state


class _Desc:
    """Reverses the order of a sort key inside a tuple."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[int, Any]) -> None:
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return bool(other.key < self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key

    __hash__ = None  # type: ignore[assignment]


def requested(get_attributes: Iterable[str], table: Table) -> list[str]:
    """The attributes a search returns: as asked, or for ``["*"]`` (Harper's every
    attribute) ``"*"`` followed by every attribute the table knows, which ``project``
    gives each record (null where the record has none)."""
    asked = list(get_attributes)
    if asked == ["*"]:
        return ["*", *sorted(table.attributes)]
    return asked


def project(doc: Doc, attributes: list[str]) -> Doc:
    """Keep only the requested attributes: all when empty; with ``requested``'s form of
    ``["*"]``, every attribute of the table, null where the record has none."""
    if not attributes:
        return doc
    if attributes[0] == "*":
        missing = [a for a in attributes[1:] if a not in doc]
        return {**doc, **dict.fromkeys(missing)} if missing else doc
    return {a: doc[a] for a in attributes if a in doc}


def run(
    engine: Engine,
    source: Source,
    condition: Group | None,
    sort: list[tuple[str, bool]],
    offset: int,
    limit: int,
    attributes: list[str],
    unreadable: Unreadable,
) -> Iterator[bytes]:
    """Execute a planned search; yields JSON records. Records that cannot be serialized
    are skipped and noted in ``unreadable`` (the caller fails the read after the rest)."""
    docs: Iterator[Doc] = (state.doc for _, state in source.fetch())
    if condition is not None and condition.conditions:
        docs = (d for d in docs if condition.matches(d))
    in_order = not sort or (len(sort) == 1 and source.ordered_by == sort[0][0])
    if not in_order:

        def key(doc: Doc) -> tuple[Any, ...]:
            parts: list[Any] = []
            for attribute, descending in sort:
                k = sort_key(doc[attribute]) if attribute in doc else _missing_key()
                parts.append(_Desc(k) if descending else k)
            return tuple(parts)

        cap = engine.config.storage.max_sort_rows
        if limit:
            docs = iter(heapq.nsmallest(offset + limit, _capped(docs, None), key=key))
        else:
            docs = iter(sorted(_capped(docs, cap), key=key))
    elif sort:
        docs = _exact_order(docs, sort[0][0], sort[0][1])
    skipped = 0
    sent = 0
    render = unreadable.render
    for doc in docs:
        if skipped < offset:
            skipped += 1
            continue
        record = render(project(doc, attributes))
        if record is None:
            continue
        yield record
        sent += 1
        if limit and sent >= limit:
            return


def _exact_order(docs: Iterator[Doc], attribute: str, descending: bool) -> Iterator[Doc]:
    """Index order made exact: numbers are indexed as doubles, so distinct integers beyond
    2^53 can share an index position; each run of such records is sorted by value."""
    run: list[Doc] = []
    run_key = b""
    for doc in docs:
        value = doc.get(attribute)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        key = keys.encode_value(value) if number else b""
        if run and key != run_key:
            run.sort(key=lambda d: d[attribute], reverse=descending)
            yield from run
            run = []
        if not number:
            yield doc
            continue
        run_key = key
        run.append(doc)
    run.sort(key=lambda d: d[attribute], reverse=descending)
    yield from run


def _capped(docs: Iterator[Doc], cap: int | None) -> Iterator[Doc]:
    for i, doc in enumerate(docs):
        if cap is not None and i >= cap:
            raise ResourceExhausted(
                f"sorting more than {cap} records in memory (storage.maxSortRows); add a limit"
                " or a condition on an indexed attribute"
            )
        yield doc


def value_condition(attribute: str, value: Any) -> Compare | Group:
    """search_by_value semantics: exact, or a string pattern with * wildcards."""
    if not isinstance(value, str) or "*" not in value:
        if isinstance(value, dict | list):
            raise InvalidArgument("search value must be a JSON scalar")
        return Compare(attribute, C.COMPARATOR_EQUALS, value)
    inner = value.strip("*")
    if not inner:
        return Group(False, ())  # "*" matches every record
    if "*" not in inner:
        if not value.startswith("*"):
            return Compare(attribute, C.COMPARATOR_STARTS_WITH, inner)
        if not value.endswith("*"):
            return Compare(attribute, C.COMPARATOR_ENDS_WITH, inner)
        # `*abc*` is a substring pattern, like every other pattern matched against each
        # element of an array (COMPARATOR_CONTAINS would test array membership instead).
    regex = re.compile("^" + ".*".join(re.escape(p) for p in value.split("*")) + "$", re.S)
    return Compare(attribute, PATTERN, regex)
