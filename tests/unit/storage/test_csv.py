"""The streaming CSV parser: chunk boundaries never matter, fields are typed, bad rows are
reported by line and skipped."""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import jsoninput
from services.common.errors import InvalidArgument
from services.storage import csvload
from services.storage.csvload import CsvParser, convert

BOM = b"\xef\xbb\xbf"
DEPTH = jsoninput.DEFAULT_NESTING_DEPTH

Result = tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]], int]


def parse(data: bytes, cuts: list[int] | tuple[int, ...] = ()) -> Result:
    """Feed ``data`` split at ``cuts``; the records, issues and failure count."""
    parser = CsvParser()
    records: list[tuple[int, dict[str, Any]]] = []
    start = 0
    for cut in [*cuts, len(data)]:
        records += [(line, orjson.loads(r)) for line, r in parser.feed(data[start:cut])]
        start = cut
    records += [(line, orjson.loads(r)) for line, r in parser.feed(b"", final=True)]
    issues = [(i.line, i.message) for i in parser.issues]
    return records, issues, parser.failed


SAMPLE = (
    BOM
    + (
        "id,name,notes,price\r\n"
        '1,Penny,"likes ""fetch"", naps",12.5\r\n'
        '2,"Kato\nthe\r\nlab",,true\n'
        "3,Zoë 😀 日本,plain,-4\n"
        "\n"
        "4,too,many,fields,here\n"
        '5,"quoted, comma","[1, ""a""]",{"x": 1}\n'
        '6,5\'10" tall,"12"" pizza",0\n'
        "7,last,no newline,007"
    ).encode()
)

SAMPLE_RECORDS = [
    (2, {"id": 1, "name": "Penny", "notes": 'likes "fetch", naps', "price": 12.5}),
    (3, {"id": 2, "name": "Kato\nthe\r\nlab", "price": True}),
    (6, {"id": 3, "name": "Zoë 😀 日本", "notes": "plain", "price": -4}),
    (9, {"id": 5, "name": "quoted, comma", "notes": [1, "a"], "price": {"x": 1}}),
    (10, {"id": 6, "name": "5'10\" tall", "notes": '12" pizza', "price": 0}),
    (11, {"id": 7, "name": "last", "notes": "no newline", "price": "007"}),
]


def test_sample_in_one_chunk() -> None:
    records, issues, failed = parse(SAMPLE)
    assert records == SAMPLE_RECORDS
    assert issues == [(8, "line 8 has 5 fields, the header has 4")]
    assert failed == 1


def test_sample_split_at_every_byte() -> None:
    expected = parse(SAMPLE)
    for cut in range(len(SAMPLE) + 1):
        assert parse(SAMPLE, [cut]) == expected, f"split at byte {cut}"


def test_sample_split_at_every_pair_of_bytes() -> None:
    expected = parse(SAMPLE)
    for first in range(0, len(SAMPLE) + 1, 3):
        for second in range(first, len(SAMPLE) + 1):
            assert parse(SAMPLE, [first, second]) == expected, (first, second)


def test_sample_one_byte_at_a_time() -> None:
    assert parse(SAMPLE, list(range(1, len(SAMPLE)))) == parse(SAMPLE)


# -- generated files ----------------------------------------------------------------------

plain_chars = st.sampled_from(list("ab 1-.é😀日'\t"))
quotable_chars = plain_chars | st.sampled_from(list(',"\n\r'))


@st.composite
def a_field(draw: st.DrawFn) -> str:
    """The raw text of one field as it appears in the file."""
    if draw(st.booleans()):
        value = draw(st.text(quotable_chars, max_size=6))
        return '"' + value.replace('"', '""') + '"'
    # Unquoted: anything but separators; a quote inside (not first) is a literal character.
    first = draw(st.text(plain_chars, max_size=1))
    rest = draw(st.text(plain_chars | st.just('"'), max_size=5)) if first else ""
    return first + rest


