"""Judge a replayed node disk on the host: would it boot a complete signed release, and
can the agent carry on?

For one disk image (as a power cut left it) `judge_disk` checks, with the project's
own readers where the node would use them and independent ones elsewhere:

* the GPT reads (`updater.disk.gpt.read_gpt`: primary, or the backup - noted);
* the ESP's BOOTX64.EFI is byte for byte the one installed (what the firmware loads);
* the grubenv as GRUB would read it (`tools.powercut.fat`, which follows the FAT the
  way GRUB does), the slot GRUB's script would boot (`grubmodel.grub_decide`, with
  each slot's /boot/vmlinuz looked up by debugfs), or for a gptprio disk the slot the
  chooser would take (`grubmodel.gptprio_decide` on the GPT bits);
* that slot holds a complete image whose sha256 is a signed release's;
* the agent can carry on: its strict grubenv parser reads the block
  (`updater.disk.grubenv.parse_grubenv`), the data partition passes the check the
  node's boot runs before mounting it (`e2fsck -p`, else `e2fsck -y`: systemd-fsck
  with fsck.repair=yes; a torn superblock needs the -y) and
  `updater.state.load_journal` - the agent's own code, with its fallbacks - loads
  journal.json (copied out with debugfs, no mount).

A `Verdict` sorts what it found: `bricks` (the node would not boot a complete signed
release: no GPT, no bootloader, no slot, or a slot that is not a signed image),
`stuck` (it boots, but the agent cannot run or cannot commit: it would never update
again), and `notes` (survivable: a damaged GPT copy, a lost update, FAT lost
clusters, a journal recovered from its backup, a journal claim the disk contradicts).

Invariants: the disk is only read (tools work on extracted copies in `work`); every
check's failure is caught and reported in the verdict, never raised, so one bad disk
cannot stop a campaign; digests go through `digest`, which the campaign caches.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UpdaterError
from tools.powercut.fat import FatError, FatVolume
from tools.powercut.grubmodel import gptprio_decide, grub_decide
from tools.powercut.replay import Region
from updater.disk.gpt import GptDisk, read_gpt
from updater.disk.grubenv import parse_grubenv
from updater.state import load_journal

SLOT_LABELS = {"A": "root_a", "B": "root_b"}
GRUBENV = "/EFI/BOOT/grubenv"
BOOTX64 = "/EFI/BOOT/BOOTX64.EFI"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Release:
    """A signed (or factory) release image: what a slot must hold byte for byte."""

    version: str
    size: int
    sha256: str


@dataclass
class Verdict:
    cut: str
    variant: str
    chosen: str | None = None  # the slot the boot chain would start
    passes: int = 1
    said: tuple[str, ...] = ()
    holds: str | None = None  # the release the chosen slot holds
    grubenv: dict[str, str] | None = None
    journal: dict[str, Any] = field(default_factory=dict)
    bricks: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bricks and not self.stuck and not self.lost

    def summary(self) -> str:
        state = "BRICK" if self.bricks else "STUCK" if self.stuck else "LOST" if self.lost else "ok"
        what = "; ".join(self.bricks + self.stuck + self.lost + self.notes)
        return f"{self.cut}: {state}: boots {self.chosen} ({self.holds})" + (
            f": {what}" if what else ""
        )


Digest = Callable[[Path, Region, int], str]


@dataclass(frozen=True)
class DurableGrubenv:
    """What the grubenv must hold after a cut: the block of the agent's last write
    whose fsyncs completed (`written`: its log entry, `flushed`: the flush that ended
    them), or a block the agent was writing when the power failed."""

    blocks: tuple[bytes, ...]
    written: str
    flushed: str


def _env_text(raw: bytes) -> str:
    from tools.powercut.grubmodel import grub_load_env

    env = grub_load_env(raw) or {}
    return " ".join(f"{k}={v}" for k, v in env.items())


def sha256_region(disk: Path, region: Region, length: int, sector: int = 512) -> str:
    """sha256 of the first `length` bytes of `region` of `disk`."""
    h = hashlib.sha256()
    with disk.open("rb") as f:
        f.seek(region.first * sector)
        left = length
        while left > 0:
            chunk = f.read(min(left, CHUNK))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def extract(disk: Path, offset: int, size: int, out: Path) -> Path:
    """Copy `size` bytes at `offset` of `disk` into the sparse file `out` (holes kept)."""
    out.unlink(missing_ok=True)
    src = os.open(disk, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(dst, size)
        pos, end = offset, offset + size
        while pos < end:
            try:
                data = os.lseek(src, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            if data >= end:
                break
            hole = min(os.lseek(src, data, os.SEEK_HOLE), end)
            while data < hole:
                chunk = os.pread(src, min(hole - data, CHUNK), data)
                if not chunk:
                    break
                os.pwrite(dst, chunk, data - offset)
                data += len(chunk)
            pos = hole
    finally:
        os.close(src)
        os.close(dst)
    return out


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)


def has_kernel(disk: Path, region: Region, sector: int = 512) -> bool:
    """Whether the ext4 in `region` has /boot/vmlinuz (what the script's `-f` tests)."""
    out = _run("debugfs", "-R", "stat /boot/vmlinuz", f"{disk}?offset={region.first * sector}")
    return out.stdout.lstrip().startswith("Inode:")


def regions(gpt: GptDisk) -> dict[str, Region]:
    """The partitions of a GPT as sector regions, by name."""
    return {p.name: Region(p.name, p.first_lba, p.last_lba + 1) for p in gpt.partitions}


def judge_disk(
    disk: Path,
    *,
    cut: str,
    variant: str,
    releases: Mapping[str, Release],
    bootloader_sha256: str,
    work: Path,
    digest: Digest = sha256_region,
    durable_grubenv: DurableGrubenv | None = None,
) -> Verdict:
    """Everything `judge_disk` checks (see the module docstring), as a `Verdict`.

    `durable_grubenv`: the blocks the grubenv may hold because the agent's write of the
    first one had completed its fsyncs before the cut (the others were being written
    when the power failed); a grubenv holding anything else lost a durable write."""
    v = Verdict(cut, variant)
    work.mkdir(parents=True, exist_ok=True)
    try:
        gpt = read_gpt(disk)
    except UpdaterError as err:
        v.bricks.append(f"no readable GPT ({err})")
        return v
    v.notes += [f"GPT: {d}" for d in gpt.damaged]
    parts = regions(gpt)
    missing = [n for n in ("esp", "data", *SLOT_LABELS.values()) if n not in parts]
    if missing:
        v.bricks.append(f"GPT has no partition {', '.join(missing)}")
        return v
    raw_env = _check_esp(disk, parts["esp"], bootloader_sha256, v, work)
    if durable_grubenv is not None and raw_env not in durable_grubenv.blocks:
        v.lost.append(
            f"the grubenv does not hold the block the agent wrote at {durable_grubenv.written} "
            f"although its fsyncs had completed (flush {durable_grubenv.flushed})"
            + (f"; it holds {_env_text(raw_env)}" if raw_env else "")
        )
    slot_digests: dict[str, str | None] = {}

    def holds(slot: str) -> str | None:
        if slot not in slot_digests:
            slot_digests[slot] = None
            for release in releases.values():
                if digest(disk, parts[SLOT_LABELS[slot]], release.size) == release.sha256:
                    slot_digests[slot] = release.version
                    break
        return slot_digests[slot]

    if variant == "gptprio":
        v.chosen = gptprio_decide(gpt, SLOT_LABELS)
        if v.chosen is None:
            v.bricks.append("no slot the gptprio chooser would boot")
    else:
        kernels = {s: has_kernel(disk, parts[label]) for s, label in SLOT_LABELS.items()}
        decision = grub_decide(raw_env, kernels)
        v.chosen, v.passes, v.said = decision.slot, decision.passes, decision.said
        if v.chosen is None:
            v.bricks.append(f"GRUB boots no slot: {decision.said[-1]}")
        elif decision.passes > 1:
            v.notes.append(f"GRUB finds no slot on the first boot, boots {v.chosen} after a reset")
    if v.chosen is not None:
        v.holds = holds(v.chosen)
        if v.holds is None:
            v.bricks.append(f"slot {v.chosen} would boot but holds no complete signed release")
    _check_journal(disk, parts["data"], v, work, holds)
    return v


def _check_esp(
    disk: Path, esp: Region, bootloader_sha256: str, v: Verdict, work: Path
) -> bytes | None:
    """Checks the bootloader and reads the grubenv's bytes (None if GRUB could not)."""
    fd = os.open(disk, os.O_RDONLY)
    raw: bytes | None = None
    try:
        try:
            fat = FatVolume(fd, esp.first * 512)
        except (FatError, ValueError) as err:
            v.bricks.append(f"ESP is not a FAT filesystem ({err})")
            return None
        try:
            efi = fat.read_file(BOOTX64, 64 << 20)
            if hashlib.sha256(efi).hexdigest() != bootloader_sha256:
                v.bricks.append(f"{BOOTX64} is not the bootloader that was installed")
        except FatError as err:
            v.bricks.append(f"firmware cannot read {BOOTX64} ({err})")
        try:
            raw = fat.read_file(GRUBENV, 1 << 20)
        except FatError as err:
            v.notes.append(f"grubenv unreadable ({err})")
    finally:
        os.close(fd)
    if raw is not None:
        try:
            v.grubenv = parse_grubenv(raw, GRUBENV)
        except UpdaterError as err:
            v.stuck.append(f"the agent cannot parse the grubenv ({err})")
    image = extract(disk, esp.first * 512, (esp.end - esp.first) * 512, work / "esp.img")
    fsck = _run("fsck.fat", "-n", image)
    if fsck.returncode != 0:
        lines = [x for x in fsck.stdout.splitlines()[1:] if x.strip() and "Leaving" not in x]
        v.notes.append("fsck.fat: " + " | ".join(lines[:3]))
    image.unlink()
    return raw


def _check_journal(
    disk: Path, data: Region, v: Verdict, work: Path, holds: Callable[[str], str | None]
) -> None:
    image = extract(disk, data.first * 512, (data.end - data.first) * 512, work / "data.img")
    try:
        # What the node's boot does before it mounts the data partition (systemd-fsck
        # with fsck.repair=yes; the e2e init): `e2fsck -p`, and `e2fsck -y` when that
        # refuses - e.g. a torn superblock, whose checksum the kernel's mount rejects.
        check = _run("e2fsck", "-p", image)
        if check.returncode >= 4:
            said = (x.replace(f"{image}:", "").strip() for x in check.stdout.splitlines())
            first = next((x for x in said if x), "")
            repair = _run("e2fsck", "-fy", image)
            if repair.returncode >= 4:
                v.stuck.append(
                    f"data partition: e2fsck -p exit {check.returncode}, e2fsck -y exit "
                    f"{repair.returncode}: it cannot be mounted"
                )
                return
            v.notes.append(
                f"data partition: e2fsck -p refused (exit {check.returncode}: "
                f"{first.strip()[:60]}); e2fsck -y repaired it"
            )
        state = work / "state"
        state.mkdir(exist_ok=True)
        for name in ("journal.json", "journal.json.bak"):
            (state / name).unlink(missing_ok=True)
            _run("debugfs", "-R", f"dump /{name} {state / name}", image)
        try:
            journal = load_journal(state)
        except Exception as err:  # the agent's loader must never raise: that is the finding
            v.stuck.append(f"updater.state.load_journal raised {type(err).__name__}: {err}")
            return
        v.journal = journal.to_json()
        if journal.last_error:
            v.notes.append(f"journal: {journal.last_error}")
        for slot, record in journal.slots.items():
            held = holds(slot)
            if held != record.version:
                v.notes.append(
                    f"journal says slot {slot} holds {record.version}, it holds {held} "
                    "(the agent re-verifies before it reuses or activates a slot)"
                )
    finally:
        image.unlink(missing_ok=True)


def verdict_json(v: Verdict) -> dict[str, Any]:
    """A verdict as a JSON document (the campaign's report)."""
    doc = dict(v.__dict__)
    doc["said"] = list(v.said)
    out: dict[str, Any] = json.loads(json.dumps(doc, default=str))
    return out
