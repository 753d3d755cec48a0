"""Crash-safe file writes and bounded reads of regular files, for every file the tools
write or read.

Invariants:
* a file the tools write is either absent, its old content, or its complete new
  content - never half-written: data goes to a temporary file in the same directory,
  which is fsync'd, renamed over the target, fsync'd again under its new name and the
  directory is fsync'd - one mechanism, `replacing`, for whole contents
  (`atomic_write`) and streamed ones; when it returns, the new content survives a
  power cut on ext4 and on vfat alike (tools/powercut replays every cut of it);
* a write goes to the file a path *names*: a symlink is resolved first and its target
  is replaced, the link itself is kept (as `grub-editenv` does), so the file another
  program reads through the link is the file we wrote;
* `read_regular` never blocks on a FIFO or device and never reads more than its limit:
  anything that is not a regular file is an `OSError` before a byte is read;
  `open_regular` makes the same check for a caller that streams a large file itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def file_kind(mode: int) -> str:
    """What an `st_mode` is, for messages: "a regular file", "a FIFO", "a directory"..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return _KINDS.get(stat.S_IFMT(mode), "not a file")


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


def write_target(path: Path) -> Path:
    """The file a write to `path` must replace: `path` itself, or where its symlinks
    lead (the link is kept; a dangling link's target is created). Raises OSError for
    a symlink loop."""
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=True))  # ELOOP for a loop
    except FileNotFoundError:  # a dangling link: its target is created
        return Path(os.path.realpath(path))


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


@contextlib.contextmanager
def replacing(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Replace the file `path` names (see `write_target`) with what the `with` block
    writes to the yielded temporary file - by `write()`, or on its descriptor (e.g.
    `os.ftruncate` to make a sparse disk image, then `os.pwrite` of its tables).

    The streaming form of `atomic_write`, with the same guarantees: when the block ends,
    the file is flushed, fsync'd, given `mode`, renamed over the target and the directory
    fsync'd; when the block (or any of that) raises, the temporary file is removed and
    the target is unchanged. Raises OSError."""
    path = write_target(path)
    with temp_file(path.parent, prefix=f".{path.name}.") as (f, tmp):
        yield f
        f.flush()
        os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        # The file again, now under its new name: on vfat (the ESP holding a grubenv)
        # the directory entry of the new name is the file's inode, written back with the
        # file only - the directory's fsync makes the temp name's removal durable and
        # leaves the old name pointing at the old, already freed, clusters until the
        # kernel's writeback (~30 s). On ext4 this commits the rename a little earlier.
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | Iterable[bytes], mode: int = 0o644) -> None:
    """Write `data` (bytes, or chunks streamed in order) to the file `path` names (see
    `write_target`): temp file + fsync + rename + fsync of the directory (`replacing`).
    Raises OSError; the file is then unchanged."""
    with replacing(path, mode) as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            for chunk in data:
                f.write(chunk)


def _open_regular_fd(path: Path) -> int:
    """A descriptor open for reading on `path`, if it is a regular file: opened
    non-blocking so a FIFO cannot hang the caller in open(2), checked on the descriptor
    (no race with a rename). EINVAL "not a regular file (a FIFO)" otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = file_kind(st.st_mode)
            raise OSError(errno.EINVAL, f"not a regular file ({kind})", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path) -> BinaryIO:
    """The regular file `path`, open for reading (buffered, binary), for callers that
    stream it; the same OSErrors as `read_regular` except EFBIG (the caller bounds its
    reads). A regular file never blocks, so O_NONBLOCK is cleared again."""
    fd = _open_regular_fd(path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int) -> bytes:
    """The content of the regular file `path`, at most `limit` bytes.

    Raises OSError: the usual ones (ENOENT, EACCES...), EINVAL "not a regular file
    (a FIFO)" for anything but a regular file - checked on the open descriptor, opened
    non-blocking so a FIFO cannot hang the caller - and EFBIG when the file holds more
    than `limit` bytes. Callers map OSError to their own error with `err.strerror`.
    """
    fd = _open_regular_fd(path)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return b"".join(chunks)