@st.composite
def a_file(draw: st.DrawFn) -> bytes:
    width = draw(st.integers(1, 4))
    header = ",".join(f"c{i}" for i in range(width))
    lines = [header]
    for _ in range(draw(st.integers(0, 6))):
        n = draw(st.sampled_from([width, width, width, width + 1, max(1, width - 1), 0]))
        lines.append(",".join(draw(a_field()) for _ in range(n)))
    ends = [draw(st.sampled_from(["\n", "\r\n"])) for _ in lines]
    text = "".join(line + end for line, end in zip(lines, ends, strict=True))
    if draw(st.booleans()):
        text = text.removesuffix(ends[-1])
    return (BOM if draw(st.booleans()) else b"") + text.encode("utf-8")


def oracle(data: bytes) -> Result:
    """What the parser must produce: Python's csv reader over the whole file at once."""
    text = data.decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records: list[tuple[int, dict[str, Any]]] = []
    issues: list[tuple[int, str]] = []
    lines_before = 0
    for row in reader:
        line = lines_before + 1
        lines_before = reader.line_num
        if header is None:
            header = [name.strip() for name in row]
            continue
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            issues.append(
                (line, f"line {line} has {len(row)} fields, the header has {len(header)}")
            )
            continue
        doc = {
            name: convert(value, DEPTH) for name, value in zip(header, row, strict=True) if value
        }
        records.append((line, orjson.loads(orjson.dumps(doc))))
    return records, issues, len(issues)


@settings(max_examples=200, deadline=None)
@given(a_file())
def test_generated_files_split_at_every_byte(data: bytes) -> None:
    expected = oracle(data)
    assert parse(data) == expected
    for cut in range(len(data) + 1):
        assert parse(data, [cut]) == expected, f"split at byte {cut}"


@settings(max_examples=200, deadline=None)
@given(a_file(), st.data())
def test_generated_files_in_many_chunks(data: bytes, draw: st.DataObject) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=12)))
    assert parse(data, cuts) == oracle(data)


# -- line numbers and bad rows ------------------------------------------------------------


def test_wrong_field_count_is_reported_with_its_line_and_parsing_goes_on() -> None:
    data = b"id,a\n1,x\n2\n3,y,z\n4,w\n"
    records, issues, failed = parse(data)
    assert records == [(2, {"id": 1, "a": "x"}), (5, {"id": 4, "a": "w"})]
    assert issues == [
        (3, "line 3 has 1 fields, the header has 2"),
        (4, "line 4 has 3 fields, the header has 2"),
    ]
    assert failed == 2


def test_line_numbers_count_physical_lines() -> None:
    # The proto promises "1-based line number in the file (the header row is line 1)": a
    # quoted field spanning lines pushes later rows down, and so do blank lines.
    data = b'id,a\n1,"two\nlines"\n\n2,x,extra\n3,"a\r\nb\r\nc"\n4,ok\n'
    records, issues, _ = parse(data)
    assert records == [
        (2, {"id": 1, "a": "two\nlines"}),
        (6, {"id": 3, "a": "a\r\nb\r\nc"}),
        (9, {"id": 4, "a": "ok"}),
    ]
    assert issues == [(5, "line 5 has 3 fields, the header has 2")]


def test_blank_lines_are_skipped() -> None:
    records, issues, _ = parse(b"id\n\n\r\n1\n\n")
    assert records == [(4, {"id": 1})]
    assert issues == []


def test_empty_fields_leave_the_attribute_out() -> None:
    records, _, _ = parse(b'id,a,b\n1,,""\n')
    assert records == [(2, {"id": 1})]


def test_issues_are_capped_but_all_failures_counted() -> None:
    data = b"id,a\n" + b"1\n" * (csvload.MAX_ERRORS + 5) + b"2,ok\n"
    records, issues, failed = parse(data)
    assert len(issues) == csvload.MAX_ERRORS
    assert failed == csvload.MAX_ERRORS + 5
    assert issues[0] == (2, "line 2 has 1 fields, the header has 2")
    assert records == [(csvload.MAX_ERRORS + 7, {"id": 2, "a": "ok"})]


def test_row_failed_reports_a_caller_found_problem() -> None:
    parser = CsvParser()
    assert list(parser.feed(b"id\n1\n", final=True)) == [(2, b'{"id":1}')]
    parser.row_failed(2, "has a duplicate id")
    assert [(i.line, i.message) for i in parser.issues] == [(2, "line 2 has a duplicate id")]
    assert parser.failed == 1


# -- header -------------------------------------------------------------------------------


