"""Crash-safe file writes, for every file the project's tools write.

Invariant: a file the tools write is either absent, its old content, or its complete
new content - never half-written: data goes to a temporary file in the same directory,
which is fsync'd, renamed over the target, and the directory is fsync'd.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    """Make a rename or a new directory entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """Create `path` and missing parents, fsyncing each parent that got a new entry."""
    missing: list[Path] = []
    cur = path
    while not cur.exists():
        missing.append(cur)
        cur = cur.parent
    for p in reversed(missing):
        p.mkdir()
        fsync_dir(p.parent)


@contextlib.contextmanager
def temp_file(directory: Path, prefix: str = ".tmp-") -> Iterator[tuple[IO[bytes], Path]]:
    """A temporary file in `directory`, removed on error or if the caller did not move it."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def atomic_write(path: Path, data: bytes | Iterable[bytes], mode: int = 0o644) -> None:
    """Write `data` (bytes, or chunks streamed in order) to `path`: temp file + fsync +
    rename + fsync of the directory. Raises OSError; `path` is then unchanged."""
    with temp_file(path.parent, prefix=f".{path.name}.") as (f, tmp):
        if isinstance(data, bytes):
            f.write(data)
        else:
            for chunk in data:
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    fsync_dir(path.parent)
