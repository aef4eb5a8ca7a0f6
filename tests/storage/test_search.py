"""SearchById, SearchByValue and SearchByConditions through the real storage service.

Every search runs on two tables holding the same records, one with secondary indexes
and one without: the results must not depend on whether an index drives the search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from shoal.storage.v1 import storage_pb2 as pb

from tests.conftest import MakeNode
from tests.harness.client import StorageClient, cond, group
from tests.harness.node import Node

INVALID = grpc.StatusCode.INVALID_ARGUMENT
INDEXED = ["name", "age", "tags", "city", "score", "flag"]
TABLES = ("indexed", "plain")

SPECIAL: list[dict[str, Any]] = [
    {"id": 1, "name": "abc", "age": 30, "tags": ["red", "blue"], "city": "Oslo", "score": 1.5,
     "flag": True},
    {"id": 2, "name": "abcd", "age": 25, "tags": ["green"], "city": "Bergen", "score": 2,
     "flag": False},
    {"id": 3, "name": "xabc", "age": "30", "tags": [], "city": "oslo", "flag": 1},
    {"id": 4, "name": "a-c", "age": 40.5, "tags": ["red"], "city": "Oslo", "score": None},
    {"id": 5, "name": "ac", "age": 18, "tags": ["blue", "red", "abc"], "score": 10,
     "flag": "true"},
    {"id": 6, "name": "ABC", "age": 30, "city": "Trondheim", "tags": "red"},
    {"id": 7, "name": "a*c literal", "age": 65, "city": "Oslo"},
    {"id": 8, "name": "bca", "age": 1, "nested": {"a": 1}, "city": None},
    {"id": 9, "name": "", "age": 0},
    {"id": 10, "age": -5, "city": "Bergen"},
]  # fmt: skip
CITIES = ["Oslo", "Bergen", "Stavanger", "Tromsø"]
FILLER: list[dict[str, Any]] = [
    {"id": i, "name": f"n{i:03d}", "age": i % 17, "city": CITIES[i % 4], "score": i / 4}
    for i in range(11, 121)
]
DATA = SPECIAL + FILLER
ALL_IDS = [r["id"] for r in DATA]
WORDS = ["apple", "apricot", "banana", "band", "bandana", "cherry", "Apple", "äpple", "app"]


def start_node(workdir: Path, config: dict[str, Any] | None = None) -> Node:
    node = Node(workdir, config=config)
    try:
        node.start()
    except BaseException:
        node.close()
        raise
    return node


@pytest.fixture(scope="module")
def search_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the whole module: the searches only read."""
    node = start_node(tmp_path_factory.mktemp("search"))
    try:
        client = node.client()
        client.create_table("dev", "indexed", indexed=INDEXED)
        client.create_table("dev", "plain")
        client.create_table("dev", "word", primary_key="word", indexed=["n"])
        for table in TABLES:
            client.insert("dev", table, DATA)
            # A deleted record must never be found, through an index or a scan.
            client.insert("dev", table, [{"id": 500, "name": "abc", "age": 30, "tags": ["red"]}])
            client.delete("dev", table, [500])
        client.insert("dev", "word", [{"word": w, "n": i} for i, w in enumerate(WORDS)])
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def db(search_node: Node) -> StorageClient:
    return search_node.client()


def id_list(records: list[dict[str, Any]]) -> list[Any]:
    return [r["id"] for r in records]


