"""Write one image into a partition of the inactive slot: stream -> decompress -> hash ->
write -> read back behind the writing -> fsync.

Invariants:
- Nothing is opened for writing before `SlotGuard.check` has accepted the target, and
  the descriptor that was opened is checked again (fstat) to be the file or device that
  was checked, so the booted slot cannot be opened for writing through this module.
  The read-back descriptors are checked (fstat) to be that same file or device.
- At most `raw_length` bytes are written, all inside `[target.offset, target.offset +
  raw_length)`; an image larger than the partition is refused before anything is
  opened, and a stream producing more than `raw_length` raw bytes is aborted before the
  excess is written. The rest of the partition (beyond `raw_length`) is left as it was:
  images carry their own filesystem size, and `raw_sha256` covers `raw_length` bytes.
- Defense in depth: every pwrite and every read-back pread is itself checked to lie
  inside `[target.offset, target.offset + target.size)` (`OutOfPartition`), whatever
  the checks before it concluded.
- The input stream is untrusted until its iterator is exhausted without error (the
  repository verifies length and hashes at the end); success is only returned after the
  iterator ended, the raw length and the sha256 of the bytes written matched
  `raw_sha256`, the data was fsync'd, and every block had been read back from the
  device (after its writeback, O_DIRECT or with its cached pages dropped) and found
  equal to the block written (`updater.readback`). The raw image is hashed once, on
  the way in; the read-back proves the device returned exactly those bytes.
  `read_back_verify` (a slot checked again later) hashes what the device returns.
- Memory is bounded by `RING_BLOCKS` blocks (`BLOCK_SIZE`: being decompressed, hashed
  and written, waiting for their writeback and read-back), one read-back block, one
  input chunk and the decoder's window, whatever the image size.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from core.decompress import COMPRESSIONS, ChunkSource, open_raw_reader
from core.errors import SlotGuardError, UpdateRejected
from updater.readback import OutOfPartition as OutOfPartition
from updater.readback import ReadBackMismatch as ReadBackMismatch
from updater.readback import ReadBehind, inside
from updater.readback import WriteFailed as WriteFailed
from updater.slots import PartitionTarget, Target

_inside = inside  # the bounds check of every pwrite and pread (updater.readback)

BLOCK_SIZE = 4 << 20  # one pwrite; large and aligned (partitions start on MiB boundaries)
# In flight: being decompressed, hashed and written, read back. 3 and 6 were within
# the noise of bench/copyfloor.py; 3 keeps the agent's peak RSS 12 MiB lower (issue 11:
# <= 64 MiB; with 6 it was 82-88 MiB), and a fleet of agents in one process far lower.
RING_BLOCKS = 3
PROGRESS_INTERVAL = 0.5  # seconds between progress callbacks
_SECTOR = 512  # sysfs reports partition starts in 512-byte sectors, whatever the device

Progress = Callable[[int, int], None]


class ImageRejected(UpdateRejected):
    """The image stream is bad: too long, too short, wrong raw hash, too big for the slot."""


@dataclass(frozen=True)
class WriteResult:
    """What `write_image` did; `seconds` is the whole call, the others are its parts."""

    bytes_written: int
    raw_sha256: str
    compressed_bytes: int
    seconds: float
    write_seconds: float  # stream, decompress, hash, write and fsync
    verify_seconds: float  # read back and hash


# --- the guard -----------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """A byte range on one underlying object: a regular file or a whole block device."""

    device: tuple[str, int, int]  # ("file", st_dev, st_ino) or ("block", major, minor)
    start: int
    end: int

    def overlaps(self, other: Extent) -> bool:
        return self.device == other.device and self.start < other.end and other.start < self.end


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise SlotGuardError(f"cannot check {path}: {err.strerror}") from err


def _identity(st: os.stat_result) -> tuple[str, int, int]:
    if stat.S_ISBLK(st.st_mode):
        return ("block", os.major(st.st_rdev), os.minor(st.st_rdev))
    return ("file", st.st_dev, st.st_ino)


def resolve_extent(
    path: Path, offset: int, size: int, st: os.stat_result | None = None, _depth: int = 0
) -> Extent:
    """Where `size` bytes at `offset` in `path` really live.

    A partition node becomes its whole disk at the partition's start; a loop device
    becomes its backing file (or device) at the loop offset - both from sysfs, so
    /dev/loop0p2, /dev/loop0 at an offset and the image file behind them all compare
    equal. Unresolvable block devices raise `SlotGuardError` (fail closed). `st` is
    `os.stat(path)` when the caller already has it.
    """
    if st is None:
        st = _stat(path)
    if stat.S_ISREG(st.st_mode):
        return Extent(_identity(st), offset, offset + size)
    if not stat.S_ISBLK(st.st_mode):
        raise SlotGuardError(f"{path} is neither a block device nor a regular file")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    try:
        node = Path(f"/sys/dev/block/{major}:{minor}").resolve(strict=True)
        if (node / "partition").exists():
            offset += int((node / "start").read_text()) * _SECTOR
            node = node.parent
            major, minor = (int(x) for x in (node / "dev").read_text().split(":"))
        backing = node / "loop" / "backing_file"
        if backing.exists() and _depth < 4:
            offset += int((node / "loop" / "offset").read_text())
            backing_path = Path(backing.read_text().strip())
            return resolve_extent(backing_path, offset, size, None, _depth + 1)
    except (OSError, ValueError) as err:
        raise SlotGuardError(f"cannot resolve block device {path} through sysfs: {err}") from err
    return Extent(("block", major, minor), offset, offset + size)


class SlotGuard:
    """Refuses any target that is, or overlaps, a partition of the booted slot."""

    def __init__(self, booted: Iterable[PartitionTarget]) -> None:
        self._booted = tuple(booted)
        if not self._booted:
            raise SlotGuardError("no partition of the booted slot given; refusing to write")
        slots = {t.slot for t in self._booted}
        if len(slots) != 1:
            raise SlotGuardError(f"booted partitions span several slots: {sorted(slots)}")
        self.booted_slot = slots.pop()
        # Resolved once, now: a booted partition that cannot be resolved fails closed.
        self._extents = [(t, resolve_extent(t.path, t.offset, t.size)) for t in self._booted]

    def check(self, target: PartitionTarget, st: os.stat_result | None = None) -> Extent:
        """The resolved extent of `target`, or `SlotGuardError` if it touches the booted slot.

        `st` is the `os.stat` of `target.path` the caller will compare its open descriptor
        with (see `_open_for_writing`), so what was checked is what gets written.
        """
        if target.slot == self.booted_slot:
            raise SlotGuardError(
                f"refusing to write {target.describe()}: slot {target.slot} is the booted slot"
            )
        extent = resolve_extent(target.path, target.offset, target.size, st)
        for booted, booted_extent in self._extents:
            if extent.overlaps(booted_extent):
                raise SlotGuardError(
                    f"refusing to write {target.describe()}: it overlaps the booted "
                    f"{booted.describe()}"
                )
        return extent


def _open_for_writing(guard: SlotGuard, target: PartitionTarget) -> int:
    """A write descriptor on `target`, only after the guard accepted it."""
    before = _stat(target.path)
    guard.check(target, before)
    flags = os.O_WRONLY | os.O_CLOEXEC
    if stat.S_ISBLK(before.st_mode) and target.offset == 0:
        # A partition node that is mounted or otherwise claimed is refused (EBUSY). Not
        # for a whole disk written at an offset: the booted slot's mounted partitions
        # claim the whole disk too, and the guard has already checked the range.
        flags |= os.O_EXCL
    try:
        fd = os.open(target.path, flags)
    except OSError as err:
        raise WriteFailed(f"cannot open {target.describe()} for writing: {err.strerror}") from err
    try:
        if _identity(os.fstat(fd)) != _identity(before):
            raise SlotGuardError(
                f"{target.describe()}: {target.path} was replaced while opening it"
            )
        end = os.lseek(fd, 0, os.SEEK_END)
        if target.offset + target.size > end:
            raise WriteFailed(
                f"{target.describe()}: partition ends at byte {target.offset + target.size}"
                f" but {target.path} has only {end} bytes"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- writing and verifying -----------------------------------------------------------


def check_image(target: Target, compression: str, raw_length: int, sha: str) -> None:
    """Refuse an image that cannot be written to `target` - a partition or a file (pure:
    used to plan, too)."""
    if compression not in COMPRESSIONS:
        raise ImageRejected(f"image for {target.describe()}: unknown compression {compression!r}")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ImageRejected(f"image for {target.describe()}: raw_sha256 {sha!r} is not a sha256")
    _check_length(target, raw_length)


def _check_length(target: Target, raw_length: int) -> None:
    if raw_length <= 0:
        raise ImageRejected(f"image for {target.describe()}: raw_length {raw_length} <= 0")
    if raw_length > target.size:
        raise ImageRejected(
            f"image of {raw_length} bytes does not fit {target.describe()} of {target.size} bytes"
        )


def _pwrite_all(fd: int, target: PartitionTarget, data: memoryview, position: int) -> None:
    """Write `data` at `position` bytes into the partition, all of it, nowhere else."""
    offset = _inside(target, position, len(data), "write")
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_image(
    chunks: Iterable[bytes],
    target: PartitionTarget,
    *,
    compression: str,
    raw_length: int,
    raw_sha256: str,
    guard: SlotGuard,
    progress: Progress | None = None,
) -> WriteResult:
    """Stream one (compressed) image into `target`, reading it back behind the writing;
    returns once all of it was fsync'd and the read-back matched `raw_sha256`."""
    raw_sha256 = raw_sha256.lower()
    check_image(target, compression, raw_length, raw_sha256)
    started = time.monotonic()
    source = ChunkSource(chunks)
    try:
        fd = _open_for_writing(guard, target)
        try:
            read_fd = _open_for_reading(target, fd)
            try:
                done, got_sha, written = _stream_into(
                    fd, read_fd, source, target, compression, raw_length, progress
                )
            finally:
                os.close(read_fd)
        finally:
            os.close(fd)
    finally:
        source.close()
    if got_sha != raw_sha256:
        raise ImageRejected(
            f"image written to {target.describe()} has raw sha256 {got_sha}, expected {raw_sha256}"
        )
    finished = time.monotonic()
    if progress is not None:
        progress(done, raw_length)
    return WriteResult(
        bytes_written=done,
        raw_sha256=got_sha,
        compressed_bytes=source.consumed,
        seconds=finished - started,
        write_seconds=written - started,
        verify_seconds=finished - written,
    )


