"""Write logs in the dm-log-writes format (what QEMU's `blklogwrites` driver records):
read one, and apply its entries to a disk image.

The format (Linux drivers/md/dm-log-writes.c, QEMU block/blklogwrites.c), all fields
little-endian, in units of the log's sector size (512 bytes here):

* sector 0: the superblock - magic, version 1, the number of entries it vouches for,
  the sector size;
* then, per entry, one sector holding the entry header (`sector`, `nr_sectors`,
  `flags`, `data_len`) padded with zeros, followed by the `nr_sectors` sectors of
  written data (none for a DISCARD; a FLUSH has `nr_sectors` 0). A MARK (never written
  by QEMU) carries `data_len` bytes of its name in the header sector.

Invariants kept here:

* each on-disk structure is declared once (`SUPERBLOCK`, `ENTRY`); entries are only
  ever produced by parsing them;
* QEMU updates the superblock's count only on a flush (and every 4096 entries), and a
  power-off or SIGKILL leaves entries after it: the reader walks the entries to the end
  of the file, stops at a tail that is cut short (QEMU killed while logging) and says
  so, and refuses an entry with unknown flags - a log that is not what QEMU writes is a
  `LogError`, never a partial replay presented as complete;
* data is never loaded whole: an `Entry` knows where its data lies in the log file,
  and `WriteLog.data` reads one entry's (or a few of its sectors') bytes when asked;
* `apply` writes exactly what the entry says, where it says, or raises `LogError` for
  a write outside the disk; a DISCARD changes nothing, as QEMU's file driver (with its
  default `discard=ignore`) did not change the disk file either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from construct import Bytes, Const, ConstructError, Int32ul, Int64ul, Struct

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK

SUPERBLOCK = Struct(
    "magic" / Const(MAGIC, Int64ul),
    "version" / Const(VERSION, Int64ul),
    "nr_entries" / Int64ul,
    "sectorsize" / Int32ul,
)
ENTRY = Struct(
    "sector" / Int64ul,
    "nr_sectors" / Int64ul,
    "flags" / Int64ul,
    "data_len" / Int64ul,
)
ENTRY_HEADER = Struct(
    "entry" / ENTRY, "rest" / Bytes(lambda this: this._.sectorsize - ENTRY.sizeof())
)


class LogError(ValueError):
    """A write log that is not in the dm-log-writes format, or does not fit the disk."""


@dataclass(frozen=True)
class Entry:
    """One logged request: a write of `nr_sectors` at `sector`, a flush, or a discard."""

    index: int
    sector: int
    nr_sectors: int
    flags: int
    data_offset: int  # byte offset of its data in the log file
    mark: str = ""

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & FLUSH)

    @property
    def is_fua(self) -> bool:
        return bool(self.flags & FUA)

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & DISCARD)

    @property
    def is_write(self) -> bool:
        """A request that carries data for the disk (QEMU logs write-zeroes as data too)."""
        return self.nr_sectors > 0 and not self.flags & (DISCARD | MARK)

    @property
    def end(self) -> int:
        """The first sector after this write."""
        return self.sector + self.nr_sectors

    def describe(self) -> str:
        names = [n for bit, n in ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"),
                                  (MARK, "MARK")) if self.flags & bit]  # fmt: skip
        what = "|".join(names) or "WRITE"
        return f"#{self.index} {what} sector {self.sector} +{self.nr_sectors}"


@dataclass(frozen=True)
class WriteLog:
    """A parsed log: its entries in the order the device completed them."""

    path: Path
    sector_size: int
    counted: int  # entries the superblock vouches for (QEMU's last flush)
    entries: tuple[Entry, ...]
    truncated: bool  # the file ends inside an entry (QEMU was killed while logging)

    def data(self, entry: Entry, first: int = 0, count: int | None = None) -> bytes:
        """The data of sectors `first`..`first+count` of a write (default: all of it)."""
        if not entry.is_write:
            return b""
        count = entry.nr_sectors - first if count is None else count
        if first < 0 or count < 0 or first + count > entry.nr_sectors:
            raise LogError(f"{self.path}: {entry.describe()} has no sectors {first}+{count}")
        with self.path.open("rb") as f:
            f.seek(entry.data_offset + first * self.sector_size)
            data = f.read(count * self.sector_size)
        if len(data) != count * self.sector_size:
            raise LogError(f"{self.path}: {entry.describe()}: data cut short")
        return data

    def flushes(self) -> list[int]:
        """Indices of the flush entries, in order."""
        return [e.index for e in self.entries if e.is_flush]

    def writes(self) -> Iterator[Entry]:
        return (e for e in self.entries if e.is_write)


def read_log(path: Path) -> WriteLog:
    """Parse the log at `path` (see the module invariants); `LogError` if it is not one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(SUPERBLOCK.sizeof())
        try:
            sb = SUPERBLOCK.parse(head)
        except ConstructError as err:
            raise LogError(f"{path}: not a dm-log-writes log: {err}") from err
        ss = int(sb.sectorsize)
        if ss < 512 or ss & (ss - 1) or ss > 1 << 20:
            raise LogError(f"{path}: sector size {ss} is not a power of two >= 512")
        entries: list[Entry] = []
        pos = ss
        truncated = False
        while pos < size:
            raw = _pread(f, pos, ss)
            if len(raw) < ss:
                truncated = True
                break
            header = ENTRY_HEADER.parse(raw, sectorsize=ss).entry
            flags = int(header.flags)
            if flags & ~KNOWN_FLAGS:
                raise LogError(
                    f"{path}: entry {len(entries)} at byte {pos}: unknown flags {flags:#x}"
                )
            nr = int(header.nr_sectors)
            mark = ""
            if flags & MARK:
                length = int(header.data_len)
                if length > ss - ENTRY.sizeof():
                    raise LogError(f"{path}: entry {len(entries)}: mark of {length} bytes")
                mark = raw[ENTRY.sizeof() : ENTRY.sizeof() + length].decode(errors="replace")
            data_sectors = 0 if flags & (DISCARD | MARK) else nr
            end = pos + ss + data_sectors * ss
            if end > size:
                truncated = True
                break
            entries.append(Entry(len(entries), int(header.sector), nr, flags, pos + ss, mark))
            pos = end
    if len(entries) < int(sb.nr_entries):
        raise LogError(
            f"{path}: the superblock counts {sb.nr_entries} entries but only "
            f"{len(entries)} are in the file"
        )
    return WriteLog(path, ss, int(sb.nr_entries), tuple(entries), truncated)


