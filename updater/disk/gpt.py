"""The GUID Partition Table: a two-copy reader and an ordered writer.

Each on-disk structure (protective MBR, GPT header, partition entry) is declared once
as a construct Struct in `updater.disk.gpt_format`; the table as data (`GptDisk`,
`Partition`) and its validation are in `updater.disk.gpt_table`. CRC32s are computed
here by `_build_header`/`_entries_bytes`, never patched by hand.

Invariants:
* Reading checks BOTH copies (primary at LBA 1, backup at the last LBA). One damaged
  copy -> the other is used and `GptDisk.damaged` says which and why; both damaged ->
  `GPTError` naming the file and both reasons.
* A CRC only proves the bytes are as someone wrote them: every table read, like every
  table written, passes `GptDisk.validate` (geometry, overlaps, unique GUIDs), else
  `GPTError` naming the disk and the entry. A partition can never reach the table.
* Only a regular (image) file or a block device is a disk; anything else (a FIFO, a
  directory, a character device) is refused before it is opened for I/O.
* Parse -> build is byte-exact: fields this module does not interpret (entry count and
  size, revision, header size, reserved bytes, bytes of empty or oversized entries)
  are kept as found and written back unchanged.
* Writes put the backup table first, then the primary, each with both CRCs recomputed
  and an fsync in between, so a power cut leaves at least one valid copy.
* Every read of the (untrusted) disk is bounded: the entry array is at most
  `MAX_ENTRY_ARRAY` bytes.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import stat
import struct
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from construct import ConstructError

from core.errors import DeviceError, GPTError
from core.fsutil import file_kind
from updater.disk.gpt_format import (
    DEFAULT_ENTRIES,
    ENTRY_SIZE,
    HEADER_SIZE,
    MAX_ENTRY_ARRAY,
    GptEntry,
    GptHeader,
    Guid,
    ProtectiveMbr,
)
from updater.disk.gpt_table import EMPTY_TYPE
from updater.disk.gpt_table import GptDisk as GptDisk  # re-exported: the table type
from updater.disk.gpt_table import Partition as Partition

_BLKSSZGET = 0x1268
_BLKGETSIZE64 = 0x80081272


def new_gpt(
    total_sectors: int,
    *,
    sector_size: int = 512,
    disk_guid: uuid.UUID | None = None,
    partitions: list[Partition] | None = None,
    source: str = "<new>",
) -> GptDisk:
    """A fresh GPT (128 entries, protective MBR) for a disk of `total_sectors` sectors."""
    array = -(-DEFAULT_ENTRIES * ENTRY_SIZE // sector_size)
    if total_sectors < 2 * array + 4:
        raise GPTError(f"{source}: {total_sectors} sectors is too small for a GPT")
    disk = GptDisk(
        sector_size=sector_size,
        total_sectors=total_sectors,
        disk_guid=disk_guid or uuid.uuid4(),
        first_usable_lba=2 + array,
        last_usable_lba=total_sectors - 2 - array,
        partitions=sorted(partitions or [], key=lambda p: p.number),
        source=source,
        header_tail=bytes(sector_size - HEADER_SIZE),
        mbr=protective_mbr(total_sectors),
    )
    disk.validate()
    return disk


def protective_mbr(total_sectors: int) -> bytes:
    """Sector 0: one 0xEE record covering the disk (capped at 2^32-1 sectors)."""
    record = {
        "status": 0,
        "chs_first": b"\x00\x02\x00",
        "os_type": 0xEE,
        "chs_last": b"\xff\xff\xff",
        "first_lba": 1,
        "sectors": min(total_sectors - 1, 0xFFFFFFFF),
    }
    empty = {
        "status": 0,
        "chs_first": bytes(3),
        "os_type": 0,
        "chs_last": bytes(3),
        "first_lba": 0,
        "sectors": 0,
    }
    return bytes(
        ProtectiveMbr.build(
            {
                "boot_code": bytes(440),
                "disk_signature": 0,
                "reserved": bytes(2),
                "records": [record, empty, empty, empty],
            }
        )
    )


def _mbr_problem(raw: bytes) -> str | None:
    try:
        mbr = ProtectiveMbr.parse(raw)
    except ConstructError:
        return "protective MBR: no 0x55AA signature"
    if not any(r.os_type == 0xEE for r in mbr.records):
        return "protective MBR: no 0xEE (GPT protective) record"
    return None


# --- building ------------------------------------------------------------------------


def _entries_bytes(disk: GptDisk) -> bytes:
    by_number = {p.number: p for p in disk.partitions}
    out = bytearray()
    for i in range(disk.num_entries):
        raw = disk.raw_entries[i] if i < len(disk.raw_entries) else bytes(disk.entry_size)
        p = by_number.get(i + 1)
        if p is None:
            # Empty entry: keep whatever was there unless it parses as a partition.
            is_empty = Guid.parse(raw[:16]) == EMPTY_TYPE
            out += raw if is_empty else bytes(disk.entry_size)
            continue
        if _parse_entry(i, raw) == p:
            out += raw  # unchanged: keep even bytes we do not interpret
            continue
        built = GptEntry.build(
            {
                "type_guid": p.type_guid,
                "unique_guid": p.unique_guid,
                "first_lba": p.first_lba,
                "last_lba": p.last_lba,
                "attributes": p.attributes,
                "name": p.name,
            }
        )
        out += built + raw[len(built) :]
    return bytes(out)


def _build_header(disk: GptDisk, *, primary: bool, entries_crc: int) -> bytes:
    fields = {
        "revision": disk.revision,
        "header_size": disk.header_size,
        "header_crc32": 0,
        "reserved": disk.header_reserved,
        "my_lba": 1 if primary else disk.backup_lba,
        "alternate_lba": disk.backup_lba if primary else 1,
        "first_usable_lba": disk.first_usable_lba,
        "last_usable_lba": disk.last_usable_lba,
        "disk_guid": disk.disk_guid,
        "entries_lba": disk.entries_lba if primary else disk.backup_entries_lba,
        "num_entries": disk.num_entries,
        "entry_size": disk.entry_size,
        "entries_crc32": entries_crc,
    }
    tail = disk.header_tail or bytes(disk.sector_size - HEADER_SIZE)
    sector = bytes(GptHeader.build(fields)) + tail
    crc = zlib.crc32(sector[: disk.header_size])
    fields["header_crc32"] = crc
    return bytes(GptHeader.build(fields)) + tail


def build_tables(disk: GptDisk) -> dict[str, tuple[int, bytes]]:
    """name -> (byte offset, bytes) for mbr, primary/backup header and entries."""
    entries = _entries_bytes(disk)
    crc = zlib.crc32(entries)
    pad = bytes(disk.entry_array_sectors * disk.sector_size - len(entries))
    ss = disk.sector_size
    return {
        "backup entries": (disk.backup_entries_lba * ss, entries + pad),
        "backup header": (
            disk.backup_lba * ss,
            _build_header(disk, primary=False, entries_crc=crc),
        ),
        "primary entries": (disk.entries_lba * ss, entries + pad),
        "primary header": (ss, _build_header(disk, primary=True, entries_crc=crc)),
        "mbr": (0, disk.mbr or protective_mbr(disk.total_sectors)),
    }


# --- parsing -------------------------------------------------------------------------


def _parse_entry(index: int, raw: bytes) -> Partition | None:
    e = GptEntry.parse(raw)
    if e.type_guid == EMPTY_TYPE:
        return None
    return Partition(
        index + 1, e.type_guid, e.unique_guid, e.first_lba, e.last_lba, e.attributes, e.name
    )


class _Bad(Exception):
    """Why one copy of the table is unusable (internal; becomes a damage note)."""


class _Copy(NamedTuple):
    header: Any  # the parsed GptHeader container
    sector: bytes
    entries: bytes


def _read_copy(f: int, total: int, ss: int, lba: int) -> _Copy:
    """Parse and check the header at `lba` and its entry array; raise _Bad if damaged."""
    sector = os.pread(f, ss, lba * ss)
    if len(sector) < ss:
        raise _Bad(f"header sector {lba} is beyond the end of the disk")
    try:
        h = GptHeader.parse(sector)
    except ConstructError:
        raise _Bad(f"no 'EFI PART' signature at LBA {lba}") from None
    if h.revision >> 16 != 1:
        raise _Bad(f"unsupported revision {h.revision:#x} at LBA {lba}")
    if not HEADER_SIZE <= h.header_size <= ss:
        raise _Bad(f"header size {h.header_size} at LBA {lba} is not in {HEADER_SIZE}-{ss}")
    zeroed = sector[:16] + bytes(4) + sector[20 : h.header_size]
    if zlib.crc32(zeroed) != h.header_crc32:
        raise _Bad(f"header CRC32 mismatch at LBA {lba}")
    if h.my_lba != lba:
        raise _Bad(f"header at LBA {lba} says it is at LBA {h.my_lba}")
    if lba != 1 and h.alternate_lba != 1:
        raise _Bad(f"header at LBA {lba} says the primary is at LBA {h.alternate_lba}, not 1")
    if h.entry_size < ENTRY_SIZE or h.entry_size % 8:
        raise _Bad(f"entry size {h.entry_size} at LBA {lba} is invalid")
    length = h.num_entries * h.entry_size
    if length > MAX_ENTRY_ARRAY or h.num_entries == 0:
        raise _Bad(f"{h.num_entries} entries of {h.entry_size} bytes at LBA {lba} is out of bounds")
    if not 2 <= h.entries_lba < total or h.entries_lba * ss + length > total * ss:
        raise _Bad(f"entry array at LBA {h.entries_lba} does not fit the disk")
    if not h.first_usable_lba <= h.last_usable_lba + 1 or h.last_usable_lba >= total:
        raise _Bad(f"usable range {h.first_usable_lba}-{h.last_usable_lba} is invalid")
    entries = os.pread(f, length, h.entries_lba * ss)
    if zlib.crc32(entries) != h.entries_crc32:
        raise _Bad(f"entry array CRC32 mismatch (entries at LBA {h.entries_lba})")
    return _Copy(h, sector, entries)


def _summary(copy: _Copy) -> tuple[object, ...]:
    """What both copies must agree on: everything a rebuild takes from one copy for
    both (the table, and the header fields kept byte for byte - revision, size,
    reserved, the CRC-covered bytes past the 92 this module reads)."""
    h = copy.header
    keys = ("first_usable_lba", "last_usable_lba", "disk_guid", "num_entries", "entry_size",
            "revision", "header_size", "reserved")  # fmt: skip
    return (*(getattr(h, k) for k in keys), copy.sector[HEADER_SIZE : h.header_size], copy.entries)


def _check_disk_kind(mode: int, path: Path) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        why = f"not a disk: {file_kind(mode)} (a disk is a block device or an image file)"
        raise OSError(errno.EINVAL, why, str(path))


def open_disk(path: Path, flags: int) -> int:
    """Open a disk - a block device or a regular (image) file, nothing else - and return
    the descriptor. The kind is checked before opening (opening some character devices
    has effects: a watchdog starts counting) and again on the descriptor, which is opened
    non-blocking so that a FIFO swapped in meanwhile cannot hang the caller; O_NONBLOCK is
    then cleared. Raises OSError; EINVAL "not a disk: a FIFO (...)" for anything else."""
    _check_disk_kind(os.stat(path).st_mode, path)
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        _check_disk_kind(os.fstat(fd).st_mode, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def _open(path: Path, flags: int) -> Iterator[int]:
    try:
        fd = open_disk(path, flags)
    except OSError as e:
        raise DeviceError(f"cannot open {path}: {e.strerror}") from e
    try:
        yield fd
    finally:
        os.close(fd)


def device_geometry(fd: int, path: Path) -> tuple[int, int]:
    """(sector size, size in bytes): the kernel's logical sector size for a block device,
    512 for an image file."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return 512, st.st_size
    try:
        ss = struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
        size = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
    except OSError as e:
        raise DeviceError(f"{path}: cannot query sector size and size: {e.strerror}") from e
    return int(ss), int(size)


