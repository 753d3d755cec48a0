"""The GPT as data: `Partition` entries and the `GptDisk` table, and the one validation
every table passes, whether read from a disk or about to be written.

Nothing here does I/O (`updater.disk.gpt` reads and writes tables). Invariants: the
dataclasses are frozen - a change is a new table (`GptDisk.replace`, `with_boot_attrs`);
`GptDisk.validate` is the only statement of what a sane table is: the usable range
inside the disk and clear of the MBR, both headers and both entry arrays; every entry
inside the usable range, first <= last, no overlaps, unique numbers and unique GUIDs.
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from dataclasses import dataclass, field

from core.errors import GPTError
from updater.disk.gpt_format import DEFAULT_ENTRIES, ENTRY_SIZE, HEADER_SIZE, REVISION_1_0

EMPTY_TYPE = uuid.UUID(int=0)  # the type GUID of an unused entry


@dataclass(frozen=True)
class Partition:
    """One non-empty partition entry; `number` is its 1-based index in the entry array."""

    number: int
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    @property
    def priority(self) -> int:
        return (self.attributes >> 48) & 0xF

    @property
    def tries(self) -> int:
        return (self.attributes >> 52) & 0xF

    @property
    def successful(self) -> bool:
        return bool((self.attributes >> 56) & 1)

    def size_bytes(self, sector_size: int) -> int:
        return (self.last_lba - self.first_lba + 1) * sector_size

    def with_boot_attrs(
        self,
        *,
        priority: int | None = None,
        tries: int | None = None,
        successful: bool | None = None,
    ) -> Partition:
        """A copy with the ChromeOS-style boot bits changed; other bits are kept."""
        attrs = self.attributes
        for value, shift, what in ((priority, 48, "priority"), (tries, 52, "tries")):
            if value is None:
                continue
            if not 0 <= value <= 15:
                raise GPTError(f"partition {self.name!r}: {what} {value} is not in 0-15")
            attrs = (attrs & ~(0xF << shift)) | (value << shift)
        if successful is not None:
            attrs = (attrs & ~(1 << 56)) | (int(successful) << 56)
        return dataclasses.replace(self, attributes=attrs)


@dataclass(frozen=True)
class GptDisk:
    """A parsed (or planned) GPT. Change it in memory, then `write_gpt` commits it."""

    sector_size: int
    total_sectors: int
    disk_guid: uuid.UUID
    first_usable_lba: int
    last_usable_lba: int
    partitions: list[Partition]
    damaged: list[str] = field(default_factory=list)
    source: str = "<new>"
    num_entries: int = DEFAULT_ENTRIES
    entry_size: int = ENTRY_SIZE
    entries_lba: int = 2
    backup_lba: int = 0  # 0: the last sector
    backup_entries_lba: int = 0  # 0: just before the backup header
    # Kept as found so that parse -> build is byte-exact.
    revision: int = REVISION_1_0
    header_size: int = HEADER_SIZE
    header_reserved: int = 0
    header_tail: bytes = b""  # header sector bytes after the 92 interpreted ones
    raw_entries: tuple[bytes, ...] = ()
    mbr: bytes = b""

    def __post_init__(self) -> None:
        if self.backup_lba == 0:
            object.__setattr__(self, "backup_lba", self.total_sectors - 1)
        if self.backup_entries_lba == 0:
            object.__setattr__(
                self, "backup_entries_lba", self.backup_lba - self.entry_array_sectors
            )

    @property
    def entry_array_sectors(self) -> int:
        return -(-self.num_entries * self.entry_size // self.sector_size)

    def find(self, name: str) -> Partition:
        """The one partition called `name`; GPTError if there is none or several."""
        found = [p for p in self.partitions if p.name == name]
        if len(found) != 1:
            what = "no partition" if not found else f"{len(found)} partitions"
            raise GPTError(f"{self.source}: {what} named {name!r}")
        return found[0]

    def replace(self, p: Partition) -> GptDisk:
        """A copy with the entry numbered `p.number` replaced by (or set to) `p`."""
        if not 1 <= p.number <= self.num_entries:
            raise GPTError(f"{self.source}: no entry slot {p.number} (1-{self.num_entries})")
        parts = [q for q in self.partitions if q.number != p.number] + [p]
        return dataclasses.replace(self, partitions=sorted(parts, key=lambda q: q.number))

    def metadata_regions(self, *, backup: bool = True) -> list[tuple[str, int, int]]:
        """(what, first LBA, last LBA) of every sector the table itself occupies; the
        backup copy's only if `backup`."""
        array = self.entry_array_sectors
        regions = [
            ("protective MBR", 0, 0),
            ("primary header", 1, 1),
            ("primary entry array", self.entries_lba, self.entries_lba + array - 1),
        ]
        if backup:
            regions += [
                (
                    "backup entry array",
                    self.backup_entries_lba,
                    self.backup_entries_lba + array - 1,
                ),
                ("backup header", self.backup_lba, self.backup_lba),
            ]
        return regions

    def validate(self, *, backup: bool = True) -> None:
        """The one check of every table read (`read_gpt`) or written (`write_gpt`):
        refuse a table that a firmware would misread, or through which a write to a
        partition would reach the GPT itself or beyond the disk.

        * The usable range is non-empty, inside the disk, and clear of the protective
          MBR, both headers and both entry arrays, which are inside the disk and clear
          of each other. `backup=False` leaves out a backup copy the disk does not have
          (an image cut short: the header places it past the end); writing one back
          is checked with it, like every write.
        * Every entry has a number in the array and a type GUID, lies inside the usable
          range with first <= last sector; entries do not overlap; entry numbers and
          unique GUIDs (PARTUUIDs, which tell the booted slot) are unique.
        """
        where = self.source
        first, last = self.first_usable_lba, self.last_usable_lba
        if first > last:
            raise GPTError(f"{where}: usable range {first}-{last} is empty")
        regions = [("usable range", first, last), *self.metadata_regions(backup=backup)]
        for i, (what, lo, hi) in enumerate(regions):
            if hi >= self.total_sectors:
                span = f"{lo}-{hi}" if what == "usable range" else f"(LBA {lo}-{hi})"
                raise GPTError(
                    f"{where}: {what} {span} ends beyond the disk ({self.total_sectors} sectors)"
                )
            for other, olo, ohi in regions[:i]:
                if lo <= ohi and olo <= hi:
                    head = (
                        f"usable range {olo}-{ohi}"
                        if other == "usable range"
                        else (f"the {other} (LBA {olo}-{ohi})")
                    )
                    raise GPTError(f"{where}: {head} overlaps the {what} (LBA {lo}-{hi})")
        self._validate_entries()

    def _validate_entries(self) -> None:
        where = self.source
        first, last = self.first_usable_lba, self.last_usable_lba
        by_number: dict[int, Partition] = {}
        by_guid: dict[uuid.UUID, Partition] = {}
        for p in self.partitions:
            if not 1 <= p.number <= self.num_entries:
                raise GPTError(
                    f"{where}: partition {p.name!r} has entry number {p.number} "
                    f"(the table has entries 1-{self.num_entries})"
                )
            if (q := by_number.setdefault(p.number, p)) is not p:
                raise GPTError(
                    f"{where}: partitions {q.name!r} and {p.name!r} share the entry number "
                    f"{p.number}"
                )
            if p.type_guid == EMPTY_TYPE:
                raise GPTError(f"{where}: partition {_label(p)} has the empty type GUID")
            if p.first_lba > p.last_lba:
                raise GPTError(
                    f"{where}: partition {_label(p)} ends at sector {p.last_lba}, before its "
                    f"first sector {p.first_lba}"
                )
            if not first <= p.first_lba <= p.last_lba <= last:
                raise GPTError(
                    f"{where}: partition {_label(p)} sectors {p.first_lba}-{p.last_lba} are "
                    f"outside the usable range {first}-{last}"
                )
        ordered = sorted(self.partitions, key=lambda q: (q.first_lba, q.number))
        for prev, p in itertools.pairwise(ordered):
            # Sorted by first sector, each entry can only overlap its predecessor.
            if p.first_lba <= prev.last_lba:
                raise GPTError(
                    f"{where}: partitions {_label(prev, sectors=True)} and "
                    f"{_label(p, sectors=True)} overlap"
                )
        for p in sorted(self.partitions, key=lambda q: q.number):
            if (q := by_guid.setdefault(p.unique_guid, p)) is not p:
                raise GPTError(
                    f"{where}: partitions {_label(q)} and {_label(p)} have the same unique "
                    f"GUID {p.unique_guid}"
                )


def _label(p: Partition, *, sectors: bool = False) -> str:
    """How an error names an entry: `3 ('root_b')`, or `3 ('root_b', sectors 10-20)`."""
    extent = f", sectors {p.first_lba}-{p.last_lba}" if sectors else ""
    return f"{p.number} ({p.name!r}{extent})"
