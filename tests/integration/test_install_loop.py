"""The slot guard and the writer on a real block device: a loop device over a GPT image.

The GPT is made by sgdisk; `losetup -P` attaches it. In this container the kernel does
not always create the partition nodes on its own, so `partx -a` asks it to (a real
kernel partition, visible in /sys/class/block); only a missing /dev node is created
with mknod from the numbers sysfs gives. Partition offsets come from `sgdisk -i`, not
from the sysfs reading the guard itself uses.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.errors import SlotGuardError
from tests.conftest import run_tool
from updater.install import SlotGuard, WriteFailed, read_back_verify, write_image
from updater.slots import PartitionTarget

pytestmark = pytest.mark.root

MiB = 1 << 20
SECTOR = 512


@dataclass(frozen=True)
class LoopDisk:
    image: Path
    device: Path  # /dev/loopN
    parts: dict[int, tuple[Path, int, int]]  # number -> (node, byte offset, byte size)


def _partition_range(image: Path, number: int) -> tuple[int, int]:
    info = run_tool("sgdisk", "-i", str(number), image).stdout
    first = re.search(r"First sector: (\d+)", info)
    last = re.search(r"Last sector: (\d+)", info)
    assert first and last, info
    start = int(first.group(1))
    return start * SECTOR, (int(last.group(1)) - start + 1) * SECTOR


def _ensure_partition_nodes(device: Path, numbers: list[int]) -> list[Path]:
    """Make /dev/loopNpK exist; returns the nodes this function created with mknod."""
    name = device.name
    if not all(Path(f"/sys/class/block/{name}p{n}").exists() for n in numbers):
        run_tool("partx", "-a", device, check=False)
    created: list[Path] = []
    for n in numbers:
        sysfs = Path(f"/sys/class/block/{name}p{n}")
        assert sysfs.exists(), f"the kernel did not create partition {n} of {device}"
        node = Path(f"/dev/{name}p{n}")
        if not node.exists():
            major, minor = (int(x) for x in (sysfs / "dev").read_text().split(":"))
            os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
            created.append(node)
    return created


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[LoopDisk]:
    if os.geteuid() != 0:
        pytest.fail("loop device tests need root (run `make test` as root)")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    run_tool(
        "sgdisk",
        "-n1:2048:+4M", "-c1:esp",
        "-n2:0:+16M", "-c2:root-a",
        "-n3:0:+16M", "-c3:root-b",
        image,
    )  # fmt: skip
    device = Path(run_tool("losetup", "-P", "--find", "--show", image).stdout.strip())
    created: list[Path] = []
    try:
        created = _ensure_partition_nodes(device, [1, 2, 3])
        parts = {
            n: (Path(f"/dev/{device.name}p{n}"), *_partition_range(image, n)) for n in (1, 2, 3)
        }
        yield LoopDisk(image, device, parts)
    finally:
        for node in created:
            node.unlink(missing_ok=True)
        run_tool("losetup", "-d", device, check=False)


def _node_target(disk: LoopDisk, slot: str, number: int) -> PartitionTarget:
    node, _offset, size = disk.parts[number]
    return PartitionTarget(slot, "root", f"root-{slot.lower()}", node, 0, size)


def _offset_target(disk: LoopDisk, path: Path, slot: str, number: int) -> PartitionTarget:
    _node, offset, size = disk.parts[number]
    return PartitionTarget(slot, "root", f"root-{slot.lower()}", path, offset, size)


def test_partition_node_vs_whole_disk_at_offset(loop_disk: LoopDisk) -> None:
    guard = SlotGuard([_node_target(loop_disk, "A", 2)])  # booted: /dev/loopNp2
    # The same bytes through the whole disk, mislabelled as slot B.
    with pytest.raises(SlotGuardError, match="overlaps the booted slot A"):
        guard.check(_offset_target(loop_disk, loop_disk.device, "B", 2))
    # ... and through the image file behind the loop device.
    with pytest.raises(SlotGuardError, match="overlaps the booted slot A"):
        guard.check(_offset_target(loop_disk, loop_disk.image, "B", 2))
    # The whole disk from 0 covers everything.
    whole = PartitionTarget("B", "root", "x", loop_disk.device, 0, 64 * MiB - 34 * SECTOR)
    with pytest.raises(SlotGuardError, match="overlaps"):
        guard.check(whole)
    # Slot B's own partition, by node, by whole-disk offset, or in the file, is fine;
    # so is the ESP just before root-a (the partition start really is taken into account).
    guard.check(_offset_target(loop_disk, loop_disk.device, "B", 1))
    guard.check(_node_target(loop_disk, "B", 3))
    guard.check(_offset_target(loop_disk, loop_disk.device, "B", 3))
    guard.check(_offset_target(loop_disk, loop_disk.image, "B", 3))


def test_whole_disk_booted_vs_partition_node(loop_disk: LoopDisk) -> None:
    guard = SlotGuard([_offset_target(loop_disk, loop_disk.device, "A", 2)])
    with pytest.raises(SlotGuardError, match="overlaps the booted slot A"):
        guard.check(_node_target(loop_disk, "B", 2))
    guard.check(_node_target(loop_disk, "B", 3))


def test_write_through_partition_node_and_read_back(loop_disk: LoopDisk) -> None:
    image = bytes(range(256)) * (5 * MiB // 256) + b"tail"
    digest = hashlib.sha256(image).hexdigest()
    guard = SlotGuard([_node_target(loop_disk, "A", 2)])
    target = _node_target(loop_disk, "B", 3)
    result = write_image(
        iter([image[i : i + 100_000] for i in range(0, len(image), 100_000)]),
        target,
        compression="none",
        raw_length=len(image),
        raw_sha256=digest,
        guard=guard,
    )
    assert result.bytes_written == len(image)
    # What the device holds is in the image file at partition 3's offset, per sgdisk.
    _node, offset, _size = loop_disk.parts[3]
    with loop_disk.image.open("rb") as f:
        f.seek(offset)
        assert f.read(len(image)) == image
    read_back_verify(_offset_target(loop_disk, loop_disk.device, "B", 3), len(image), digest)
    # Booted slot A was never touched.
    _node, a_offset, a_size = loop_disk.parts[2]
    with loop_disk.image.open("rb") as f:
        f.seek(a_offset)
        assert f.read(a_size) == bytes(a_size)


def test_booted_partition_node_cannot_be_written(loop_disk: LoopDisk) -> None:
    guard = SlotGuard([_node_target(loop_disk, "A", 2)])
    data = b"\xff" * MiB
    booted_as_b = PartitionTarget("B", "root", "root-b", loop_disk.parts[2][0], 0, 16 * MiB)
    with pytest.raises(SlotGuardError):
        write_image(
            iter([data]),
            booted_as_b,
            compression="none",
            raw_length=len(data),
            raw_sha256=hashlib.sha256(data).hexdigest(),
            guard=guard,
        )
    _node, a_offset, a_size = loop_disk.parts[2]
    with loop_disk.image.open("rb") as f:
        f.seek(a_offset)
        assert f.read(a_size) == bytes(a_size)


def test_whole_disk_offset_write_while_booted_partition_is_claimed(loop_disk: LoopDisk) -> None:
    """On a node the booted root is mounted, which claims the whole disk as well; writing
    slot B through the whole disk at its offset must still work, and a claimed partition
    node must be refused."""
    booted_node = loop_disk.parts[2][0]
    held = os.open(booted_node, os.O_RDONLY | os.O_EXCL)  # what a mount does
    try:
        guard = SlotGuard([_node_target(loop_disk, "A", 2)])
        image = b"slot B through the whole disk " * 40_000
        digest = hashlib.sha256(image).hexdigest()
        target = _offset_target(loop_disk, loop_disk.device, "B", 3)
        write_image(
            iter([image]),
            target,
            compression="none",
            raw_length=len(image),
            raw_sha256=digest,
            guard=guard,
        )
        read_back_verify(_node_target(loop_disk, "B", 3), len(image), digest)
        # A claimed partition node is refused by the kernel (O_EXCL), even if a wrong
        # configuration made the guard accept it (here: a guard for another slot A).
        other_guard = SlotGuard([_node_target(loop_disk, "A", 1)])
        with pytest.raises(WriteFailed, match=r"cannot open .* for writing: Device or resource"):
            write_image(
                iter([image]),
                PartitionTarget("B", "root", "root-a", booted_node, 0, 16 * MiB),
                compression="none",
                raw_length=len(image),
                raw_sha256=digest,
                guard=other_guard,
            )
    finally:
        os.close(held)