def read_gpt(path: Path, *, sector_size: int | None = None) -> GptDisk:
    """Parse both GPT copies of a disk or image file; see the module invariants."""
    with _open(path, os.O_RDONLY) as fd:
        return _read_fd(fd, path, sector_size)


def _read_fd(fd: int, path: Path, sector_size: int | None) -> GptDisk:
    ss, size = device_geometry(fd, path)
    ss = sector_size or ss
    total = size // ss
    if total < 6:
        raise GPTError(f"{path}: {size} bytes is too small to hold a GPT")
    why = {"primary": "", "backup": ""}
    primary = backup = None
    try:
        primary = _read_copy(fd, total, ss, 1)
    except _Bad as e:
        why["primary"] = str(e)
    # The backup belongs at the last LBA; a grown image still has it where the primary
    # says (`alternate_lba`).
    for lba in dict.fromkeys([total - 1, primary.header.alternate_lba if primary else 0]):
        try:
            backup = _read_copy(fd, total, ss, lba) if 1 < lba < total else None
            break
        except _Bad as e:
            why["backup"] = why["backup"] or str(e)
    if primary is None and backup is None:
        raise GPTError(f"{path}: no valid GPT: primary: {why['primary']}; backup: {why['backup']}")
    damaged = [
        f"{copy} GPT: {reason}"
        for copy, reason in why.items()
        if reason and (primary if copy == "primary" else backup) is None
    ]
    if primary and backup and _summary(primary) != _summary(backup):
        damaged.append("backup GPT: does not match the primary")
        backup = None
    if primary and backup and primary.header.alternate_lba != backup.header.my_lba:
        # What sgdisk -v reports as the main header's backup pointer not matching the
        # backup's own: a rewrite (layout repair) sets it from where the backup is.
        damaged.append(
            f"primary GPT: says the backup is at LBA {primary.header.alternate_lba}, "
            f"it is at LBA {backup.header.my_lba}"
        )
    mbr = os.pread(fd, ss, 0)
    if (problem := _mbr_problem(mbr[:512])) is not None:
        damaged.append(problem)
        mbr = b""
    good = primary or backup
    assert good is not None  # both missing raised above
    h, sector, entries = good
    raw = tuple(entries[i : i + h.entry_size] for i in range(0, len(entries), h.entry_size))
    try:
        parts = [p for i, r in enumerate(raw) if (p := _parse_entry(i, r)) is not None]
    except (ConstructError, UnicodeDecodeError) as e:
        raise GPTError(f"{path}: unreadable partition entry: {e}") from e
    if backup is not None:
        backup_lba, backup_entries = backup.header.my_lba, backup.header.entries_lba
    else:  # 0: derived from backup_lba by GptDisk
        backup_lba = h.alternate_lba if 1 < h.alternate_lba < total else total - 1
        backup_entries = 0
    disk = GptDisk(
        sector_size=ss,
        total_sectors=total,
        disk_guid=h.disk_guid,
        first_usable_lba=h.first_usable_lba,
        last_usable_lba=h.last_usable_lba,
        partitions=parts,
        damaged=damaged,
        source=str(path),
        num_entries=h.num_entries,
        entry_size=h.entry_size,
        entries_lba=primary.header.entries_lba if primary else 2,
        backup_lba=backup_lba,
        backup_entries_lba=backup_entries,
        revision=h.revision,
        header_size=h.header_size,
        header_reserved=h.reserved,
        header_tail=sector[HEADER_SIZE:],
        raw_entries=raw,
        mbr=mbr,
    )
    # Nothing read from the disk is trusted: a CRC only proves the bytes are as written.
    # Without a backup copy, its place is checked only if the header puts it on the disk.
    disk.validate(backup=backup is not None or 1 < h.alternate_lba < total)
    return disk


