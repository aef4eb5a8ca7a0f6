"""Reading and writing tar archives without trusting them.

An archive received from outside (a backup being restored) is read member by member
with a minimal ustar reader instead of ``tarfile``: every header is checked before any
of its content is read, and nothing is ever extracted to the file system. A member is
accepted only when

  * its name is a relative path without ``..``, backslashes or NUL bytes, and matches
    one of the caller's rules (anything else is an unknown member);
  * it is a regular file: symbolic and hard links, devices, FIFOs, directories and tar
    extension headers (pax, GNU long names, sparse files) are refused;
  * its size is within the limit of its rule.

A refusal is INVALID_ARGUMENT with a message naming the member and the problem. Memory
stays bounded: a member is read in full only up to its rule's limit, and only when the
caller asks for it.

Writing uses plain ustar headers (``tarfile.TarInfo.tobuf``), so every archive Shoal
writes is one this reader accepts.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from services.common.errors import InvalidArgument

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_KINDS = {
    b"0": "file",
    b"\x00": "file",
    b"7": "file",  # contiguous file: a regular file for every reader
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"x": "pax extension header",
    b"g": "pax global header",
    b"L": "GNU long name header",
    b"K": "GNU long link header",
    b"S": "GNU sparse file",
}
_DRIVE = re.compile(r"^[A-Za-z]:")
# A plain file name: no folders, no leading dot (hidden, and never "." or "..").
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class MemberRule:
    """Names a member may have (a regular expression matched in full) and its size limit."""

    pattern: str
    max_bytes: int
    description: str

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class MemberHeader:
    """The parts of a tar header that decide whether a member is acceptable."""

    name: str
    size: int
    kind: str  # "file", "directory", "symbolic link", ... (see _KINDS)
    linkname: str = ""


def file_name(name: str, what: str) -> str:
    """Validate a plain file name (a backup's name): INVALID_ARGUMENT naming the problem."""
    if not isinstance(name, str) or not _FILE_NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid {what} {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . -, not"
            " starting with '.' or '-', without '..' or '/'"
        )
    return name


def _problem(header: MemberHeader) -> str | None:
    """Why a member's name or type is unacceptable, whatever the rules."""
    name = header.name
    if not name:
        return "has an empty name"
    if "\x00" in name or "\\" in name:
        return "has a NUL byte or a backslash in its name"
    if name.startswith("/") or _DRIVE.match(name):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "climbs out of the archive with '..'"
    if header.kind == "symbolic link":
        return f"is a symbolic link (to {header.linkname!r})"
    if header.kind == "hard link":
        return f"is a hard link (to {header.linkname!r})"
    if header.kind != "file":
        return f"is a {header.kind}, not a regular file"
    return None


def check_member(header: MemberHeader, rules: Sequence[MemberRule]) -> MemberRule:
    """The rule a member satisfies; INVALID_ARGUMENT naming the member otherwise."""
    problem = _problem(header)
    if problem is None:
        rule = next((r for r in rules if r.matches(header.name)), None)
        if rule is None:
            expected = ", ".join(r.description for r in rules)
            problem = f"is not part of this kind of archive (expected {expected})"
        elif header.size > rule.max_bytes:
            problem = f"is {header.size} bytes; at most {rule.max_bytes} are allowed"
        else:
            return rule
    raise InvalidArgument(f"archive member {header.name!r} {problem}")


def _field(block: bytes, start: int, end: int) -> bytes:
    return block[start:end].split(b"\x00", 1)[0]


def _number(block: bytes, start: int, end: int, what: str) -> int:
    raw = block[start:end]
    if raw and raw[0] & 0x80:  # base-256 (GNU): only for sizes beyond 8 GiB
        return int.from_bytes(raw[1:], "big") if raw[0] == 0x80 else -1
    text = _field(block, start, end).strip(b" \x00")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidArgument(f"the archive has a corrupt tar header ({what} {text!r})") from None


def parse_header(block: bytes) -> MemberHeader | None:
    """A member's header from a 512-byte block; None for an end-of-archive block."""
    if len(block) < BLOCK:
        raise InvalidArgument("the archive ends in the middle of a tar header")
    if block == _ZERO_BLOCK:
        return None
    stored = _number(block, 148, 156, "checksum")
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:BLOCK])
    if stored != computed:
        raise InvalidArgument("the archive is not a tar file (a header's checksum is wrong)")
    name = _field(block, 0, 100)
    if block[257:262] == b"ustar":
        prefix = _field(block, 345, 500)
        if prefix:
            name = prefix + b"/" + name
    size = _number(block, 124, 136, "size")
    if size < 0:
        raise InvalidArgument("the archive has a corrupt tar header (negative size)")
    typeflag = block[156:157]
    return MemberHeader(
        name=name.decode("utf-8", errors="replace"),
        size=size,
        kind=_KINDS.get(typeflag, f"member of unknown type {typeflag!r}"),
        linkname=_field(block, 157, 257).decode("utf-8", errors="replace"),
    )


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        part = stream.read(min(remaining, 1024 * 1024))
        if not part:
            raise InvalidArgument("the archive ends in the middle of a member")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


@dataclass(frozen=True)
class Member:
    """An accepted member and its content."""

    name: str
    rule: MemberRule
    data: bytes


def read_members(stream: BinaryIO, rules: Sequence[MemberRule]) -> Iterator[Member]:
    """Every member of an uncompressed tar stream, each checked before its content is read.

    Stops at the end-of-archive block; a stream that ends without one is refused.
    """
    while True:
        header = parse_header(stream.read(BLOCK))
        if header is None:
            return
        rule = check_member(header, rules)
        data = _read_exactly(stream, header.size)
        padding = -header.size % BLOCK
        if padding:
            _read_exactly(stream, padding)
        yield Member(header.name, rule, data)


def member_bytes(name: str, data: bytes, mtime: int) -> bytes:
    """One regular-file member (ustar header, content, padding) as written by Shoal."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = mtime
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % BLOCK)


def end_of_archive() -> bytes:
    """The two zero blocks that end a tar archive."""
    return _ZERO_BLOCK * 2
