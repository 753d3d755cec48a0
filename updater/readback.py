"""Reading back what was written to a partition - from the device, not the page cache -
block by block behind the writer (write-behind), and whole ranges afterwards.

`ReadBehind` follows the image writer. For each block the writer has written it starts
the block's writeback at once (`sync_file_range` WRITE, from the writer's thread); a
thread of its own waits for that writeback to complete (WAIT_BEFORE|WRITE|WAIT_AFTER),
reads the block back from the device - with O_DIRECT where the file or device allows
it, else through the cache after dropping the block's clean pages (POSIX_FADV_DONTNEED)
- and compares it with the block, still in memory (a memcmp). The writer hashes every
block it writes (the stream's raw sha256, compared with the signed `raw_sha256`); that
the device returned exactly those bytes is what this module proves. Together: the
device holds bytes whose sha256 is the signed one, with the raw image hashed once.

A slot checked again later, with nothing in memory to compare with, is hashed as the
device returns it instead (`install.read_back_verify`).

Invariants:
- a block is read back only after its own writeback completed, and given back to the
  writer's ring only after it was compared (or, after an error, skipped); blocks are
  checked in the order written, so `verified` is a prefix of the image;
- every pread lies inside the partition (`inside`, `OutOfPartition`); an O_DIRECT read
  rounded up to `DIRECT_ALIGN` too, else that tail is read through the cache;
- memory: one block-sized read buffer (plus one alignment unit); what was read back is
  dropped from the cache again (a GiB of image does not stay cached);
- the thread ends by itself: `finish()` or `close()` joins it; its errors are re-raised
  in the caller's thread; a mismatch names the first differing byte.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Callable

from core.errors import DeviceError, SlotGuardError
from updater.slots import PartitionTarget

DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of any logical block size

# sync_file_range(2) is not in the os module; ctypes releases the GIL around the call.
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int

# Fault injection for tests only: called as (target, position, length) just before a
# written block is read back - a test changes what the device holds there.
before_read_back: Callable[[PartitionTarget, int, int], None] | None = None


class WriteFailed(DeviceError):
    """Opening, writing, syncing or reading back the target partition failed."""


class ReadBackMismatch(DeviceError):
    """What the partition holds is not the image: the device returned other bytes."""


class OutOfPartition(SlotGuardError):
    """A write or read-back reached outside the partition it was given: refused."""


def inside(target: PartitionTarget, position: int, length: int, doing: str) -> int:
    """The offset in `target.path` of `length` bytes at `position` in the partition;
    `OutOfPartition` unless they lie inside `[target.offset, target.offset + size)`."""
    if position < 0 or length < 0 or position + length > target.size:
        raise OutOfPartition(
            f"refusing to {doing} bytes {position}..{position + length} of "
            f"{target.describe()}: outside its {target.size} bytes"
        )
    return target.offset + position


def sync_range(fd: int, offset: int, length: int, *, wait: bool) -> None:
    """Start the writeback of `length` bytes at `offset` of `fd`; with `wait`, also wait
    for it (and any earlier writeback of the range) to complete. OSError on failure."""
    flags = _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER if wait else _SYNC_WRITE
    if _sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_direct(target: PartitionTarget, read_fd: int) -> int | None:
    """An O_DIRECT descriptor on the file or device of `read_fd`, or None where the
    filesystem refuses O_DIRECT (tmpfs) or the partition is not aligned for it."""
    if target.offset % DIRECT_ALIGN:
        return None
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        return None
    a, b = os.fstat(fd), os.fstat(read_fd)
    if (a.st_dev, a.st_ino, a.st_rdev) != (b.st_dev, b.st_ino, b.st_rdev):
        os.close(fd)
        return None
    return fd


class ReadBehind:
    """Reads back, in a thread, each block the writer has written and compares it with
    the block still in memory (see the module docstring)."""

    def __init__(
        self,
        write_fd: int,
        read_fd: int,
        target: PartitionTarget,
        *,
        block: int,
        done: Callable[[bytearray], None],
    ) -> None:
        self._write_fd = write_fd
        self._read_fd = read_fd
        self._target = target
        # Page aligned (mmap), as O_DIRECT needs; one alignment unit more for a tail.
        self._buffer = mmap.mmap(-1, block + DIRECT_ALIGN)
        self._direct_fd = _open_direct(target, read_fd)
        self._done = done  # gives a verified (or, after an error, skipped) block back
        self._queue: queue.SimpleQueue[tuple[bytearray, int, int] | None] = queue.SimpleQueue()
        self.verified = 0  # bytes [0, verified) read back and found equal
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image-read-behind", daemon=True)
        self._thread.start()

    def written(self, buf: bytearray, length: int, position: int) -> None:
        """`buf[:length]` was written at `position`: start its writeback and queue it
        for reading back. `buf` belongs to this object until it is given back."""
        offset = inside(self._target, position, length, "sync")
        try:
            sync_range(self._write_fd, offset, length, wait=False)
        except OSError as err:
            raise WriteFailed(f"syncing {self._target.describe()}: {err.strerror}") from err
        self._queue.put((buf, length, position))

    def finish(self) -> None:
        """After the writer's fsync: wait until every queued block was read back and
        matched; the first difference, or the read error, is raised here."""
        self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop the thread (after what it was given); idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        view = memoryview(self._buffer)
        try:
            while (item := self._queue.get()) is not None:
                buf, length, position = item
                try:
                    if self.error is None:
                        self._check(buf, length, position, view)
                except OSError as err:
                    self.error = WriteFailed(
                        f"reading back {self._target.describe()} at byte {position}: {err.strerror}"
                    )
                    self.error.__cause__ = err
                except BaseException as err:  # re-raised in the caller's thread
                    self.error = err
                finally:
                    self._done(buf)
        finally:
            view.release()
            self._buffer.close()
            if self._direct_fd is not None:
                os.close(self._direct_fd)

    def _check(self, buf: bytearray, length: int, position: int, view: memoryview) -> None:
        offset = inside(self._target, position, length, "read back")
        sync_range(self._write_fd, offset, length, wait=True)
        if before_read_back is not None:
            before_read_back(self._target, position, length)
        # O_DIRECT reads the device whatever the cache holds; it needs aligned offsets
        # and lengths, so a tail that cannot be rounded up inside the partition is read
        # through the cache, after dropping its (clean, written back) pages.
        aligned = -(-length // DIRECT_ALIGN) * DIRECT_ALIGN
        fd, want = self._read_fd, length
        if self._direct_fd is not None and position + aligned <= self._target.size:
            fd, want = self._direct_fd, aligned
        else:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        got = 0
        while got < want:
            n = os.preadv(
                fd, [view[got:want]], inside(self._target, position + got, want - got, "read back")
            )
            if n == 0:
                break
            got += n
        if got < length:
            raise ReadBackMismatch(
                f"{self._target.describe()} ends after {position + got} bytes"
                f" of the {position + length} written"
            )
        # The image is not kept in the page cache after verifying it.
        os.posix_fadvise(self._read_fd, offset, length, os.POSIX_FADV_DONTNEED)
        # bytearray == buffer is a memcmp (memoryview == bytearray would compare items).
        with view[:length] as read:
            same = (buf if length == len(buf) else buf[:length]) == read
        if not same:
            first = next(i for i in range(length) if self._buffer[i] != buf[i])
            raise ReadBackMismatch(
                f"{self._target.describe()}: the device returned other bytes than were"
                f" written at byte {position + first} (block at {position}, {length} bytes)"
            )
        self.verified = position + length