# --- writing -------------------------------------------------------------------------


def write_gpt(path: Path, disk: GptDisk) -> None:
    """Write `disk` to `path`: backup table, fsync, primary table and MBR, fsync."""
    disk.validate()
    tables = build_tables(disk)
    with _open(path, os.O_RDWR) as fd:
        _, size = device_geometry(fd, path)
        if size // disk.sector_size < disk.total_sectors:
            raise GPTError(
                f"{path}: the table is for {disk.total_sectors} sectors but the "
                f"disk has only {size // disk.sector_size}"
            )
        write_tables(fd, path, tables)


def write_tables(fd: int, path: Path, tables: dict[str, tuple[int, bytes]]) -> None:
    """Put built tables on an open disk in the safe order (backup first), fsync'd."""
    try:
        for names in (
            ("backup entries", "backup header"),
            ("primary entries", "primary header", "mbr"),
        ):
            for name in names:
                offset, data = tables[name]
                if os.pwrite(fd, data, offset) != len(data):
                    raise DeviceError(f"{path}: short write of the {name}")
            os.fsync(fd)
    except OSError as e:
        raise DeviceError(f"{path}: writing the GPT failed: {e.strerror}") from e


def repair_gpt(path: Path) -> list[str]:
    """Write the good copy over a damaged one; returns what was repaired (may be [])."""
    disk = read_gpt(path)
    if disk.damaged:
        # A moved backup (grown image) goes back to the end, where it belongs.
        fixed = dataclasses.replace(
            disk, backup_lba=disk.total_sectors - 1, backup_entries_lba=0, damaged=[]
        )
        write_gpt(path, fixed)
    return list(disk.damaged)
