"""fsutil.open_regular: the streaming twin of read_regular - a regular file opens
(blocking, readable in pieces), anything else is an OSError before a byte is read."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from core.fsutil import open_regular, read_regular
from tests.bounded import fifo, within


def test_a_regular_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"0123456789")
    with open_regular(path) as f:
        assert os.get_blocking(f.fileno())
        f.seek(4)
        assert f.read(3) == b"456" and f.read() == b"789"


@pytest.mark.parametrize("kind", ["FIFO", "directory", "character device"])
def test_anything_else_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    with fifo(tmp_path / "fifo") as pipe:
        path = {"FIFO": pipe, "directory": tmp_path, "character device": Path("/dev/null")}[kind]
        for call in (lambda: open_regular(path), lambda: read_regular(path, 10)):
            with pytest.raises(OSError) as info:
                within(call)
            assert info.value.errno == errno.EINVAL
            assert info.value.strerror == f"not a regular file (a {kind})"


def test_missing_file_is_enoent(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing")
