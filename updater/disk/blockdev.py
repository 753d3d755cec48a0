"""Find the slots' partitions on a disk, and which slot the running system booted.

The disk's GPT (`updater.disk.gpt`) is the truth for names, GUIDs and byte ranges, for a
block device and a disk image file alike. On a block device the kernel's partition
nodes are preferred (found with pyudev through /sys, matched to GPT entries by number
and start sector, so they work whether or not udevd runs and whatever udev's database
holds); when there is no such node the partition is addressed as a byte range of the
whole disk. Either way the writer gets a `PartitionTarget` of the exact GPT size.

Invariants: a target's range is exactly its GPT entry's (first_lba..last_lba); a
partition node is only used when the kernel's view of it (start, size) agrees with
the GPT; `detect_booted_slot` is pure and never guesses - no evidence is an error.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError, GPTError, UpdateFailed
from updater.disk.gpt import GptDisk, Partition, read_gpt
from updater.slots import SLOTS, PartitionTarget

KERNEL_SECTOR = 512  # /sys/.../start and size are always in 512-byte units

SlotTargets = Mapping[str, Mapping[str, PartitionTarget]]


def is_block_device(path: Path) -> bool:
    """True iff `path` exists and is a block device (following symlinks)."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class PartitionNode:
    """A kernel partition device of a block device, as /sys describes it."""

    number: int  # PARTN: the 1-based GPT entry number
    node: Path
    start: int  # in 512-byte kernel sectors
    size: int  # in 512-byte kernel sectors
    devnum: str  # "major:minor"


def partition_nodes(disk: Path) -> dict[int, PartitionNode]:
    """Partition number -> kernel partition node of the block device `disk`.

    Reads /sys through pyudev; only PARTN, start and size are used, which the kernel
    itself provides (udev's ID_PART_ENTRY_* properties are absent when udevd does not
    run, e.g. in containers and early boot). Empty for a disk without partition nodes.
    """
    import pyudev  # imported here: only block devices need it, image files never do

    try:
        context = pyudev.Context()
        device = pyudev.Devices.from_device_file(context, str(disk))
        children = list(context.list_devices(subsystem="block", parent=device))
    except (pyudev.DeviceNotFoundError, OSError, ValueError) as err:
        raise UpdateFailed(f"cannot list the partitions of {disk} in /sys: {err}") from err
    nodes: dict[int, PartitionNode] = {}
    for child in children:
        if child.device_type != "partition" or child.device_node is None:
            continue
        try:
            number = int(child.properties.get("PARTN", ""))
            start = int(child.attributes.asint("start"))
            size = int(child.attributes.asint("size"))
        except (KeyError, ValueError):
            continue  # not a partition the kernel describes fully: use the GPT range
        devnum = f"{child.properties.get('MAJOR', '')}:{child.properties.get('MINOR', '')}"
        nodes[number] = PartitionNode(number, Path(child.device_node), start, size, devnum)
    return nodes


def _node_matches(node: PartitionNode | None, part: Partition, gpt: GptDisk) -> bool:
    if node is None or not is_block_device(node.node):
        return False
    start = part.first_lba * gpt.sector_size
    return (node.start * KERNEL_SECTOR, node.size * KERNEL_SECTOR) == (
        start,
        part.size_bytes(gpt.sector_size),
    )


def find_slot_partitions(
    disk: Path, slots: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, PartitionTarget]]:
    """slot -> role -> where that role's image goes, for the `slots` labels on `disk`.

    `slots` is the config's `[slots.A]` / `[slots.B]` (role -> PARTLABEL). A label not in
    the GPT is a ConfigError naming slot, role and disk.
    """
    gpt = read_gpt(disk)
    nodes = partition_nodes(disk) if is_block_device(disk) else {}
    result: dict[str, dict[str, PartitionTarget]] = {}
    for slot, roles in slots.items():
        result[slot] = {}
        for role, label in roles.items():
            try:
                part = gpt.find(label)
            except GPTError as err:
                raise ConfigError(
                    f"[slots.{slot}] {role} = {label!r}: no single partition named {label} "
                    f"on {disk} ({err})"
                ) from err
            node = nodes.get(part.number)
            size = part.size_bytes(gpt.sector_size)
            if _node_matches(node, part, gpt):
                assert node is not None
                path, offset = node.node, 0
            else:
                path, offset = disk, part.first_lba * gpt.sector_size
            result[slot][role] = PartitionTarget(
                slot=slot,
                role=role,
                label=label,
                path=path,
                offset=offset,
                size=size,
                partuuid=str(part.unique_guid).lower(),
            )
    return result