def test_header_names_are_stripped() -> None:
    parser = CsvParser()
    assert list(parser.feed(b" id , name \n1,x\n", final=True)) == [(2, b'{"id":1,"name":"x"}')]
    assert parser.header == ["id", "name"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"id,,name\n1,2,3\n", "must name every column"),
        (b"id, \n", "must name every column"),
        (b"\nid\n1\n", "must name every column"),
        (b"id,name,id\n", "names a column twice"),
        (b"id, id\n", "names a column twice"),
    ],
)
def test_header_problems(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse(data)


def test_header_only_and_empty_files() -> None:
    parser = CsvParser()
    assert list(parser.feed(b"id,name\n", final=True)) == []
    assert parser.header == ["id", "name"]
    empty = CsvParser()
    assert list(empty.feed(b"")) == []
    assert list(empty.feed(b"", final=True)) == []
    assert empty.header is None


def test_bom_is_removed_even_when_split() -> None:
    data = BOM + b"id,name\n1,x\n"
    for cut in range(len(BOM) + 1):
        parser = CsvParser()
        out = list(parser.feed(data[:cut])) + list(parser.feed(data[cut:], final=True))
        assert parser.header == ["id", "name"]
        assert out == [(2, b'{"id":1,"name":"x"}')]


def test_invalid_utf8_is_rejected() -> None:
    parser = CsvParser()
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        list(parser.feed(b"id\n1\n\xff\xfe\n", final=True))


def test_truncated_utf8_at_the_end_is_rejected() -> None:
    parser = CsvParser()
    assert list(parser.feed(b"id\n1\n\xe6\x97")) == []
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        list(parser.feed(b"", final=True))


# -- typing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("false", False),
        ("True", "True"),
        ("FALSE", "FALSE"),
        ("null", "null"),
        ("42", 42),
        ("-7", -7),
        ("0", 0),
        ("-0", 0),
        ("12.5", 12.5),
        ("-0.25", -0.25),
        ("1e3", 1000.0),
        ("2E-2", 0.02),
        ("007", "007"),
        ("00.5", "00.5"),
        ("+5", "+5"),
        (".5", ".5"),
        ("5.", "5."),
        ("-", "-"),
        ("1-2", "1-2"),
        ("12abc", "12abc"),
        ("0x10", "0x10"),
        ("1e400", "1e400"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        (" 42", " 42"),
        ("[1, 2]", [1, 2]),
        ('["a", {"b": null}]', ["a", {"b": None}]),
        ('{"a": [1, true]}', {"a": [1, True]}),
        ("{}", {}),
        ("[]", []),
        ("[1, 2", "[1, 2"),
        ("{oops}", "{oops}"),
        ('"quoted"', '"quoted"'),
        ("hello", "hello"),
        ("é", "é"),
        # Integers beyond 64 bits stay exact, as text.
        ("18446744073709551615", 2**64 - 1),
        ("18446744073709551616", "18446744073709551616"),
        ("-9223372036854775809", "-9223372036854775809"),
    ],
)
def test_convert(text: str, value: Any) -> None:
    converted = convert(text, DEPTH)
    assert converted == value
    assert type(converted) is type(value)


@pytest.mark.parametrize(
    "text",
    ["[" * (DEPTH + 1) + "]" * (DEPTH + 1), '{"a": 18446744073709551616}', "[" * 300 + "]" * 300],
)
def test_convert_refuses_json_beyond_the_limits(text: str) -> None:
    with pytest.raises(jsoninput.Refused):
        convert(text, DEPTH)


@pytest.mark.parametrize("chunk", [1 << 20, 4096])
def test_a_field_over_the_csv_limit_names_its_line(chunk: int) -> None:
    data = b"id,v\n1,a\n2,b\n3," + b"x" * (csvload.MAX_FIELD_CHARS + 1) + b"\n4,d\n"
    parser = CsvParser()
    rows: list[int] = []
    with pytest.raises(InvalidArgument) as caught:
        for start in range(0, len(data), chunk):
            rows.extend(line for line, _ in parser.feed(data[start : start + chunk]))
        rows.extend(line for line, _ in parser.feed(b"", final=True))
    assert "line 4 has a field longer than 131072 characters" in caught.value.message
    assert all(line < 4 for line in rows)
