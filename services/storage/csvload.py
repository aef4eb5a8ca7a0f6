"""Bulk CSV load: rows parsed incrementally from streamed chunks and committed in batches,
so memory stays bounded whatever the file size.

Typing of fields (as Harper's CSV loads do): an empty field leaves the attribute out;
``true``/``false`` become booleans; text that parses as a JSON number becomes a number
(an integer outside the 64-bit range stays a string, which keeps it exact); text
starting with ``{`` or ``[`` that parses as JSON becomes that object or array, held to
the nesting limit (a row nesting deeper fails); everything else stays a string.

A field longer than ``MAX_FIELD_CHARS`` stops the load with INVALID_ARGUMENT naming its
line (the csv module cannot find where its row ends, so no later row can be read); as
with any error that stops a load, only batches committed before it stay.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common import jsoninput
from services.common.errors import InvalidArgument

MAX_ERRORS = 100
BATCH_ROWS = 1000
MAX_FIELD_CHARS = csv.field_size_limit()  # 131,072 (the csv module's limit)


def convert(text: str, max_depth: int) -> Any:
    """Typed value of one CSV field (see the module docstring); jsoninput.Refused for
    an object or array beyond the limits (``max_depth`` levels, 64-bit integers)."""
    if text == "true":
        return True
    if text == "false":
        return False
    if text[:1] in "-0123456789":
        try:
            number = jsoninput.loads(text, 0)
        except jsoninput.Refused:  # not a number, or an integer beyond 64 bits
            return text
        if isinstance(number, int | float) and not isinstance(number, bool):
            return number
        return text
    if text[:1] in "{[":
        try:
            return jsoninput.loads(text, max_depth)
        except jsoninput.NotJson:
            return text
    return text


@dataclass
class RowIssue:
    """A row that failed."""

    line: int
    message: str


@dataclass
class CsvParser:
    """Feeds chunks in, yields (line number, JSON record) out."""

    max_depth: int = jsoninput.DEFAULT_NESTING_DEPTH  # of a record (storage.maxNestingDepth)
    header: list[str] | None = None
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=codecs.getincrementaldecoder("utf-8-sig")
    )
    _pending: str = ""
    _line: int = 0  # first line of the current row (1-based; the header is line 1)
    _lines: int = 0  # lines of the file in rows already parsed
    issues: list[RowIssue] = field(default_factory=list)
    failed: int = 0

    def feed(self, chunk: bytes, final: bool = False) -> Iterator[tuple[int, bytes]]:
        try:
            text = self._pending + self._decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"the CSV is not valid UTF-8 near line {self._lines + 1}"
            ) from exc
        self._pending = ""
        if not text:
            return
        # ``text`` starts at a row boundary. The csv module itself finds where rows end (a
        # quote opens a quoted field only at the start of a field), and every row but the
        # last is complete; unless this is the final chunk, the last row waits for more text.
        source = io.StringIO(text, newline="")
        reader = csv.reader(source)
        held: tuple[list[str], int, int] | None = None  # (row, offset in text, its lines)
        offset = 0
        lines = 0
        for row in _rows(reader, self._lines + 1):
            if held is not None:
                yield from self._take(held[0], held[2])
            held = (row, offset, reader.line_num - lines)
            offset = source.tell()
            lines = reader.line_num
        if held is None:
            return
        if final:
            yield from self._take(held[0], held[2])
        else:
            self._pending = text[held[1] :]

    def _take(self, row: list[str], row_lines: int) -> Iterator[tuple[int, bytes]]:
        self._line = self._lines + 1  # the row's first line in the file
        self._lines += row_lines
        if self.header is None:
            self._start(row)
            return
        if not row or row == [""]:
            return
        if len(row) != len(self.header):
            self._issue(f"has {len(row)} fields, the header has {len(self.header)}")
            return
        try:
            doc = {
                name: convert(value, self.max_depth)
                for name, value in zip(self.header, row, strict=True)
                if value != ""
            }
        except jsoninput.Refused as exc:
            self._issue(f"has a field that is refused: {exc}")
            return
        # Each value is within the limit; the record, one level more, is checked with
        # every other record (transaction.parse_record).
        yield self._line, orjson.dumps(doc)

    def _start(self, row: list[str]) -> None:
        names = [n.strip() for n in row]
        if not names or any(not n for n in names):
            raise InvalidArgument("the CSV header row must name every column")
        if len(set(names)) != len(names):
            raise InvalidArgument("the CSV header row names a column twice")
        self.header = names

    def _issue(self, message: str, line: int | None = None) -> None:
        self.failed += 1
        if len(self.issues) < MAX_ERRORS:
            at = line or self._line
            # "line 3 has 2 fields", but "line 3: Value "x" in property ..." (a sentence)
            joined = f"line {at} {message}" if message[:1].islower() else f"line {at}: {message}"
            self.issues.append(RowIssue(at, joined))

    def row_failed(self, line: int, message: str) -> None:
        self._issue(message, line)


def _rows(reader: Any, first_line: int) -> Iterator[list[str]]:
    """The rows of a csv reader; INVALID_ARGUMENT naming the line for what it refuses (a
    field longer than MAX_FIELD_CHARS)."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = first_line + reader.line_num - 1
            if "field larger than field limit" in str(exc):
                raise InvalidArgument(
                    f"line {line} has a field longer than {MAX_FIELD_CHARS} characters (the"
                    " CSV field limit); the load stopped there: only batches committed"
                    " before it stay"
                ) from None
            raise InvalidArgument(f"the CSV cannot be read at line {line}: {exc}") from None
        yield row
