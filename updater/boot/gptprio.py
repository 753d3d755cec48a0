"""The `gptprio` bootloader backend: slots chosen by GPT partition attribute bits.

The ChromeOS / CoreOS / Bottlerocket convention (what `cgpt` reads and writes): each
slot's boot (or root) partition entry carries priority (bits 48-51), tries (52-55) and
successful (56). A slot will boot iff `(priority > 0 and tries > 0) or successful`; the
firmware/bootloader boots the highest priority that will boot and decrements `tries`.

Invariants: the state transitions (`mark_state`, `mark_primary`) are pure functions
on a `GptDisk`; the backend reads the GPT once per operation and commits it with one
`write_gpt` (backup table first, then primary), and writes nothing when the
operation changes nothing (so repeating a call is harmless). Bits other than these
three are never changed.
"""

from __future__ import annotations

from core.errors import ConfigError
from updater.boot.base import REGISTRY, BootContext, SlotState
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


class GptPrioBootloader:
    """The `Bootloader` Protocol over the GPT of `ctx.disk`."""

    name = "gptprio"

    def __init__(self, ctx: BootContext) -> None:
        missing = [s for s in SLOTS if not ctx.slot_partitions.get(s)]
        if missing:
            raise ConfigError(f"gptprio: no partition label for slot(s) {', '.join(missing)}")
        labels = [ctx.slot_partitions[s] for s in SLOTS]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"gptprio: slots share the partition {labels[0]!r}")
        self.disk = ctx.disk
        self.labels = {s: ctx.slot_partitions[s] for s in SLOTS}

    def _label(self, slot: str) -> str:
        if slot not in self.labels:
            raise ConfigError(f"gptprio: unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self.labels[slot]

    def _commit(self, before: GptDisk, after: GptDisk) -> None:
        if after.partitions != before.partitions or before.damaged:
            write_gpt(self.disk, after)

    def get_state(self, slot: str) -> SlotState:
        return partition_state(read_gpt(self.disk).find(self._label(slot)))

    def set_state(self, slot: str, good: bool) -> None:
        disk = read_gpt(self.disk)
        self._commit(disk, mark_state(disk, self._label(slot), good))

    def get_primary(self) -> str | None:
        disk = read_gpt(self.disk)
        bootable = [(disk.find(self.labels[s]), s) for s in SLOTS]
        # Highest priority wins; on a tie, slot order (as the firmware scans entries).
        ranked = sorted((-p.priority, i, s) for i, (p, s) in enumerate(bootable) if will_boot(p))
        return ranked[0][2] if ranked else None

    def set_primary(self, slot: str) -> None:
        disk = read_gpt(self.disk)
        self._commit(disk, mark_primary(disk, self._label(slot), self._label(other(slot))))


REGISTRY["gptprio"] = GptPrioBootloader
