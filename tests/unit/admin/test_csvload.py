"""The admin side of CSV loads: text split into bounded chunks, and which files a
csv_file_load may read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.admin import csvload
from services.common.errors import InvalidArgument, NotFound, PermissionDenied


@given(st.text(max_size=200), st.integers(1, 17))
def test_text_chunks_are_bounded_and_join_to_the_text(text: str, size: int) -> None:
    chunks = list(csvload.text_chunks(text, size))
    assert b"".join(chunks) == text.encode()
    assert all(0 < len(c) <= 4 * size for c in chunks)


def test_a_regular_file_opens(tmp_path: Path) -> None:
    path = tmp_path / "dogs.csv"
    path.write_bytes(b"id\n1\n")
    with csvload.open_csv_file(str(path)) as file:
        assert file.read() == b"id\n1\n"


def test_files_that_cannot_be_loaded_are_refused_clearly(tmp_path: Path) -> None:
    cases: list[tuple[str, type[Exception], str]] = [
        (str(tmp_path / "missing.csv"), NotFound, "no file"),
        (str(tmp_path / "missing" / "dogs.csv"), NotFound, "no file"),
        (str(tmp_path), InvalidArgument, "is a directory"),
        ("dogs.csv", InvalidArgument, "absolute path"),
        ("", InvalidArgument, "must not be empty"),
    ]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases.append((str(fifo), InvalidArgument, "not a regular file"))  # and opening does not block
    file = tmp_path / "file"
    file.write_text("id\n")
    cases.append((str(file / "below"), NotFound, "no file"))
    for path, error, words in cases:
        with pytest.raises(error) as raised:
            csvload.open_csv_file(path)
        assert words in str(raised.value), path


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_file_is_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.csv"
    path.write_text("id\n1\n")
    path.chmod(0)
    with pytest.raises(PermissionDenied, match="may not read"):
        csvload.open_csv_file(str(path))
