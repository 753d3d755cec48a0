"""The bootloader backend Protocols: the boot state is a value, loaded once, written once.

As Bottlerocket's signpost `State`: a backend `load()`s its metadata (a grubenv, the
GPT attribute bits) as an immutable `BootState`; the transitions below return a new
value and never touch the disk; `Bootloader.write(value)` persists a value with ONE
atomic write of the bootloader metadata, and writes nothing when the value is what was
loaded. So every agent step - install's invalidation, an activation, a rollback, a
failed health check - is one load, pure transitions, one write.

| transition | meaning |
| --- | --- |
| `invalidate(slot)` | the slot will not boot (before it is overwritten; it failed) |
| `try_next(slot)` | boot the slot next with one try, not yet good; the other stays fallback |
| `commit(slot)` | the slot is good: the bootloader keeps booting it |
| `fall_back(slot)` | the slot failed: invalidate it; the other slot primary and committed |

| query | meaning |
| --- | --- |
| `state(slot)` | GOOD (committed), TRYING (booted once, not yet confirmed), BAD |
| `primary()` | the slot the bootloader will boot next, or None if none will boot |

Invariants: transitions are pure and total on the known slots (an unknown slot is a
`ConfigError`), and repeating one gives an equal value; `write` persists the value's
whole metadata in one step that a power cut leaves either before or after (temp file
+ fsync + rename for grubenv; backup-then-primary GPT for gptprio; for systemd-boot
fsync'd entry renames and one loader.conf replace, ordered so that every state in
between boots the old or the new choice), or nothing if the value equals what `load`
returned; a backend never touches a slot's contents. A value is written over what the
files hold at that moment: load, decide and write happen under the state directory's
lock (`updater.lock`), and the bootloader or the firmware only write at boot.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self, TypeVar

from updater.slots import other


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
    # priority/tries/successful bits (chosen by `updater.boot.registry.bits_partitions`).
    slot_partitions: Mapping[str, str] = field(default_factory=dict)
    # systemd-boot: the mounted ESP, and slot -> its boot entry's file relative to the
    # ESP, without a boot counter (`EFI/Linux/ab-A.efi`, `loader/entries/ab-a.conf`).
    esp: Path | None = None
    slot_entries: Mapping[str, str] = field(default_factory=dict)


class BootState(Protocol):
    """A backend's loaded metadata as an immutable value (see the module docstring)."""

    def state(self, slot: str) -> SlotState: ...

    def primary(self) -> str | None: ...

    def invalidate(self, slot: str) -> Self: ...

    def try_next(self, slot: str) -> Self: ...

    def commit(self, slot: str) -> Self: ...

    def fall_back(self, slot: str) -> Self: ...


class Bootloader(Protocol):
    name: str

    def load(self) -> BootState:
        """The metadata as it is on disk now (one read)."""
        ...

    def write(self, state: BootState) -> BootState:
        """Persist `state` with one atomic write - nothing if it is unchanged since it
        was loaded (or last written) - and return it as it now is on disk, the value
        the next transitions start from. `state` must come from this backend."""
        ...


_S = TypeVar("_S", bound=BootState)


def fall_back_from(state: _S, slot: str) -> _S:
    """`slot` failed: invalidated, and the other slot made primary and committed - the
    three steps of a rollback as one value, for every backend alike."""
    invalidated = state.invalidate(slot)  # first: an unknown slot is its ConfigError
    fallback = other(slot)
    return invalidated.try_next(fallback).commit(fallback)


BootloaderFactory = Callable[[BootContext], Bootloader]

# Filled by the backend modules (see `updater.boot.registry`).
REGISTRY: dict[str, BootloaderFactory] = {}
