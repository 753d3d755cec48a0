"""The guard of every write to a slot: nothing is opened for writing that is, or
overlaps, a partition of the booted slot (`SlotGuard`), and the descriptor opened is
the file or device that was checked (`open_for_writing`).

Invariants:
- a target is compared with the booted partitions as the extents they really are: a
  partition node as its whole disk at the partition's start, a loop device as its
  backing file at the loop offset (sysfs); what cannot be resolved is refused (fail
  closed);
- `open_for_writing` checks the target, opens it, and compares the descriptor (fstat)
  with what was checked; a mounted or claimed partition node is refused (O_EXCL).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.errors import SlotGuardError
from updater.readback import WriteFailed
from updater.slots import PartitionTarget

_SECTOR = 512  # sysfs reports partition starts in 512-byte sectors, whatever the device


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


def identity(st: os.stat_result) -> tuple[str, int, int]:
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
        return Extent(identity(st), offset, offset + size)
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
        with (see `open_for_writing`), so what was checked is what gets written.
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


def open_for_writing(guard: SlotGuard, target: PartitionTarget) -> int:
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
        if identity(os.fstat(fd)) != identity(before):
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