def _open_for_reading(target: PartitionTarget, write_fd: int) -> int:
    """A read descriptor on the same file or device as `write_fd` (checked by fstat)."""
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise WriteFailed(f"cannot open {target.describe()} to verify: {err.strerror}") from err
    if _identity(os.fstat(fd)) != _identity(os.fstat(write_fd)):
        os.close(fd)
        raise SlotGuardError(f"{target.describe()}: {target.path} was replaced while writing it")
    return fd


def _check_read_back(target: PartitionTarget, raw_length: int, got: str, want: str) -> None:
    if got != want:
        raise ReadBackMismatch(
            f"{target.describe()} holds sha256 {got} over {raw_length} bytes, expected {want}"
        )


class _HashingPipe:
    """Blocks handed to a second thread that hashes them, then passes them to `sink`.

    sha256 and pwrite/pread release the GIL, so on a two-core node the hashing and
    writing overlap with the decompression of the following blocks, and with the
    read-back behind them. Blocks go round a fixed ring of `count` buffers, so memory
    stays `count * BLOCK_SIZE`; they are hashed and sunk in submission order. `sink`
    owns a buffer once it returned (it hands it back with `give_back`); if it raises,
    the buffer is recycled here.
    """

    def __init__(self, sink: Callable[[bytearray, int, int], None], count: int = 3) -> None:
        self._sink = sink
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int, int] | None] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(BLOCK_SIZE))
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image-hasher", daemon=True)
        self._thread.start()

    def take(self) -> bytearray:
        """A free buffer (blocks while all are in flight); raises the thread's error."""
        buf = self._free.get()
        if self._error is not None:
            raise self._error
        return buf

    def give_back(self, buf: bytearray) -> None:
        self._free.put(buf)

    def submit(self, buf: bytearray, length: int, position: int) -> None:
        """Hash `buf[:length]`, then sink it at `position` bytes into the image."""
        self._full.put((buf, length, position))

    def finish(self) -> str:
        """Wait for every submitted block; the sha256 of all of them."""
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buf, length, position = item
            if self._error is None:  # after an error, only recycle buffers
                try:
                    with memoryview(buf) as view:
                        self._digest.update(view[:length])
                    self._sink(buf, length, position)
                    continue  # the sink owns the buffer now
                except BaseException as err:  # re-raised in the caller's thread
                    self._error = err
            self._free.put(buf)


