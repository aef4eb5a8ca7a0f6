"""The tar member validator and reader: every hostile member is refused by name, before
any of its content is read."""

from __future__ import annotations

import io
import re
import tarfile

import pytest

from services.common.archive import (
    MemberHeader,
    MemberRule,
    check_member,
    end_of_archive,
    file_name,
    member_bytes,
    parse_header,
    read_members,
)
from services.common.errors import InvalidArgument

RULES = (
    MemberRule(r"manifest\.json", 1024, "manifest.json"),
    MemberRule(r"rows/[0-9]{8}\.pb", 4096, "rows/NNNNNNNN.pb"),
)


def refused(header: MemberHeader, *words: str) -> str:
    with pytest.raises(InvalidArgument) as caught:
        check_member(header, RULES)
    message = caught.value.message
    assert f"archive member {header.name!r}" in message
    for word in words:
        assert word in message, message
    return message


def test_a_member_matching_a_rule_within_its_size_is_accepted() -> None:
    rule = check_member(MemberHeader("rows/00000001.pb", 4096, "file"), RULES)
    assert rule.description == "rows/NNNNNNNN.pb"
    assert check_member(MemberHeader("manifest.json", 0, "file"), RULES) is RULES[0]


@pytest.mark.parametrize(
    "name",
    ["../manifest.json", "rows/../../etc/passwd", "rows/00000001.pb/..", ".."],
)
def test_dot_dot_anywhere_is_refused(name: str) -> None:
    refused(MemberHeader(name, 1, "file"), "climbs out")


@pytest.mark.parametrize("name", ["/etc/passwd", "/manifest.json", "C:/x", "c:manifest.json"])
def test_absolute_paths_are_refused(name: str) -> None:
    refused(MemberHeader(name, 1, "file"), "absolute path")


@pytest.mark.parametrize("name", ["rows\\00000001.pb", "manifest.json\x00.txt"])
def test_backslashes_and_nul_bytes_are_refused(name: str) -> None:
    refused(MemberHeader(name, 1, "file"), "NUL byte or a backslash")


def test_links_are_refused_and_their_target_is_named() -> None:
    refused(MemberHeader("rows/00000001.pb", 0, "symbolic link", "/etc/shadow"), "'/etc/shadow'")
    refused(MemberHeader("manifest.json", 0, "hard link", "rows/1"), "hard link", "'rows/1'")


@pytest.mark.parametrize(
    "kind",
    [
        "character device",
        "block device",
        "FIFO",
        "directory",
        "pax extension header",
        "GNU long name header",
        "GNU sparse file",
    ],
)
def test_anything_but_a_regular_file_is_refused(kind: str) -> None:
    refused(MemberHeader("rows/00000001.pb", 0, kind), kind, "not a regular file")


def test_unknown_and_oversized_members_are_refused() -> None:
    message = refused(MemberHeader("notes.txt", 1, "file"), "not part of")
    assert "manifest.json, rows/NNNNNNNN.pb" in message
    refused(MemberHeader("rows/1.pb", 1, "file"), "not part of")
    refused(MemberHeader("", 1, "file"), "empty name")
    refused(MemberHeader("rows/00000001.pb", 4097, "file"), "4097 bytes", "at most 4096")


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _info(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def test_headers_written_by_tarfile_parse_to_the_right_kind() -> None:
    cases = {
        tarfile.REGTYPE: "file",
        tarfile.SYMTYPE: "symbolic link",
        tarfile.LNKTYPE: "hard link",
        tarfile.CHRTYPE: "character device",
        tarfile.BLKTYPE: "block device",
        tarfile.FIFOTYPE: "FIFO",
        tarfile.DIRTYPE: "directory",
    }
    for kind, expected in cases.items():
        raw = _tar(_info("rows/00000001.pb", b"", kind, "target"))
        header = parse_header(raw[:512])
        assert header is not None and header.kind == expected
        if expected.endswith("link"):
            assert header.linkname == "target"
    long_name = "rows/" + "d" * 120 + "/00000001.pb"  # uses the ustar prefix field
    header = parse_header(_tar(_info(long_name, b"x"))[:512])
    assert header is not None and header.name == long_name and header.size == 1


def test_read_members_yields_accepted_members_and_stops_at_the_first_bad_one() -> None:
    good = member_bytes("manifest.json", b"{}", 0) + member_bytes("rows/00000001.pb", b"r" * 700, 0)
    members = list(read_members(io.BytesIO(good + end_of_archive()), RULES))
    assert [(m.name, len(m.data)) for m in members] == [
        ("manifest.json", 2),
        ("rows/00000001.pb", 700),
    ]
    evil = _tar(_info("../evil", b"x"))
    reader = read_members(io.BytesIO(good + evil), RULES)
    assert next(reader).name == "manifest.json"
    assert next(reader).name == "rows/00000001.pb"
    with pytest.raises(InvalidArgument, match=re.escape("'../evil' climbs out")):
        next(reader)


def test_an_oversized_member_is_refused_from_its_header_alone() -> None:
    info = tarfile.TarInfo("rows/00000001.pb")
    info.size = 10**12  # no content follows: it must never be read
    stream = io.BytesIO(info.tobuf(tarfile.GNU_FORMAT))
    with pytest.raises(InvalidArgument, match="at most 4096"):
        list(read_members(stream, RULES))


def test_corrupt_and_truncated_archives_are_refused() -> None:
    raw = bytearray(member_bytes("manifest.json", b"{}", 0))
    raw[0] ^= 0xFF
    with pytest.raises(InvalidArgument, match="checksum"):
        list(read_members(io.BytesIO(bytes(raw)), RULES))
    with pytest.raises(InvalidArgument, match="middle of a tar header"):
        list(read_members(io.BytesIO(b"short"), RULES))
    truncated = member_bytes("rows/00000001.pb", b"r" * 1000, 0)[:700]
    with pytest.raises(InvalidArgument, match="middle of a member"):
        list(read_members(io.BytesIO(truncated), RULES))


@pytest.mark.parametrize("name", ["nightly", "dev-2024.01.01", "a_b", "X" * 128])
def test_plain_file_names_are_accepted(name: str) -> None:
    assert file_name(name, "backup name") == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "..", "a/b", "../a", "a..b", "-x", "a b", "é", "X" * 129, "/abs"]
)
def test_other_file_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid backup name"):
        file_name(name, "backup name")
