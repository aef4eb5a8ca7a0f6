"""The admin side of CSV loads: text split into bounded chunks, and which files a
csv_file_load may read."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.admin import csvload
from services.common.errors import InvalidArgument, NotFound


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


NOBODY = 65534  # the unprivileged user and group of Linux distributions


def _unprivileged(action: Callable[[], object]) -> str:
    """Run ``action`` as a user without the right to read other users' files, and say
    how it ended: ``"ok"`` or ``"<exception class>: <message>"``.

    Root reads every file whatever its mode, and CI runs as root: there the action runs
    in a forked child that has dropped to ``nobody`` first (the modules it needs are
    already loaded, so the child reads nothing but the file under test). Other users run
    it in place."""

    def outcome() -> str:
        try:
            action()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    if os.geteuid() != 0:
        return outcome()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, report, and leave at once
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write_end, outcome().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return said


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder any user may enter (pytest's own are closed to other users)."""
    folder = Path(tempfile.mkdtemp(prefix="csvload-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_an_unreadable_file_is_permission_denied(open_folder: Path) -> None:
    path = open_folder / "secret.csv"
    path.write_text("id\n1\n")
    path.chmod(0o644)

    def load() -> object:
        with csvload.open_csv_file(str(path)) as file:
            return file.read()

    assert _unprivileged(load) == "ok"  # the same user may read it once its mode allows
    path.chmod(0)
    said = _unprivileged(load)
    assert said.startswith("PermissionDenied: "), said
    assert "may not read" in said