def _stream_into(
    fd: int,
    read_fd: int,
    source: ChunkSource,
    target: PartitionTarget,
    compression: str,
    raw_length: int,
    progress: Progress | None,
) -> tuple[int, str, float]:
    """Decompress `source` into `fd` at the target's offset, reading it back through
    `read_fd` behind the writing; (raw bytes, stream sha256, read-back sha256, the
    monotonic time the write phase - up to the fsync - ended)."""
    what = f"image for {target.describe()}"
    reader = open_raw_reader(source, compression, what)
    writer: _HashingPipe

    def write(buf: bytearray, length: int, position: int) -> None:
        if behind.error is not None:
            raise behind.error
        with memoryview(buf) as view:
            try:
                _pwrite_all(fd, target, view[:length], position)
            except OSError as err:
                raise WriteFailed(
                    f"writing {target.describe()} at byte {position}: {err.strerror}"
                ) from err
        behind.written(buf, length, position)

    writer = _HashingPipe(write, RING_BLOCKS)
    behind = ReadBehind(fd, read_fd, target, block=BLOCK_SIZE, done=writer.give_back)
    done = 0
    last_report = time.monotonic()
    if progress is not None:
        progress(0, raw_length)
    try:
        while True:
            buf = writer.take()
            view = memoryview(buf)
            # Ask for one byte more than the image may still hold, so an over-long
            # stream is caught without writing its excess.
            want = min(BLOCK_SIZE, raw_length - done + 1)
            fill = 0
            while fill < want:
                n = reader.readinto(view[fill:want])
                if n == 0:
                    break
                fill += n
            view.release()
            if done + fill > raw_length:
                raise ImageRejected(f"{what}: stream has more than raw_length={raw_length} bytes")
            if fill:
                writer.submit(buf, fill, done)
                done += fill
            else:
                writer.give_back(buf)
            if progress is not None and time.monotonic() - last_report >= PROGRESS_INTERVAL:
                progress(done, raw_length)
                last_report = time.monotonic()
            if fill < want:  # the reader ended: stream complete and iterator exhausted
                break
        digest = writer.finish()
        if done != raw_length:
            raise ImageRejected(f"{what}: stream ended after {done} of {raw_length} raw bytes")
        try:
            os.fsync(fd)
        except OSError as err:
            raise WriteFailed(f"syncing {target.describe()}: {err.strerror}") from err
        written = time.monotonic()
        behind.finish()
    finally:
        writer.close()
        behind.close()
    return done, digest, written


