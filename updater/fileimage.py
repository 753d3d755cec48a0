"""Write one image into a file of the inactive slot (a `FileTarget`: a UKI on the ESP):
stream -> decompress -> hash -> temp file -> fsync -> rename -> read back and verify.

The file counterpart of `updater.install.write_image`, with the same checks: the
stream is untrusted until exhausted (length and hashes checked by the repository), the
raw bytes must be exactly `raw_length` long and hash to `raw_sha256`, and what is read
back from the file afterwards (page cache dropped) must hash to it too.

Invariants:
- The file is replaced whole (`core.fsutil.replacing`): until the rename the old file
  is untouched, and a stream that is too long, too short or hashes wrong never reaches
  the file's name. A slot's boot entry file keeps its current name, so its boot counter
  (its state, `updater.boot.sdboot`) is what the agent set before writing: BAD, or
  `+0-0` for a file that did not exist.
- `FileGuard` refuses a target of the booted slot, and any destination that is (by path
  or by inode) one of the booted slot's files - the booted slot's UKI is never replaced.
- Memory is bounded by one block (`install.BLOCK_SIZE`) and the decoder's window.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

from core.decompress import ChunkSource, raw_blocks
from core.errors import SlotGuardError
from core.fsutil import makedirs_durable, open_regular, replacing
from updater.boot.sdboot import current_entry_file
from updater.install import (
    BLOCK_SIZE,
    PROGRESS_INTERVAL,
    ImageRejected,
    Progress,
    ReadBackMismatch,
    WriteFailed,
    WriteResult,
    check_image,
)
from updater.slots import FileTarget


def resolve(target: FileTarget) -> Path:
    """The file `target` names now (a boot entry: under its current counter)."""
    if target.entry:
        return current_entry_file(target.root, target.path)
    return target.root / target.path


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SlotGuardError(f"cannot check {path}: {err.strerror}") from err
    return (st.st_dev, st.st_ino)


class FileGuard:
    """Refuses a file target that is, or is the same file as, one of the booted slot's."""

    def __init__(self, booted_slot: str, booted: Iterable[FileTarget]) -> None:
        self.booted_slot = booted_slot
        self._paths: list[tuple[FileTarget, Path, tuple[int, int] | None]] = []
        for target in booted:
            path = Path(os.path.realpath(resolve(target)))
            self._paths.append((target, path, _identity(path)))

    def check(self, target: FileTarget, destination: Path) -> None:
        if target.slot == self.booted_slot:
            raise SlotGuardError(
                f"refusing to write {target.describe()}: slot {target.slot} is the booted slot"
            )
        real = Path(os.path.realpath(destination))
        ident = _identity(real)
        for booted, path, booted_ident in self._paths:
            # FAT compares names case-insensitively: so does this check.
            if str(real).casefold() == str(path).casefold() or (
                ident is not None and ident == booted_ident
            ):
                raise SlotGuardError(
                    f"refusing to write {target.describe()}: it is the booted {booted.describe()}"
                )


def write_file_image(
    chunks: Iterable[bytes],
    target: FileTarget,
    *,
    compression: str,
    raw_length: int,
    raw_sha256: str,
    guard: FileGuard,
    progress: Progress | None = None,
) -> WriteResult:
    """Stream one (compressed) image into the file `target`, then read it back and verify."""
    raw_sha256 = raw_sha256.lower()
    check_image(target, compression, raw_length, raw_sha256)
    started = time.monotonic()
    destination = resolve(target)
    guard.check(target, destination)
    what = f"image for {target.describe()}"
    source = ChunkSource(chunks)
    digest = hashlib.sha256()
    done = 0
    try:
        makedirs_durable(destination.parent)
        with replacing(destination) as f:
            last = time.monotonic()
            if progress is not None:
                progress(0, raw_length)
            # Exactly raw_length bytes or RawLengthMismatch (an over-long stream is
            # noticed one byte past the end, never inflated further).
            for block in raw_blocks(source, compression, raw_length, what, BLOCK_SIZE):
                digest.update(block)
                f.write(block)
                done += len(block)
                if progress is not None and time.monotonic() - last >= PROGRESS_INTERVAL:
                    progress(done, raw_length)
                    last = time.monotonic()
            if digest.hexdigest() != raw_sha256:
                raise ImageRejected(
                    f"{what}: raw sha256 {digest.hexdigest()}, expected {raw_sha256}"
                )
    except OSError as err:
        raise WriteFailed(f"writing {target.describe()}: {err.strerror or err}") from err
    finally:
        source.close()
    written = time.monotonic()
    read_back_verify_file(target, raw_length, raw_sha256)
    finished = time.monotonic()
    if progress is not None:
        progress(done, raw_length)
    return WriteResult(
        bytes_written=done,
        raw_sha256=raw_sha256,
        compressed_bytes=source.consumed,
        seconds=finished - started,
        write_seconds=written - started,
        verify_seconds=finished - written,
    )


def read_back_verify_file(target: FileTarget, raw_length: int, raw_sha256: str) -> None:
    """Check that the file `target` names holds exactly `raw_length` bytes hashing to
    `raw_sha256`, read from the device (its cached pages dropped first)."""
    path = resolve(target)
    digest = hashlib.sha256()
    size = 0
    try:
        with open_regular(path) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while block := f.read(min(BLOCK_SIZE, raw_length + 1 - size)):
                digest.update(block)
                size += len(block)
                if size > raw_length:
                    break
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as err:
        raise WriteFailed(f"reading back {target.describe()}: {err.strerror or err}") from err
    if size != raw_length or digest.hexdigest() != raw_sha256.lower():
        held = f"{size} bytes" if size <= raw_length else f"more than {raw_length} bytes"
        raise ReadBackMismatch(
            f"{target.describe()} holds {held} with sha256 {digest.hexdigest()},"
            f" expected {raw_length} bytes with sha256 {raw_sha256.lower()}"
        )


__all__ = ["FileGuard", "read_back_verify_file", "resolve", "write_file_image"]