# --- which slot is booted ----------------------------------------------------------------

_SLOT_ARG = re.compile(r"^updater\.slot=(.*)$")


def _cmdline_args(cmdline: str) -> list[str]:
    # Kernel arguments are space separated; quoting only groups values, strip it.
    return [arg.replace('"', "") for arg in cmdline.split()]


def root_device_number(mountinfo: str) -> str | None:
    """The "major:minor" of the filesystem mounted at `/`, from /proc/self/mountinfo.

    The last mount of `/` wins (later mounts hide earlier ones).
    """
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == "/":
            found = fields[2]
    return found


def detect_booted_slot(
    cmdline: str,
    mountinfo: str,
    targets: SlotTargets,
    override: str = "auto",
    device_numbers: Mapping[Path, str] | None = None,
    loader_slot: str | None = None,
) -> str:
    """The slot the running system booted from, by the first evidence that exists:

    1. `override` "A" / "B" (the config's `booted_slot`);
    2. `updater.slot=X` on the kernel command line (our GRUB script passes it);
    3. `loader_slot`: the slot whose boot entry systemd-boot says it booted (its
       `LoaderEntrySelected` EFI variable, read by the caller);
    4. `root=PARTLABEL=...`, `root=PARTUUID=...` or `root=/dev/...` naming a slot's
       partition;
    5. the device mounted at `/` (major:minor from `mountinfo`) being a slot partition,
       with `device_numbers` mapping partition nodes to their "major:minor".

    Pure: the caller reads /proc (see `booted_slot`). No evidence -> UpdateFailed.
    """
    if override in SLOTS:
        return override
    if override != "auto":
        raise ConfigError(f"booted_slot {override!r} is not one of auto, {', '.join(SLOTS)}")
    args = _cmdline_args(cmdline)
    for arg in reversed(args):  # the kernel uses the last of repeated arguments
        match = _SLOT_ARG.match(arg)
        if match:
            if match.group(1) not in SLOTS:
                raise UpdateFailed(
                    f"kernel command line: updater.slot={match.group(1)!r} is not one of "
                    f"{', '.join(SLOTS)}"
                )
            return match.group(1)
    if loader_slot in SLOTS:
        return loader_slot
    roots = [arg[len("root=") :] for arg in args if arg.startswith("root=")]
    if roots:
        slot = _slot_of_root(roots[-1], targets)
        if slot is not None:
            return slot
    root_dev = root_device_number(mountinfo)
    if root_dev is not None and device_numbers:
        for slot, target in _all_targets(targets):
            if target.offset == 0 and device_numbers.get(target.path) == root_dev:
                return slot
    root_arg = f"root={roots[-1]}" if roots else "no root="
    raise UpdateFailed(
        "cannot tell which slot is booted: no updater.slot= on the kernel command line, "
        f"{root_arg} names no slot partition, and / (device {root_dev or 'unknown'}) is "
        'not a slot partition; set [device] booted_slot = "A" or "B" to override'
    )


def _all_targets(targets: SlotTargets) -> Iterable[tuple[str, PartitionTarget]]:
    for slot, roles in sorted(targets.items()):
        for _, target in sorted(roles.items()):
            yield slot, target


def _slot_of_root(root: str, targets: SlotTargets) -> str | None:
    kind, _, value = root.partition("=")
    if not value and not root.startswith("/dev/"):
        return None  # "root=PARTUUID=" names nothing; never match an empty GUID
    for slot, target in _all_targets(targets):
        if kind.upper() == "PARTLABEL" and value == target.label:
            return slot
        if kind.upper() == "PARTUUID" and value.lower() == target.partuuid:
            return slot
        if root.startswith("/dev/") and target.offset == 0 and Path(root) == target.path:
            return slot
    return None


def booted_slot(
    targets: SlotTargets, override: str = "auto", loader_slot: str | None = None
) -> str:
    """`detect_booted_slot` on this machine's /proc/cmdline and /proc/self/mountinfo."""
    try:
        cmdline = Path("/proc/cmdline").read_text()
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as err:
        raise UpdateFailed(f"cannot read /proc to find the booted slot: {err}") from err
    numbers: dict[Path, str] = {}
    for _, target in _all_targets(targets):
        if target.offset == 0:
            try:
                st = os.stat(target.path)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                numbers[target.path] = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return detect_booted_slot(cmdline, mountinfo, targets, override, numbers, loader_slot)
