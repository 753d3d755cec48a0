"""A minimal FAT12/16/32 reader that finds a file the way GRUB's and the firmware's FAT
drivers do, for judging an ESP after a power cut without mounting it.

It reads the boot sector (BPB), walks directories from the root by name (long names
or 8.3, case-insensitive, deleted entries skipped, the first free entry ends a
directory), and reads a file's bytes by following its cluster chain only as far as
its size needs - the way GRUB reads the grubenv: a one-cluster file is read from its
directory entry alone, whatever the FAT says about that cluster. A FAT that says
"free" or "bad" in the middle of a file's chain, a cluster outside the volume, or a
chain that loops is a `FatError` naming the file, as it would be an I/O error to GRUB.

Invariants: reads are bounded (a file larger than `limit` is refused unread, a
directory walk stops after `MAX_DIR_ENTRIES`); nothing is written; each on-disk
structure (BPB, directory entry) is declared once with construct.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

SECTOR = 512
MAX_DIR_ENTRIES = 65536

BPB = Struct(
    "jump" / Bytes(3),
    "oem" / Bytes(8),
    "bytes_per_sector" / Int16ul,
    "sectors_per_cluster" / Int8ul,
    "reserved_sectors" / Int16ul,
    "fats" / Int8ul,
    "root_entries" / Int16ul,
    "total_sectors16" / Int16ul,
    "media" / Int8ul,
    "fat_size16" / Int16ul,
    "sectors_per_track" / Int16ul,
    "heads" / Int16ul,
    "hidden_sectors" / Int32ul,
    "total_sectors32" / Int32ul,
    "fat_size32" / Int32ul,  # FAT32 only (FAT12/16: drive number etc.)
    "ext_flags" / Int16ul,
    "fs_version" / Int16ul,
    "root_cluster" / Int32ul,
)
DIRENT = Struct(
    "name" / Bytes(11),
    "attr" / Int8ul,
    "nt_reserved" / Int8ul,
    "ctime_tenth" / Int8ul,
    "ctime" / Int16ul,
    "cdate" / Int16ul,
    "adate" / Int16ul,
    "cluster_hi" / Int16ul,
    "mtime" / Int16ul,
    "mdate" / Int16ul,
    "cluster_lo" / Int16ul,
    "size" / Int32ul,
)
ATTR_DIRECTORY = 0x10
ATTR_VOLUME = 0x08
ATTR_LFN = 0x0F


class FatError(ValueError):
    """The volume or a file on it cannot be read as a FAT driver would."""


@dataclass(frozen=True)
class DirEntry:
    name: str
    short: str
    attr: int
    cluster: int
    size: int

    @property
    def is_dir(self) -> bool:
        return bool(self.attr & ATTR_DIRECTORY)


class FatVolume:
    """A FAT filesystem at byte `offset` of the file open as `fd` (read only)."""

    def __init__(self, fd: int, offset: int = 0) -> None:
        self.fd, self.offset = fd, offset
        bpb = BPB.parse(self._read(0, SECTOR))
        ss = int(bpb.bytes_per_sector)
        spc = int(bpb.sectors_per_cluster)
        if ss not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1):
            raise FatError(f"not a FAT boot sector (sector size {ss}, cluster {spc})")
        fat_size = int(bpb.fat_size16) or int(bpb.fat_size32)
        total = int(bpb.total_sectors16) or int(bpb.total_sectors32)
        root_sectors = (int(bpb.root_entries) * 32 + ss - 1) // ss
        self.ss, self.spc = ss, spc
        self.fat_start = int(bpb.reserved_sectors)
        self.root_start = self.fat_start + int(bpb.fats) * fat_size
        self.root_sectors = root_sectors
        self.data_start = self.root_start + root_sectors
        if fat_size == 0 or total <= self.data_start:
            raise FatError("not a FAT boot sector (no FAT or no data area)")
        self.clusters = (total - self.data_start) // spc
        self.bits = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        self.root_cluster = int(bpb.root_cluster) if self.bits == 32 else 0

    def _read(self, byte: int, length: int) -> bytes:
        data = os.pread(self.fd, length, self.offset + byte)
        if len(data) != length:
            raise FatError(f"short read at byte {byte} of the volume")
        return data

    def next_cluster(self, cluster: int) -> int:
        if self.bits == 12:
            raw = int.from_bytes(
                self._read(self.fat_start * self.ss + cluster * 3 // 2, 2), "little"
            )
            return raw >> 4 if cluster & 1 else raw & 0xFFF
        width = self.bits // 8
        raw = int.from_bytes(
            self._read(self.fat_start * self.ss + cluster * width, width), "little"
        )
        return raw & 0x0FFFFFFF if self.bits == 32 else raw

    def _end_of_chain(self, value: int) -> bool:
        return value >= {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]

    def chain(self, first: int, nbytes: int, what: str) -> list[int]:
        """The clusters holding `nbytes` of a file or directory starting at `first`."""
        need = max(1, -(-nbytes // (self.ss * self.spc)))
        clusters = [first]
        while len(clusters) < need:
            value = self.next_cluster(clusters[-1])
            if value < 2 or self._end_of_chain(value) or value >= self.clusters + 2:
                raise FatError(f"{what}: cluster chain ends after {len(clusters)} of {need} "
                               f"clusters (FAT entry {clusters[-1]} = {value:#x})")  # fmt: skip
            if value in clusters:
                raise FatError(f"{what}: cluster chain loops at {value}")
            clusters.append(value)
        for c in clusters:
            if not 2 <= c < self.clusters + 2:
                raise FatError(f"{what}: cluster {c} is outside the volume")
        return clusters

    def _cluster_bytes(self, cluster: int) -> bytes:
        size = self.ss * self.spc
        return self._read((self.data_start + (cluster - 2) * self.spc) * self.ss, size)

    def _dir_bytes(self, entry: DirEntry | None) -> bytes:
        if entry is None and self.bits != 32:
            return self._read(self.root_start * self.ss, self.root_sectors * self.ss)
        first = self.root_cluster if entry is None else entry.cluster
        # A directory's size field is 0: follow its chain to the end (bounded).
        out = bytearray()
        cluster, seen = first, set()
        while 2 <= cluster < self.clusters + 2 and cluster not in seen:
            seen.add(cluster)
            out += self._cluster_bytes(cluster)
            if len(out) >= MAX_DIR_ENTRIES * 32:
                break
            cluster = self.next_cluster(cluster)
        return bytes(out)

    def listdir(self, entry: DirEntry | None = None) -> list[DirEntry]:
        """The live entries of a directory (the root if `entry` is None)."""
        data = self._dir_bytes(entry)
        found: list[DirEntry] = []
        lfn: list[tuple[int, int, bytes]] = []
        for pos in range(0, len(data) - 31, 32):
            raw = data[pos : pos + 32]
            if raw[0] == 0:
                break
            if raw[0] == 0xE5:
                lfn = []
                continue
            d = DIRENT.parse(raw)
            if d.attr & 0x3F == ATTR_LFN:
                lfn.append((raw[0], raw[13], raw[1:11] + raw[14:26] + raw[28:32]))
                continue
            long = _long_name(lfn, bytes(d.name))
            lfn = []
            if d.attr & ATTR_VOLUME:
                continue
            short = _short_name(bytes(d.name))
            cluster = (
                (int(d.cluster_hi) << 16 | int(d.cluster_lo))
                if self.bits == 32
                else int(d.cluster_lo)
            )
            found.append(DirEntry(long or short, short, int(d.attr), cluster, int(d.size)))
        return found

    def find(self, path: str) -> DirEntry:
        """The entry at `path` ("/EFI/BOOT/grubenv"), matched case-insensitively."""
        entry: DirEntry | None = None
        for part in [p for p in path.split("/") if p]:
            if entry is not None and not entry.is_dir:
                raise FatError(f"{path}: {entry.name} is not a directory")
            wanted = part.casefold()
            matches = [
                e for e in self.listdir(entry)
                if e.name.casefold() == wanted or e.short.casefold() == wanted
            ]  # fmt: skip
            if not matches:
                raise FatError(f"{path}: no {part!r} in its directory")
            entry = matches[0]
        if entry is None:
            raise FatError(f"{path}: not a file")
        return entry

    def read_file(self, path: str, limit: int) -> bytes:
        """The bytes of the file at `path`, at most `limit` (a larger file is refused)."""
        entry = self.find(path)
        if entry.is_dir:
            raise FatError(f"{path}: is a directory")
        if entry.size > limit:
            raise FatError(f"{path}: {entry.size} bytes, more than {limit}")
        if entry.size == 0:
            return b""
        out = bytearray()
        for cluster in self.chain(entry.cluster, entry.size, path):
            out += self._cluster_bytes(cluster)
        return bytes(out[: entry.size])


def _short_name(raw: bytes) -> str:
    base = raw[:8].rstrip(b" ")
    ext = raw[8:11].rstrip(b" ")
    if base[:1] == b"\x05":
        base = b"\xe5" + base[1:]
    name = base.decode("cp437")
    return f"{name}.{ext.decode('cp437')}" if ext else name


def _long_name(parts: list[tuple[int, int, bytes]], short: bytes) -> str:
    """The long name spelled by the LFN entries before a short entry, or "" when they
    do not belong to it (checksum or sequence wrong: the short name is used, as GRUB
    and the firmware do)."""
    if not parts:
        return ""
    checksum = 0
    for byte in short:
        checksum = (((checksum >> 1) | ((checksum & 1) << 7)) + byte) & 0xFF
    ordered = sorted(parts, key=lambda p: p[0] & 0x1F)
    seqs = [p[0] & 0x1F for p in ordered]
    if (
        seqs != list(range(1, len(seqs) + 1))
        or not ordered[-1][0] & 0x40
        or any(p[1] != checksum for p in ordered)
    ):
        return ""
    name = b"".join(p[2] for p in ordered).decode("utf-16-le", errors="replace")
    return name.split("\x00", 1)[0].rstrip("\uffff")
