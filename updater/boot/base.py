"""The bootloader backend Protocol and the registry the config's `bootloader` key selects.

Four operations, as in RAUC's bootloader backends (DESIGN.md, "Bootloader backends"):

| operation | meaning |
| --- | --- |
| `get_state(slot)` | GOOD (committed), TRYING (primary, boot not yet confirmed), BAD |
| `set_state(slot, good)` | commit a slot, or invalidate it so it will not boot |
| `get_primary()` | the slot the bootloader will boot next, or None if none will boot |
| `set_primary(slot)` | boot `slot` next with one try, not yet good; the other stays fallback |

Invariants: every mutating call is one atomic write of the bootloader metadata (temp
file + fsync + rename for grubenv; backup-then-primary GPT for gptprio) and is
idempotent; a backend never touches a slot's contents.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class SlotState(enum.Enum):
    GOOD = "good"
    TRYING = "trying"
    BAD = "bad"


@dataclass(frozen=True)
class BootContext:
    """What a backend needs to find its metadata."""

    disk: Path  # whole disk or disk image file (gptprio edits its GPT)
    grubenv: Path | None  # grubenv file (grub backend)
    # slot -> PARTLABEL of the partition whose GPT attributes carry the slot's
    # priority/tries/successful bits (the slot's `boot` role if it has one, else `root`).
    slot_partitions: Mapping[str, str] = field(default_factory=dict)


class Bootloader(Protocol):
    name: str

    def get_state(self, slot: str) -> SlotState: ...

    def set_state(self, slot: str, good: bool) -> None: ...

    def get_primary(self) -> str | None: ...

    def set_primary(self, slot: str) -> None: ...


BootloaderFactory = Callable[[BootContext], Bootloader]

# Filled by the backend modules (see `updater.boot.registry`).
REGISTRY: dict[str, BootloaderFactory] = {}
