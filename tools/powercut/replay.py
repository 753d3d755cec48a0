"""Power cuts as data, and the disk as a power cut would leave it.

A `Cut` says where the power failed in one boot's write log and what the disk kept:
every entry before the last completed flush (`durable`), plus the writes issued after
it that reached the media (`persisted`, some of them only in part: `torn`). What a
disk may keep is CrashMonkey's and dm-log-writes' model: a flush makes everything
completed before it durable; between flushes a disk with a volatile cache persists any
subset, in any order - so a later write may survive while an earlier one is lost - and
a write larger than a sector may be torn at sector boundaries. A sector that two
persisted writes touch ends with the later one (a cache never destages an older copy
over a newer one); a write that did not persist leaves the sector as it was.

`plan_cuts` chooses cuts from the logs' metadata only (pure, seeded): one at every
flush (the power fails while the flush is in flight, so the whole window before it is
at stake), seeded random points between flushes, and each boot's end; each cut gets a
seeded subset strategy. `Replayer` builds the disks: one sparse working copy per boot,
moved forward along the log, with a cut's extra writes applied on top and undone
afterwards - so a campaign of hundreds of cuts costs one copy per boot and the bytes
of each window, not a disk copy per cut.

Invariants: the same seed and logs give the same cuts; a cut never persists anything
after its point or loses anything before its last flush; `Replayer.replayed` restores
the working copy exactly (the next cut starts from the durable state); after the last
entry of a log the working copy is the disk QEMU left (checked by the campaign).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.powercut.writelog import Entry, WriteLog, apply, runs

Strategy = str  # "none" | "all" | "random" | "in-order-torn"
STRATEGIES: tuple[Strategy, ...] = ("none", "all", "random", "in-order-torn")


@dataclass(frozen=True)
class Region:
    """A named range of disk sectors (a partition, a GPT copy)."""

    name: str
    first: int
    end: int  # exclusive

    def touches(self, entry: Entry) -> bool:
        return entry.is_write and entry.sector < self.end and entry.end > self.first


@dataclass(frozen=True)
class Cut:
    """The power fails in boot `boot` before entry `at` completes (see the module doc)."""

    boot: int
    at: int
    durable: int  # entries [0, durable) are on the media: through the last flush
    persisted: tuple[int, ...]  # entries in [durable, at) whose data reached the media
    torn: Mapping[int, tuple[int, ...]] = field(default_factory=dict)  # entry -> sectors kept
    kind: str = "flush"  # flush | between | end
    strategy: Strategy = "none"
    seq: int = 0  # its number among the boot's cuts: names are unique

    @property
    def name(self) -> str:
        return f"boot{self.boot}.{self.seq}@{self.at}-{self.strategy}"

    def pending(self) -> range:
        """Indices of the entries at stake: issued after the last flush, before the cut."""
        return range(self.durable, self.at)

    def applied(self) -> Iterator[tuple[int, tuple[int, ...] | None]]:
        """(entry index, sector offsets kept or None for all) of what the cut adds."""
        for index in self.persisted:
            yield index, self.torn.get(index)


def durable_before(entries: Sequence[Entry], at: int) -> int:
    """The number of entries on the media when the power fails before entry `at`: all
    of them up to and including the last flush before `at`."""
    for i in range(at - 1, -1, -1):
        if entries[i].is_flush:
            return i + 1
    return 0


def choose_subset(
    entries: Sequence[Entry], durable: int, at: int, strategy: Strategy, rng: random.Random
) -> tuple[tuple[int, ...], dict[int, tuple[int, ...]]]:
    """The writes of [durable, at) a disk kept under `strategy`, and the torn ones."""
    pending = [e for e in entries[durable:at] if e.is_write]
    torn: dict[int, tuple[int, ...]] = {}
    if strategy == "none" or not pending:
        return (), torn
    if strategy == "all":
        return tuple(e.index for e in pending), torn
    if strategy == "in-order-torn":
        # A disk that writes in order and loses power inside write k: k is torn.
        k = rng.randrange(len(pending))
        kept = pending[: k + 1]
        last = kept[-1]
        if last.nr_sectors > 1:
            torn[last.index] = tuple(range(rng.randrange(1, last.nr_sectors)))
        return tuple(e.index for e in kept), torn
    if strategy != "random":
        raise ValueError(f"unknown strategy {strategy!r}")
    kept = [e for e in pending if rng.random() < 0.5] or [rng.choice(pending)]
    multi = [e for e in kept if e.nr_sectors > 1]
    if multi:
        victim = rng.choice(multi)
        torn[victim.index] = tear(victim.nr_sectors, rng)
    return tuple(e.index for e in kept), torn


def tear(nr_sectors: int, rng: random.Random) -> tuple[int, ...]:
    """Sector offsets of a torn write that reached the media: a prefix, or any proper
    non-empty subset (a device without an atomic-write guarantee beyond one sector)."""
    if rng.random() < 0.5:
        return tuple(range(rng.randrange(1, nr_sectors)))
    kept = [i for i in range(nr_sectors) if rng.random() < 0.5]
    if not kept:
        kept = [rng.randrange(nr_sectors)]
    if len(kept) == nr_sectors:
        kept.pop(rng.randrange(nr_sectors))
    return tuple(kept)


def plan_cuts(
    logs: Mapping[int, Sequence[Entry]],
    seed: int,
    *,
    between: int = 1,
    focus: Sequence[Region] = (),
    focus_extra: int = 2,
    per_writes: int = 40,
) -> list[Cut]:
    """The cuts of a campaign over the boots' logs (boot number -> entries), seeded.

    Every flush is a cut point, each boot's end is one, and `between` random points
    inside every window of two or more writes; a window that writes to a `focus`
    region (grubenv, GPT, journal) gets `focus_extra` more points and as many more
    subsets at its flush, since a
    torn or reordered write there is what could brick a node, and a long window (a slot
    image written between two flushes) one more per `per_writes` writes. Strategies
    are drawn from `STRATEGIES`, seeded.
    """
    rng = random.Random(seed)
    cuts: list[Cut] = []
    for boot in sorted(logs):
        entries = logs[boot]
        points: list[tuple[int, str]] = []
        start = 0
        for e in entries:
            if not e.is_flush:
                continue
            window = entries[start : e.index]
            writes = [w for w in window if w.is_write]
            points.append((e.index, "flush"))
            extra = between + len(writes) // per_writes
            if any(r.touches(w) for r in focus for w in writes):
                extra += focus_extra
                points += [(e.index, "flush")] * focus_extra  # more subsets of it
            if len(writes) >= 2:
                for _ in range(extra):
                    points.append((rng.randrange(start + 1, e.index), "between"))
            start = e.index + 1
        if start < len(entries):  # writes after the last flush: the boot's end
            points.append((len(entries), "end"))
        for seq, (at, kind) in enumerate(points, start=1):
            durable = durable_before(entries, at)
            strategy = rng.choice(STRATEGIES) if kind != "end" else "random"
            persisted, torn = choose_subset(entries, durable, at, strategy, rng)
            cuts.append(Cut(boot, at, durable, persisted, torn, kind, strategy, seq))
    return cuts


class Replayer:
    """One boot's disk, rebuilt cut by cut from the disk before the boot and its log.

    Cuts must come in increasing `durable` order; `replayed(cut)` yields the path of the
    disk as the cut left it, valid until the `with` block ends.
    """

    def __init__(self, before: Path, log: WriteLog, disk: Path) -> None:
        disk.unlink(missing_ok=True)
        subprocess.run(
            ["cp", "--sparse=always", "--reflink=auto", str(before), str(disk)], check=True
        )
        self.log = log
        self.disk = disk
        self.fd = os.open(disk, os.O_RDWR)
        self.sectors = os.fstat(self.fd).st_size // log.sector_size
        self.durable = 0  # entries applied to the working copy

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, upto: int) -> None:
        """Apply every entry before `upto` (in log order) to the working copy."""
        if upto < self.durable:
            raise ValueError(f"cut at {upto} is before the working copy's {self.durable}")
        for entry in self.log.entries[self.durable : upto]:
            apply(self.fd, self.log, entry, disk_sectors=self.sectors)
        self.durable = upto

    @contextlib.contextmanager
    def replayed(self, cut: Cut) -> Iterator[Path]:
        self.advance(cut.durable)
        ss = self.log.sector_size
        undo: list[tuple[int, bytes]] = []
        try:
            for index, sectors in cut.applied():
                entry = self.log.entries[index]
                if not entry.is_write:
                    continue
                kept = range(entry.nr_sectors) if sectors is None else sorted(sectors)
                for first, count in runs(list(kept)):
                    offset = (entry.sector + first) * ss
                    undo.append((offset, os.pread(self.fd, count * ss, offset)))
                apply(self.fd, self.log, entry, sectors, disk_sectors=self.sectors)
            yield self.disk
        finally:
            for offset, data in reversed(undo):
                os.pwrite(self.fd, data, offset)

    def content_key(self, cut: Cut, region: Region) -> tuple[object, ...]:
        """What determines `region`'s bytes on the cut's disk (for caching digests)."""
        entries = self.log.entries
        durable = tuple(e.index for e in entries[: cut.durable] if region.touches(e))
        extra = tuple((i, cut.torn.get(i)) for i in cut.persisted if region.touches(entries[i]))
        return (cut.boot, region.name, durable, extra)
