"""The `gptprio` bootloader backend: slots chosen by GPT partition attribute bits.

The ChromeOS / CoreOS / Bottlerocket convention (what `cgpt` reads and writes): each
slot's boot (or root) partition entry carries priority (bits 48-51), tries (52-55) and
successful (56). A slot will boot iff `(priority > 0 and tries > 0) or successful`; the
firmware/bootloader boots the highest priority that will boot and decrements `tries`.

| transition | bits |
| --- | --- |
| `try_next(s)` | `s` priority=2 tries=1 successful=0, the other priority=1 |
| `commit(s)` | `s` successful=1, priority raised to 1 if it was 0 |
| `invalidate(s)` | `s` priority=0 tries=0 successful=0 |
| `fall_back(s)` | `invalidate(s)`, then `try_next` and `commit` of the other slot |

Invariants: a `GptPrioState` is immutable and its transitions (`mark_state`,
`mark_primary` on a `GptDisk`) do no I/O; the backend reads the GPT once per `load`
(both copies, every partition of the slots found) and `write` commits it with one
`write_gpt` (backup table first, then primary), or writes nothing when the table is
the one loaded (so repeating a step is harmless). A transition on a table read with a
damaged copy makes the next write heal it. Bits other than these three are never
changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from core.errors import ConfigError
from updater.boot.base import REGISTRY, BootContext, BootState, SlotState, fall_back_from
from updater.disk.gpt import GptDisk, Partition, read_gpt, write_gpt
from updater.slots import SLOTS, other


def will_boot(p: Partition) -> bool:
    return (p.priority > 0 and p.tries > 0) or p.successful


def partition_state(p: Partition) -> SlotState:
    if p.successful:
        return SlotState.GOOD
    if p.priority > 0 and p.tries > 0:
        return SlotState.TRYING
    return SlotState.BAD


def mark_state(disk: GptDisk, label: str, good: bool) -> GptDisk:
    """Commit (`good`) or invalidate the partition called `label` (no I/O)."""
    p = disk.find(label)
    if good:
        changed = p.with_boot_attrs(successful=True, priority=max(p.priority, 1))
    else:
        changed = p.with_boot_attrs(priority=0, tries=0, successful=False)
    return disk.replace(changed)


def mark_primary(disk: GptDisk, label: str, other_label: str) -> GptDisk:
    """Boot `label` next with one try, not yet good; the other stays the fallback."""
    p = disk.find(label)
    disk = disk.replace(p.with_boot_attrs(priority=2, tries=1, successful=False))
    q = disk.find(other_label)
    return disk.replace(q.with_boot_attrs(priority=1))


@dataclass(frozen=True)
class GptPrioState:
    """The GPT as it will be written (`table`) and as it was loaded (`loaded`);
    `labels`: slot -> the PARTLABEL carrying its bits."""

    table: GptDisk
    loaded: GptDisk
    labels: Mapping[str, str]

    def _label(self, slot: str) -> str:
        if slot not in self.labels:
            raise ConfigError(f"gptprio: unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self.labels[slot]

    def _with(self, table: GptDisk) -> GptPrioState:
        # What will be written is whole: both copies are written from this table.
        return dataclasses.replace(self, table=dataclasses.replace(table, damaged=[]))

    def state(self, slot: str) -> SlotState:
        return partition_state(self.table.find(self._label(slot)))

    def primary(self) -> str | None:
        bootable = [(self.table.find(self.labels[s]), s) for s in SLOTS]
        # Highest priority wins; on a tie, slot order (as the firmware scans entries).
        ranked = sorted((-p.priority, i, s) for i, (p, s) in enumerate(bootable) if will_boot(p))
        return ranked[0][2] if ranked else None

    def invalidate(self, slot: str) -> GptPrioState:
        return self._with(mark_state(self.table, self._label(slot), False))

    def try_next(self, slot: str) -> GptPrioState:
        label = self._label(slot)
        return self._with(mark_primary(self.table, label, self._label(other(slot))))

    def commit(self, slot: str) -> GptPrioState:
        return self._with(mark_state(self.table, self._label(slot), True))

    def fall_back(self, slot: str) -> GptPrioState:
        return fall_back_from(self, slot)


class GptPrioBootloader:
    """Loads and writes the boot bits in the GPT of `ctx.disk`."""

    name = "gptprio"

    def __init__(self, ctx: BootContext) -> None:
        missing = [s for s in SLOTS if not ctx.slot_partitions.get(s)]
        if missing:
            raise ConfigError(f"gptprio: no partition label for slot(s) {', '.join(missing)}")
        labels = [ctx.slot_partitions[s] for s in SLOTS]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"gptprio: slots share the partition {labels[0]!r}")
        self.disk: Path = ctx.disk
        self.labels = {s: ctx.slot_partitions[s] for s in SLOTS}

    def load(self) -> GptPrioState:
        table = read_gpt(self.disk)
        for label in self.labels.values():
            table.find(label)  # GPTError naming the disk and the label if it is not there
        return GptPrioState(table, table, MappingProxyType(self.labels))

    def write(self, state: BootState) -> GptPrioState:
        if not isinstance(state, GptPrioState):
            raise TypeError(f"gptprio: cannot write a {type(state).__name__}")
        if state.table == state.loaded:
            return state
        write_gpt(self.disk, state.table)
        return dataclasses.replace(state, loaded=state.table)


REGISTRY["gptprio"] = GptPrioBootloader
