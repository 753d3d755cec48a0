"""Write one image into a partition of the inactive slot: stream -> decompress -> hash ->
write -> read back behind the writing -> fsync.

`write_blocks` is the engine: it takes the raw image from a `Fill` in order - the
decompressed stream of a full install (`write_image`), or the chunks of a delta install
(`updater.deltablocks`) - in `BLOCK_SIZE` blocks round a ring of `RING_BLOCKS`.

Invariants:
- Nothing is opened for writing before `SlotGuard.check` has accepted the target, and
  the descriptor that was opened is checked again (fstat) to be the file or device that
  was checked (`updater.slotguard`), so the booted slot cannot be opened for writing
  through this module. The read-back descriptors are checked (fstat) to be that same
  file or device.
- At most `raw_length` bytes are written, all inside `[target.offset, target.offset +
  raw_length)`; an image larger than the partition is refused before anything is
  opened, and a source producing more than `raw_length` raw bytes is aborted before the
  excess is written. The rest of the partition (beyond `raw_length`) is left as it was:
  images carry their own filesystem size, and `raw_sha256` covers `raw_length` bytes.
- Defense in depth: every pwrite and every read-back pread is itself checked to lie
  inside `[target.offset, target.offset + target.size)` (`OutOfPartition`), whatever
  the checks before it concluded.
- The source is untrusted until it ended without error (the repository verifies length
  and hashes at the end of a stream); success is only returned after it ended, the raw
  length and the sha256 of all its bytes, in order, matched `raw_sha256`, the data was
  fsync'd, and every block had been read back from the device (after its writeback,
  O_DIRECT or with its cached pages dropped) and found equal to the block in memory
  (`updater.readback`). The raw image is hashed once, on the way in; the read-back
  proves the device returned exactly those bytes. Ranges a `Fill` says the target
  holds already are not written, but hashed and read back like the rest: the device is
  proven to hold them too. `read_back_verify` (a slot checked again later) hashes what
  the device returns.
- Memory is bounded by `RING_BLOCKS` blocks (`BLOCK_SIZE`: being filled, hashed
  and written, waiting for their writeback and read-back), one read-back block and
  what the `Fill` holds (one input chunk and the decoder's window), whatever the image
  size.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from core.decompress import COMPRESSIONS, ChunkSource, open_raw_reader
from core.errors import SlotGuardError, UpdateRejected
from updater.readback import OutOfPartition as OutOfPartition
from updater.readback import ReadBackMismatch as ReadBackMismatch
from updater.readback import ReadBehind, inside
from updater.readback import WriteFailed as WriteFailed
from updater.slotguard import Extent as Extent
from updater.slotguard import SlotGuard as SlotGuard
from updater.slotguard import identity, open_for_writing
from updater.slotguard import resolve_extent as resolve_extent
from updater.slots import PartitionTarget, Target

_inside = inside  # the bounds check of every pwrite and pread (updater.readback)

BLOCK_SIZE = 4 << 20  # one pwrite; large and aligned (partitions start on MiB boundaries)
# In flight: being decompressed, hashed and written, read back. 3 and 6 were within
# the noise of bench/copyfloor.py; 3 keeps the agent's peak RSS 12 MiB lower (issue 11:
# <= 64 MiB; with 6 it was 82-88 MiB), and a fleet of agents in one process far lower.
RING_BLOCKS = 3
PROGRESS_INTERVAL = 0.5  # seconds between progress callbacks

Progress = Callable[[int, int], None]
# Fills a view with the image's next raw bytes (all of it unless the image ends); returns
# how many, and the ranges [a, b) of them that the target already holds (read from it,
# verified): hashed and read back like the rest, not written (`write_blocks`).
Held = Sequence[tuple[int, int]]
Fill = Callable[[memoryview], tuple[int, Held]]


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


# --- writing and verifying -----------------------------------------------------------


def check_image(target: Target, compression: str, raw_length: int, sha: str) -> None:
    """Refuse an image that cannot be written to `target` - a partition or a file (pure:
    used to plan, too)."""
    if compression not in COMPRESSIONS:
        raise ImageRejected(f"image for {target.describe()}: unknown compression {compression!r}")
    _check_raw(target, raw_length, sha)


def _check_raw(target: Target, raw_length: int, sha: str) -> None:
    """The raw image's length fits `target` and `sha` is a sha256 (what `write_blocks`
    needs whatever produced the raw bytes)."""
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
    check_image(target, compression, raw_length, raw_sha256.lower())
    source = ChunkSource(chunks)
    try:
        result = write_blocks(
            _decompressing(source, compression, f"image for {target.describe()}"),
            target,
            raw_length=raw_length,
            raw_sha256=raw_sha256,
            guard=guard,
            progress=progress,
        )
    finally:
        source.close()
    return replace(result, compressed_bytes=source.consumed)


def _decompressing(source: ChunkSource, compression: str, what: str) -> Fill:
    """`source` decompressed, as a `Fill`; the decoder is opened at the first call (after
    the target was opened for writing)."""
    reader = None

    def fill(view: memoryview) -> tuple[int, Held]:
        nonlocal reader
        if reader is None:
            reader = open_raw_reader(source, compression, what)
        got = 0
        while got < len(view):
            n = reader.readinto(view[got:])
            if n == 0:
                break
            got += n
        return got, ()

    return fill


def write_blocks(
    fill: Fill,
    target: PartitionTarget,
    *,
    raw_length: int,
    raw_sha256: str,
    guard: SlotGuard,
    progress: Progress | None = None,
) -> WriteResult:
    """Write the raw image `fill` produces, in order, into `target` in `BLOCK_SIZE`
    blocks (the ranges it says are held already are not written), hashing it once on
    the way in and reading every block back behind the writing; returns once all of it
    was fsync'd, read back equal, and its sha256 matched `raw_sha256`. The one engine of
    a full install and of a delta (`updater.delta`)."""
    raw_sha256 = raw_sha256.lower()
    _check_raw(target, raw_length, raw_sha256)
    started = time.monotonic()
    fd = open_for_writing(guard, target)
    try:
        read_fd = _open_for_reading(target, fd)
        try:
            done, got_sha, written = _stream_into(fd, read_fd, fill, target, raw_length, progress)
        finally:
            os.close(read_fd)
    finally:
        os.close(fd)
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
        compressed_bytes=0,
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
    if identity(os.fstat(fd)) != identity(os.fstat(write_fd)):
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

    def __init__(self, sink: Callable[[bytearray, int, int, Held], None], count: int = 3) -> None:
        self._sink = sink
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[bytearray, int, int, Held] | None] = queue.SimpleQueue()
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

    def submit(self, buf: bytearray, length: int, position: int, held: Held = ()) -> None:
        """Hash `buf[:length]`, then sink it at `position` bytes into the image."""
        self._full.put((buf, length, position, held))

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
            buf, length, position, held = item
            if self._error is None:  # after an error, only recycle buffers
                try:
                    with memoryview(buf) as view:
                        self._digest.update(view[:length])
                    self._sink(buf, length, position, held)
                    continue  # the sink owns the buffer now
                except BaseException as err:  # re-raised in the caller's thread
                    self._error = err
            self._free.put(buf)


def _stream_into(
    fd: int,
    read_fd: int,
    fill: Fill,
    target: PartitionTarget,
    raw_length: int,
    progress: Progress | None,
) -> tuple[int, str, float]:
    """Write what `fill` produces into `fd` at the target's offset, reading it back
    through `read_fd` behind the writing; (raw bytes, their sha256, the monotonic time
    the write phase - up to the fsync - ended)."""
    what = f"image for {target.describe()}"
    writer: _HashingPipe

    def write(buf: bytearray, length: int, position: int, held: Held) -> None:
        if behind.error is not None:
            raise behind.error
        at = position
        with memoryview(buf) as view:
            try:
                for start, end in (*held, (length, length)):
                    if start > at - position:
                        _pwrite_all(fd, target, view[at - position : start], at)
                    at = position + end
            except OSError as err:
                raise WriteFailed(
                    f"writing {target.describe()} at byte {at}: {err.strerror}"
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
            try:
                got, held = fill(view[:want])
            finally:
                view.release()
            if done + got > raw_length:
                raise ImageRejected(f"{what}: stream has more than raw_length={raw_length} bytes")
            _check_held(held, got)
            if got:
                writer.submit(buf, got, done, held)
                done += got
            else:
                writer.give_back(buf)
            if progress is not None and time.monotonic() - last_report >= PROGRESS_INTERVAL:
                progress(done, raw_length)
                last_report = time.monotonic()
            if got < want:  # the source ended: stream complete and iterator exhausted
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


def _check_held(held: Held, length: int) -> None:
    """Held ranges are in order, apart, inside the block: what is not written is exactly
    what the source said the target holds (defence in depth)."""
    at = 0
    for start, end in held:
        if not at <= start < end <= length:
            raise OutOfPartition(f"held ranges {list(held)} are not in order inside {length} bytes")
        at = end


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
    hasher = _HashingPipe(lambda buf, _length, _position, _held: hasher.give_back(buf))
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