def read_back_verify(target: PartitionTarget, raw_length: int, raw_sha256: str) -> None:
    """Check that the first `raw_length` bytes of `target` hash to `raw_sha256`.

    Reads the device, not the page cache (clean cached pages of the range are dropped
    first). Raises `ReadBackMismatch` naming slot, partition and both hashes.
    """
    _check_length(target, raw_length)
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise WriteFailed(f"cannot open {target.describe()} to verify: {err.strerror}") from err
    hasher: _HashingPipe  # hashes block n while block n+1 is read
    hasher = _HashingPipe(lambda buf, _length, _position: hasher.give_back(buf))
    try:
        os.posix_fadvise(fd, target.offset, raw_length, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, target.offset, raw_length, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        while done < raw_length:
            buf = hasher.take()
            want = min(BLOCK_SIZE, raw_length - done)
            offset = _inside(target, done, want, "read back")
            with memoryview(buf) as view:
                n = os.preadv(fd, [view[:want]], offset)
            if n == 0:
                hasher.give_back(buf)
                raise ReadBackMismatch(
                    f"{target.describe()} ends after {done} of {raw_length} bytes"
                )
            hasher.submit(buf, n, done)
            done += n
        got = hasher.finish()
        # Do not leave a GiB of image in the page cache after verifying it.
        os.posix_fadvise(fd, target.offset, raw_length, os.POSIX_FADV_DONTNEED)
    except OSError as err:
        raise WriteFailed(f"reading back {target.describe()}: {err.strerror}") from err
    finally:
        hasher.close()
        os.close(fd)
    _check_read_back(target, raw_length, got, raw_sha256.lower())
