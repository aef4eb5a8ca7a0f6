"""Bulk CSV load: rows parsed incrementally from streamed chunks and committed in batches,
so memory stays bounded whatever the file size.

Typing of fields (as Harper's CSV loads do): an empty field leaves the attribute out;
``true``/``false`` become booleans; text that parses as a JSON number becomes a number;
text starting with ``{`` or ``[`` that parses as JSON becomes that object or array;
everything else stays a string.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common.errors import InvalidArgument

MAX_ERRORS = 100
BATCH_ROWS = 1000


def convert(text: str) -> Any:
    """Typed value of one CSV field (see the module docstring)."""
    if text == "true":
        return True
    if text == "false":
        return False
    if text[:1] in "-0123456789":
        try:
            number = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
        if isinstance(number, int | float) and not isinstance(number, bool):
            return number
        return text
    if text[:1] in "{[":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
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

    header: list[str] | None = None
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=codecs.getincrementaldecoder("utf-8-sig")
    )
    _pending: str = ""
    _line: int = 0
    issues: list[RowIssue] = field(default_factory=list)
    failed: int = 0

    def feed(self, chunk: bytes, final: bool = False) -> Iterator[tuple[int, bytes]]:
        try:
            text = self._pending + self._decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"the CSV is not valid UTF-8 near line {self._line + 1}") from exc
        if not final:
            # Keep the tail after the last newline outside quotes for the next chunk.
            cut = _last_complete(text)
            self._pending = text[cut:]
            text = text[:cut]
        else:
            self._pending = ""
        if not text:
            return
        for row in csv.reader(io.StringIO(text, newline="")):
            self._line += 1
            if self.header is None:
                self._start(row)
                continue
            if not row or row == [""]:
                continue
            if len(row) != len(self.header):
                self._issue(f"has {len(row)} fields, the header has {len(self.header)}")
                continue
            doc = {
                name: convert(value)
                for name, value in zip(self.header, row, strict=True)
                if value != ""
            }
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
            self.issues.append(RowIssue(line or self._line, f"line {line or self._line} {message}"))

    def row_failed(self, line: int, message: str) -> None:
        self._issue(message, line)


def _last_complete(text: str) -> int:
    """Index just after the last newline that is not inside a quoted field.

    ``text`` starts at a row boundary, so a newline is outside quotes exactly when the
    number of quote characters before it is even (an escaped quote "" counts twice).
    """
    end = len(text)
    while True:
        i = text.rfind("\n", 0, end)
        if i < 0:
            return 0
        if text.count('"', 0, i) % 2 == 0:
            return i + 1
        end = i