def both(run: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run a search on both tables; the same records must come back (order by id)."""
    indexed, plain = run("indexed"), run("plain")
    assert sorted(indexed, key=lambda r: r["id"]) == sorted(plain, key=lambda r: r["id"])
    return sorted(indexed, key=lambda r: r["id"])


def by_value(db: StorageClient, attribute: str, value: Any, **kwargs: Any) -> list[Any]:
    return id_list(both(lambda t: db.by_value("dev", t, attribute, value, **kwargs)))


def where(db: StorageClient, *conditions: pb.Condition, operator: str = "and") -> list[Any]:
    return id_list(both(lambda t: db.by_conditions("dev", t, conditions, operator)))


def model(predicate: Callable[[dict[str, Any]], bool]) -> list[Any]:
    return sorted(r["id"] for r in DATA if predicate(r))


def number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- SearchById ----------------------------------------------------------------------------


def test_search_by_id_order_projection_and_missing(db: StorageClient) -> None:
    assert db.get("dev", "indexed", [3, 999, 1, 500, 2.0]) == [DATA[2], DATA[0], DATA[1]]
    assert db.get("dev", "indexed", [4, 1], ["name", "score", "missing"]) == [
        {"name": "a-c", "score": None},
        {"name": "abc", "score": 1.5},
    ]
    # ["*"]: every attribute the table knows, null where the record has none.
    assert db.get("dev", "indexed", [1], ["*"]) == [{**DATA[0], "nested": None}]
    assert db.get("dev", "indexed", ["1", 1000]) == []
    assert db.get("dev", "word", ["banana", "apple"], ["n"]) == [{"n": 2}, {"n": 0}]
    db.expect(
        INVALID,
        "SearchById",
        pb.SearchByIdRequest(database="dev", table="indexed", ids=[b"1", b"true"]),
        "id 1",
        "primary key",
    )
    db.expect(
        INVALID,
        "SearchById",
        pb.SearchByIdRequest(database="dev", table="indexed", ids=[b"{"]),
        "id 0",
        "json",
    )
    db.expect(
        grpc.StatusCode.NOT_FOUND,
        "SearchById",
        pb.SearchByIdRequest(database="dev", table="nope", ids=[b"1"]),
        "dev.nope",
    )


# -- SearchByValue -------------------------------------------------------------------------


def test_search_by_value_exact(db: StorageClient) -> None:
    assert by_value(db, "name", "abc") == [1]
    assert by_value(db, "name", "") == [9]
    assert by_value(db, "age", 30) == [1, 6]
    assert by_value(db, "age", 30.0) == [1, 6]
    assert by_value(db, "age", "30") == [3]
    assert by_value(db, "flag", True) == [1]
    assert by_value(db, "flag", 1) == [3]
    assert by_value(db, "flag", "true") == [5]
    assert by_value(db, "flag", False) == [2]
    assert by_value(db, "score", None) == [4]
    assert by_value(db, "city", None) == [8]
    assert by_value(db, "tags", "red") == [1, 4, 5, 6]
    assert by_value(db, "tags", "abc") == [5]
    assert by_value(db, "city", "oslo") == [3]
    assert by_value(db, "city", "Tromsø") == model(lambda r: r.get("city") == "Tromsø")
    assert by_value(db, "nowhere", 1) == []


def test_search_by_value_patterns(db: StorageClient) -> None:
    assert by_value(db, "name", "abc*") == [1, 2]
    assert by_value(db, "name", "*abc") == [1, 3]
    assert by_value(db, "name", "*bc*") == [1, 2, 3, 8]
    assert by_value(db, "name", "a*c") == [1, 4, 5]
    assert by_value(db, "name", "a*c*") == [1, 2, 4, 5, 7]
    assert by_value(db, "name", "*c*l*") == [7]
    assert by_value(db, "name", "n01*") == model(lambda r: str(r.get("name", "")).startswith("n01"))
    assert by_value(db, "name", "*") == ALL_IDS
    assert by_value(db, "name", "**") == ALL_IDS
    assert by_value(db, "tags", "bl*") == [1, 5]
    assert by_value(db, "tags", "*ee*") == [2]
    assert by_value(db, "city", "*o") == model(lambda r: str(r.get("city")).endswith("o"))
    # Patterns only ever match strings.
    assert by_value(db, "age", "3*") == [3]
    assert by_value(db, "flag", "tr*") == [5]


def test_search_by_value_on_the_primary_key(db: StorageClient) -> None:
    assert by_value(db, "id", 7) == [7]
    assert by_value(db, "id", 7.0) == [7]
    assert by_value(db, "id", "7") == []
    assert by_value(db, "id", True) == []
    assert by_value(db, "id", "*") == ALL_IDS
    assert by_value(db, "id", "1*") == []

    def words(value: Any, **kwargs: Any) -> list[str]:
        return [r["word"] for r in db.by_value("dev", "word", "word", value, **kwargs)]

    assert words("band") == ["band"]
    assert words("ban*") == ["banana", "band", "bandana"]
    assert words("ap*") == ["app", "apple", "apricot"]
    assert words("*ana") == ["banana", "bandana"]
    assert words("*an*") == ["banana", "band", "bandana"]
    assert words("a*e") == ["apple"]
    assert words("*pple") == ["Apple", "apple", "äpple"]
    assert words("*") == sorted(WORDS)
    assert words("*", sort=[("word", True)]) == sorted(WORDS, reverse=True)
    assert words("*", limit=2, offset=1) == sorted(WORDS)[1:3]
    assert [r["word"] for r in db.by_value("dev", "word", "n", 2)] == ["banana"]


def test_search_by_value_order_limit_offset_projection(db: StorageClient) -> None:
    # Without a sort, an indexed search comes in index order (value, then key).
    assert id_list(db.by_value("dev", "indexed", "name", "a*")) == [7, 4, 1, 2, 5]
    sort = [("name", False)]
    for table in TABLES:
        assert id_list(db.by_value("dev", table, "name", "a*", sort=sort)) == [7, 4, 1, 2, 5]
        assert id_list(db.by_value("dev", table, "name", "a*", sort=[("name", True)])) == [
            5,
            2,
            1,
            4,
            7,
        ]
        assert id_list(db.by_value("dev", table, "name", "a*", sort=sort, limit=2, offset=1)) == [
            4,
            1,
        ]
        assert db.by_value(
            "dev", table, "name", "a*", sort=sort, limit=1, get_attributes=["name", "age"]
        ) == [{"name": "a*c literal", "age": 65}]
        assert db.by_value("dev", table, "name", "a*", sort=sort, offset=10) == []
        assert id_list(db.by_value("dev", table, "id", "*", limit=3)) == [1, 2, 3]
        assert id_list(db.by_value("dev", table, "id", "*", sort=[("id", True)], limit=3)) == [
            120,
            119,
            118,
        ]


def test_search_by_value_errors(db: StorageClient) -> None:
    def request(value: bytes, **kwargs: Any) -> pb.SearchByValueRequest:
        fields: dict[str, Any] = {"database": "dev", "table": "indexed", "attribute": "name"}
        fields.update(kwargs)
        return pb.SearchByValueRequest(value=value, **fields)

    db.expect(INVALID, "SearchByValue", request(b'{"a": 1}'), "scalar")
    db.expect(INVALID, "SearchByValue", request(b"[1, 2]"), "scalar")
    db.expect(INVALID, "SearchByValue", request(b"{nope"), "json")
    db.expect(INVALID, "SearchByValue", request(b""), "value is required")
    db.expect(INVALID, "SearchByValue", request(b'"a"', attribute=""), "attribute")
    db.expect(INVALID, "SearchByValue", request(b'"a"', sort=[pb.SortKey(descending=True)]), "sort")
    db.expect(grpc.StatusCode.NOT_FOUND, "SearchByValue", request(b'"a"', table="nope"), "dev.nope")


# -- SearchByConditions --------------------------------------------------------------------


def test_equals_and_not_equal(db: StorageClient) -> None:
    assert where(db, cond("age", "equals", 30)) == [1, 6]
    assert where(db, cond("age", "equals", "30")) == [3]
    assert where(db, cond("flag", "equals", True)) == [1]
    assert where(db, cond("flag", "equals", 1)) == [3]
    assert where(db, cond("score", "equals", None)) == [4]
    assert where(db, cond("tags", "equals", "blue")) == [1, 5]
    assert where(db, cond("id", "equals", 4)) == [4]
    assert where(db, cond("id", "equals", "4")) == []
    # not_equal is also true when the attribute is missing; true is not 1.
    assert where(db, cond("age", "not_equal", 30)) == model(lambda r: r["age"] != 30)
    assert where(db, cond("flag", "not_equal", True)) == model(lambda r: r.get("flag") is not True)
    assert where(db, cond("flag", "not_equal", 1)) == model(
        lambda r: not (number(r.get("flag")) and r.get("flag") == 1)
    )
    assert where(db, cond("city", "not_equal", "Oslo")) == model(lambda r: r.get("city") != "Oslo")
    assert where(db, cond("id", "not_equal", 5)) == model(lambda r: r["id"] != 5)


def test_range_comparators(db: StorageClient) -> None:
    def numeric(attribute: str, test: Callable[[Any], bool]) -> list[Any]:
        return model(lambda r: number(r.get(attribute)) and test(r[attribute]))

    assert where(db, cond("age", "greater_than", 25)) == numeric("age", lambda v: v > 25)
    assert where(db, cond("age", "greater_than_equal", 25)) == numeric("age", lambda v: v >= 25)
    assert where(db, cond("age", "less_than", 1)) == numeric("age", lambda v: v < 1)
    assert where(db, cond("age", "less_than_equal", 1)) == numeric("age", lambda v: v <= 1)
    assert where(db, cond("age", "between", [18, 30])) == numeric("age", lambda v: 18 <= v <= 30)
    assert where(db, cond("age", "between", [40.5, 40.5])) == [4]
    assert where(db, cond("age", "between", [30, 18])) == []
    assert where(db, cond("score", "greater_than", 1.5)) == numeric("score", lambda v: v > 1.5)
    assert where(db, cond("score", "less_than", 0.5)) == numeric("score", lambda v: v < 0.5)
    assert where(db, cond("id", "greater_than", 115)) == [116, 117, 118, 119, 120]
    assert where(db, cond("id", "between", [9, 12])) == [9, 10, 11, 12]
    assert where(db, cond("id", "less_than_equal", 2)) == [1, 2]
    # Strings compare with strings only: "30" is not greater than 25, 30 is not > "2".
    assert where(db, cond("age", "greater_than", "2")) == [3]
    assert where(db, cond("age", "less_than", "4")) == [3]
    assert where(db, cond("name", "between", ["a", "b"])) == [1, 2, 4, 5, 7]
    assert where(db, cond("name", "greater_than", "n118")) == [3, 119, 120]
    assert where(db, cond("name", "less_than", "a-c")) == [6, 7, 9]
    assert where(db, cond("name", "greater_than_equal", "xabc")) == [3]
    assert where(db, cond("city", "less_than_equal", "Bergen")) == model(
        lambda r: isinstance(r.get("city"), str) and r["city"] <= "Bergen"
    )
    assert where(db, cond("id", "greater_than", "1")) == []
    assert where(db, cond("word", "greater_than", 0)) == []
    # Booleans and nulls are never in a numeric range.
    assert 1 not in where(db, cond("flag", "greater_than_equal", 0))
    assert where(db, cond("flag", "greater_than_equal", 0)) == [3]
    assert 4 not in where(db, cond("score", "less_than", 100))
    # On an array attribute, a range matches when any element does.
    assert where(db, cond("tags", "greater_than", "q")) == [1, 4, 5, 6]
    assert where(db, cond("tags", "between", ["a", "b"])) == [5]


def test_string_comparators(db: StorageClient) -> None:
    assert where(db, cond("name", "starts_with", "ab")) == [1, 2]
    assert where(db, cond("name", "starts_with", "")) == model(
        lambda r: isinstance(r.get("name"), str)
    )
    assert where(db, cond("name", "ends_with", "bc")) == [1, 3]
    assert where(db, cond("name", "contains", "bc")) == [1, 2, 3, 8]
    assert where(db, cond("name", "contains", "*")) == [7]
    assert where(db, cond("city", "starts_with", "Tr")) == model(
        lambda r: str(r.get("city")).startswith("Tr")
    )
    assert where(db, cond("id", "starts_with", "1")) == []
    assert where(db, cond("age", "starts_with", "3")) == [3]
    assert where(db, cond("age", "contains", "0")) == [3]
    # contains on an array is element membership; on a string it is a substring.
    assert where(db, cond("tags", "contains", "red")) == [1, 4, 5, 6]
    assert where(db, cond("tags", "contains", "re")) == [6]
    assert where(db, cond("tags", "starts_with", "gr")) == [2]
    assert where(db, cond("tags", "ends_with", "ue")) == [1, 5]


def test_and_or_and_nested_groups(db: StorageClient) -> None:
    assert where(db, cond("city", "equals", "Oslo"), cond("age", "greater_than", 29)) == [1, 4, 7]
    assert where(db, cond("city", "equals", "Oslo"), cond("tags", "contains", "red")) == [1, 4]
    assert where(
        db, cond("name", "equals", "abc"), cond("name", "equals", "ac"), operator="or"
    ) == [1, 5]
    assert where(db, cond("flag", "equals", True), cond("flag", "equals", 1), operator="or") == [
        1,
        3,
    ]
    # not_equal null holds for every record (missing attributes included).
    assert (
        where(db, cond("age", "greater_than", 60), cond("nested", "not_equal", None), operator="or")
        == ALL_IDS
    )
    assert where(db, cond("nested", "equals", None)) == []
    assert where(db, cond("id", "equals", 3), cond("name", "equals", "abc"), operator="or") == [
        1,
        3,
    ]
    assert (
        where(db, cond("id", "greater_than", 118), cond("nested", "not_equal", None), operator="or")
        == ALL_IDS
    )
    assert where(
        db, cond("id", "greater_than", 118), cond("tags", "contains", "abc"), operator="or"
    ) == [5, 119, 120]
    mixed = where(db, cond("age", "less_than", 0), cond("city", "equals", "oslo"), operator="or")
    assert mixed == [3, 10]
    nested = where(
        db,
        cond("city", "equals", "Oslo"),
        group("or", cond("age", "equals", 30), cond("tags", "contains", "red")),
    )
    assert nested == [1, 4]
    deeper = where(
        db,
        group(
            "and",
            cond("city", "starts_with", "B"),
            group("or", cond("age", "less_than", 0), cond("score", "greater_than_equal", 20)),
        ),
        group("and", cond("name", "starts_with", "n1"), cond("age", "equals", 2)),
        operator="or",
    )
    assert deeper == model(
        lambda r: (
            (
                str(r.get("city")).startswith("B")
                and (
                    (number(r["age"]) and r["age"] < 0)
                    or (number(r.get("score")) and r["score"] >= 20)
                )
            )
            or (str(r.get("name")).startswith("n1") and r["age"] == 2)
        )
    )
    assert len(deeper) > 10
    # No conditions match everything; an empty nested group matches everything.
    assert where(db) == ALL_IDS
    assert where(db, group("or"), cond("id", "less_than", 3)) == [1, 2]
    assert where(db, cond("id", "equals", 1), cond("id", "equals", 2)) == []


def test_sort_limit_offset(db: StorageClient) -> None:
    conditions = [cond("age", "between", [0, 30]), cond("city", "starts_with", "")]
    expected = sorted(
        (
            r
            for r in DATA
            if number(r["age"]) and 0 <= r["age"] <= 30 and isinstance(r.get("city"), str)
        ),
        key=lambda r: (r["age"], r["id"]),
    )
    assert len(expected) > 50
    by_age_desc = sorted(expected, key=lambda r: (-r["age"], r["id"]))
    by_id = sorted(expected, key=lambda r: r["id"])
    # city descending, then age ascending, then id descending (stable sorts, last key first)
    multi = sorted(expected, key=lambda r: -r["id"])
    multi = sorted(multi, key=lambda r: r["age"])
    multi = sorted(multi, key=lambda r: r["city"], reverse=True)
    for table in TABLES:
        search = functools.partial(db.by_conditions, "dev", table, conditions)
        assert search(sort=[("age", False), ("id", False)]) == expected
        # Ties on a single sort key: the order of the tied records is unspecified.
        assert [r["age"] for r in search(sort=[("age", False)])] == [r["age"] for r in expected]
        assert [r["age"] for r in search(sort=[("age", True)])] == [r["age"] for r in by_age_desc]
        assert search(sort=[("age", True), ("id", False)]) == by_age_desc
        assert search(sort=[("city", True), ("age", False), ("id", True)]) == multi
        assert search(sort=[("city", True), ("age", False), ("id", True)], limit=4) == multi[:4]
        assert search(sort=[("age", False), ("id", False)], limit=5) == expected[:5]
        assert search(sort=[("age", False), ("id", False)], limit=5, offset=7) == expected[7:12]
        assert (
            search(sort=[("age", True), ("id", False)], offset=len(expected) - 2)
            == (by_age_desc[-2:])
        )
        assert search(sort=[("age", False), ("id", False)], offset=len(expected)) == []
        by_key = db.by_conditions(
            "dev", table, [cond("id", "between", [5, 50])], sort=[("id", True)], limit=3, offset=1
        )
        assert id_list(by_key) == [49, 48, 47]
        assert search(sort=[("id", True)], limit=3) == by_id[::-1][:3]
        assert search(sort=[("id", False)], limit=4, offset=2) == by_id[2:6]
        assert search(limit=4, offset=2, sort=[("id", False)], get_attributes=["id", "city"]) == [
            {"id": r["id"], "city": r["city"]} for r in by_id[2:6]
        ]
        assert search(
            sort=[("age", False), ("id", False)], limit=2, get_attributes=["age", "city"]
        ) == [{"age": r["age"], "city": r["city"]} for r in expected[:2]]
        # Without a sort, limit and offset still page through the same set.
        pages = [search(limit=10, offset=o) for o in range(0, len(expected), 10)]
        assert sorted(r["id"] for page in pages for r in page) == [r["id"] for r in by_id]


def test_sort_orders_types_and_missing_values(db: StorageClient) -> None:
    # Records with and without the sort attribute, of mixed types: the same order on both.
    special = [cond("id", "less_than_equal", 10)]
    for key in ["score", "flag", "age", "city", "name"]:
        results = [
            id_list(db.by_conditions("dev", t, special, sort=[(key, False), ("id", False)]))
            for t in TABLES
        ]
        assert results[0] == results[1], key
        assert sorted(results[0]) == list(range(1, 11))
    ages = db.by_conditions("dev", "plain", special, sort=[("age", False)])
    # Numbers before strings; numbers in numeric order.
    assert [r["age"] for r in ages] == [-5, 0, 1, 18, 25, 30, 30, 40.5, 65, "30"]


def test_condition_errors(db: StorageClient) -> None:
    def request(*conditions: pb.Condition, **kwargs: Any) -> pb.SearchByConditionsRequest:
        return pb.SearchByConditionsRequest(
            database="dev", table="indexed", conditions=conditions, **kwargs
        )

    def raw(attribute: str, comparator: int, value: bytes) -> pb.Condition:
        return pb.Condition(
            comparison=pb.Comparison(attribute=attribute, comparator=comparator, value=value)  # type: ignore[arg-type]
        )

    cases: list[tuple[pb.Condition, list[str]]] = [
        (raw("age", pb.COMPARATOR_UNSPECIFIED, b"1"), ["comparator"]),
        (raw("age", 99, b"1"), ["comparator"]),
        (raw("", pb.COMPARATOR_EQUALS, b"1"), ["attribute"]),
        (raw("age", pb.COMPARATOR_EQUALS, b"{bad"), ["json"]),
        (raw("age", pb.COMPARATOR_EQUALS, b""), ["json"]),
        (raw("age", pb.COMPARATOR_EQUALS, b"18446744073709551616"), ["64-bit"]),
        (raw("age", pb.COMPARATOR_BETWEEN, b"[1, " + b"[" * 64 + b"]" * 64 + b"]"), ["levels"]),
        (cond("age", "between", 5), ["between", "[low, high]"]),
        (cond("age", "between", [5]), ["between", "[low, high]"]),
        (cond("age", "between", [1, 2, 3]), ["between", "[low, high]"]),
        (cond("age", "between", [1, "z"]), ["between", "bounds"]),
        (cond("age", "between", [True, False]), ["between", "bounds"]),
        (cond("age", "between", [None, 3]), ["between", "bounds"]),
        (cond("age", "greater_than", True), ["greater_than", "number or a string"]),
        (cond("age", "less_than", None), ["less_than", "number or a string"]),
        (cond("age", "less_than_equal", [1]), ["less_than_equal", "number or a string"]),
        (cond("name", "starts_with", 1), ["starts_with", "string"]),
        (cond("name", "ends_with", None), ["ends_with", "string"]),
        (cond("name", "equals", {"a": 1}), ["equals", "scalar"]),
        (cond("tags", "contains", ["red"]), ["contains", "scalar"]),
        (pb.Condition(), ["comparison or a group"]),
    ]
    for condition, words in cases:
        db.expect(INVALID, "SearchByConditions", request(condition), *words)
        # Also when nested in a group.
        db.expect(
            INVALID,
            "SearchByConditions",
            request(cond("id", "equals", 1), group("or", cond("id", "equals", 2), condition)),
            *words,
        )
    db.expect(
        INVALID,
        "SearchByConditions",
        request(cond("id", "equals", 1), sort=[pb.SortKey(attribute="")]),
        "sort",
    )
    db.expect(
        grpc.StatusCode.NOT_FOUND,
        "SearchByConditions",
        pb.SearchByConditionsRequest(database="nope", table="indexed"),
        "nope",
    )


# -- large results -------------------------------------------------------------------------


def test_large_results_arrive_in_several_chunks(db: StorageClient) -> None:
    db.create_table("dev", "big", indexed=["even"])
    for start in range(0, 5000, 2500):
        db.insert(
            "dev",
            "big",
            [{"id": i, "even": i % 2 == 0, "pad": "x" * 20} for i in range(start, start + 2500)],
        )
    chunks = db.stream(
        "SearchByValue",
        pb.SearchByValueRequest(database="dev", table="big", attribute="id", value=b'"*"'),
    )
    assert len(chunks) > 1
    keys = [orjson.loads(r)["id"] for c in chunks for r in c.records]
    assert keys == list(range(5000))
    chunks = db.stream(
        "SearchByConditions",
        pb.SearchByConditionsRequest(
            database="dev",
            table="big",
            conditions=[cond("even", "equals", True)],
            sort=[pb.SortKey(attribute="id", descending=True)],
        ),
    )
    assert len(chunks) > 1
    keys = [orjson.loads(r)["id"] for c in chunks for r in c.records]
    assert keys == list(range(4998, -1, -2))
    chunks = db.stream(
        "SearchById",
        pb.SearchByIdRequest(
            database="dev", table="big", ids=[orjson.dumps(i) for i in range(4999, -1, -1)]
        ),
    )
    assert len(chunks) > 1
    assert [orjson.loads(r)["id"] for c in chunks for r in c.records] == list(range(4999, -1, -1))


def test_unindexed_sort_limit(make_node: MakeNode) -> None:
    node = make_node(config={"storage": {"maxSortRows": 10}})
    client = node.client()
    client.create_table("dev", "item", indexed=["n"])
    client.insert("dev", "item", [{"id": i, "n": i % 5, "m": -i} for i in range(30)])
    error = client.expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SearchByConditions",
        pb.SearchByConditionsRequest(
            database="dev", table="item", sort=[pb.SortKey(attribute="m")]
        ),
        "maxSortRows",
    )
    assert error.details()
    client.expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "SearchByValue",
        pb.SearchByValueRequest(
            database="dev",
            table="item",
            attribute="id",
            value=b'"*"',
            sort=[pb.SortKey(attribute="m")],
        ),
        "maxSortRows",
    )
    # With a limit, or in an order an index gives, the sort is bounded and allowed.
    top = client.by_conditions("dev", "item", [], sort=[("m", False)], limit=3)
    assert [r["id"] for r in top] == [29, 28, 27]
    by_key = client.by_value("dev", "item", "id", "*", sort=[("id", True)])
    assert [r["id"] for r in by_key] == list(range(29, -1, -1))
    few = client.by_conditions("dev", "item", [cond("n", "equals", 1)], sort=[("m", False)])
    assert [r["id"] for r in few] == [26, 21, 16, 11, 6, 1]


def test_integers_beyond_double_precision(db: StorageClient) -> None:
    # Nanosecond timestamps and 64-bit ids do not fit a double exactly: the index may only
    # narrow the candidates, the comparison itself is exact.
    base = 1_700_000_000_000_000_000
    values = [base + 1, base - 256, base, base + 300, base + 2, base - 1]
    db.create_table("dev", "ns_indexed", indexed=["ts"])
    db.create_table("dev", "ns_plain")
    for table in ("ns_indexed", "ns_plain"):
        db.insert("dev", table, [{"id": i, "ts": v} for i, v in enumerate(values)])

    def found(*conditions: pb.Condition) -> list[int]:
        results = [
            sorted(r["ts"] for r in db.by_conditions("dev", t, conditions))
            for t in ("ns_indexed", "ns_plain")
        ]
        assert results[0] == results[1], conditions
        return results[0]

    assert found(cond("ts", "greater_than", base)) == sorted(v for v in values if v > base)
    assert found(cond("ts", "greater_than_equal", base + 1)) == sorted(
        v for v in values if v > base
    )
    assert found(cond("ts", "less_than", base + 1)) == sorted(v for v in values if v <= base)
    assert found(cond("ts", "less_than_equal", base)) == sorted(v for v in values if v <= base)
    assert found(cond("ts", "between", [base, base + 2])) == [base, base + 1, base + 2]
    assert found(cond("ts", "equals", base + 1)) == [base + 1]
    assert found(cond("ts", "not_equal", base)) == sorted(v for v in values if v != base)
    for table in ("ns_indexed", "ns_plain"):
        for descending in (False, True):
            ordered = db.by_conditions(
                "dev", table, [cond("ts", "greater_than", base - 2)], sort=[("ts", descending)]
            )
            assert [r["ts"] for r in ordered] == sorted(
                (v for v in values if v > base - 2), reverse=descending
            ), (table, descending)
            limited = db.by_conditions(
                "dev",
                table,
                [cond("ts", "between", [base - 1, base + 2])],
                sort=[("ts", descending)],
                limit=2,
            )
            expected = sorted((v for v in values if base - 1 <= v <= base + 2), reverse=descending)
            assert [r["ts"] for r in limited] == expected[:2], (table, descending)