def _pread(f: object, offset: int, length: int) -> bytes:
    fd = f.fileno()  # type: ignore[attr-defined]
    return os.pread(fd, length, offset)


def apply(
    disk_fd: int,
    log: WriteLog,
    entry: Entry,
    sectors: Iterable[int] | None = None,
    *,
    disk_sectors: int,
) -> None:
    """Write `entry` (or only the given sector offsets of it: a torn write) to the disk
    open as `disk_fd`, which has `disk_sectors` sectors of the log's size."""
    if not entry.is_write:
        return
    if entry.end > disk_sectors:
        raise LogError(
            f"{log.path}: {entry.describe()} ends past the disk's {disk_sectors} sectors"
        )
    ss = log.sector_size
    if sectors is None:
        _pwrite(disk_fd, log.data(entry), entry.sector * ss)
        return
    for first, count in runs(sorted(set(sectors))):
        if first < 0 or first + count > entry.nr_sectors:
            raise LogError(f"{log.path}: {entry.describe()} has no sector {first + count - 1}")
        _pwrite(disk_fd, log.data(entry, first, count), (entry.sector + first) * ss)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def runs(sorted_offsets: list[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in a sorted list."""
    start = prev = None
    for n in sorted_offsets:
        if start is None:
            start = prev = n
        elif prev is not None and n == prev + 1:
            prev = n
        else:
            assert prev is not None
            yield start, prev - start + 1
            start = prev = n
    if start is not None and prev is not None:
        yield start, prev - start + 1
