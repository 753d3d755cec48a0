"""Slots and the partitions that hold them: the vocabulary shared by every module.

A node has exactly two slots, "A" and "B". A slot is a set of partitions, one per image
role (`root`, `boot`, ...), named in the config by PARTLABEL. A `PartitionTarget` is the
byte range a role's image is written to: a partition device node (offset 0) where udev
runs, or a byte range inside the whole disk (or disk image file) otherwise - the writer
treats both the same way.

Invariants: slot names are exactly `SLOTS`; `other(slot)` is the one slot that is not
`slot`; a `PartitionTarget` never has a negative offset or a zero size.
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
