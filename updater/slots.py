"""Slots and the partitions that hold them: the vocabulary shared by every module.

A node has exactly two slots, "A" and "B". A slot is a set of partitions, one per image
role (`root`, `boot`, ...), named in the config by PARTLABEL. A `PartitionTarget` is the
byte range a role's image is written to: a partition device node (offset 0) where udev
runs, or a byte range inside the whole disk (or disk image file) otherwise - the writer
treats both the same way.

A role may instead be a file on the EFI system partition (`uki = "file:EFI/Linux/ab-B.efi"`
in the config): with Unified Kernel Images the kernel of a slot lives there, not in the
slot's partitions. A `FileTarget` names it; its image is the whole file, replaced by
temp file + fsync + rename (`updater.fileimage`).

Invariants: slot names are exactly `SLOTS`; `other(slot)` is the one slot that is not
`slot`; a `PartitionTarget` never has a negative offset or a zero size; a `FileTarget`'s
path is relative (below its `root`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SLOTS: tuple[str, str] = ("A", "B")


def other(slot: str) -> str:
    """The other slot of the pair."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


@dataclass(frozen=True)
class PartitionTarget:
    """Where one role of one slot lives: `size` bytes at `offset` in `path`."""

    slot: str
    role: str
    label: str  # PARTLABEL (GPT partition name)
    path: Path  # a partition device node, or the whole disk / disk image file
    offset: int  # byte offset of the partition inside `path` (0 for a partition node)
    size: int  # bytes
    partuuid: str = ""  # unique GUID of the partition, lower case

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size <= 0:
            raise ValueError(f"bad partition range offset={self.offset} size={self.size}")

    def describe(self) -> str:
        where = str(self.path) if self.offset == 0 else f"{self.path}@{self.offset}"
        return f"slot {self.slot} {self.role} ({self.label}, {where})"


FILE_PREFIX = "file:"


def is_file_role(value: str) -> bool:
    """Whether a `[slots.X]` value names a file (`file:PATH`) rather than a PARTLABEL."""
    return value.startswith(FILE_PREFIX)


def file_path(value: str) -> str:
    """The path of a `file:PATH` role value, relative to the ESP."""
    return value[len(FILE_PREFIX) :]


@dataclass(frozen=True)
class FileTarget:
    """Where one role of one slot lives as a file: `root / path` (`root` the ESP mount).

    `entry`: the file is the slot's systemd-boot entry (a UKI in EFI/Linux/), whose name
    carries a boot counter - the writer finds its current name (`sdboot.current_entry_file`).
    `size`: the most it may hold (the free space of its filesystem when it was planned)."""

    slot: str
    role: str
    root: Path
    path: str
    size: int
    entry: bool = False

    @property
    def label(self) -> str:
        return FILE_PREFIX + self.path

    def describe(self) -> str:
        return f"slot {self.slot} {self.role} (file {self.root / self.path})"


Target = PartitionTarget | FileTarget
