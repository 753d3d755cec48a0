"""updater.disk.blockdev on real block devices: a loop device over a sparse disk image.

With partition nodes (losetup -P, plus partx where the container's kernel did not scan),
targets are the kernel's partition nodes at offset 0; without them (no -P), targets
are byte ranges of the whole loop device - either way the same bytes of the image.
udevd does not need to run: names come from the GPT, nodes from /sys.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_tool
from updater.disk.blockdev import (
    booted_slot,
    detect_booted_slot,
    find_slot_partitions,
    is_block_device,
    partition_nodes,
)
from updater.slots import PartitionTarget

pytestmark = pytest.mark.root

SLOTS = {"A": {"root": "root_a"}, "B": {"root": "root_b"}}


def lay_out(disk: Path) -> None:
    run_tool(
        "sgdisk",
        "-n1:2048:+1M",
        "-c1:esp",
        "-n2:0:+8M",
        "-c2:root_a",
        "-n3:0:+8M",
        "-c3:root_b",
        disk,
    )


def attach(image: Path, *, partitions: bool) -> Iterator[Path]:
    args = ["--find", "--show", *(["-P"] if partitions else []), str(image)]
    device = Path(run_tool("losetup", *args).stdout.strip())
    try:
        if partitions and not partition_nodes(device):
            # Some container kernels do not rescan on attach; add the partitions the
            # way udev-less systems do, from the table on the device.
            run_tool("partx", "-a", device)
        yield device
    finally:
        run_tool("losetup", "-d", device)


@pytest.fixture
def loop_with_partitions(sparse_disk: Path) -> Iterator[Path]:
    lay_out(sparse_disk)
    yield from attach(sparse_disk, partitions=True)


@pytest.fixture
def loop_without_partitions(sparse_disk: Path) -> Iterator[Path]:
    lay_out(sparse_disk)
    yield from attach(sparse_disk, partitions=False)


def write_through(target: PartitionTarget, data: bytes) -> None:
    fd = os.open(target.path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, target.offset + target.size - len(data))  # last bytes of it
        os.fsync(fd)
    finally:
        os.close(fd)


def test_partition_nodes_are_used_on_a_block_device(
    loop_with_partitions: Path, sparse_disk: Path
) -> None:
    device = loop_with_partitions
    assert is_block_device(device)
    targets = find_slot_partitions(device, SLOTS)
    root_b = targets["B"]["root"]
    assert root_b.offset == 0 and is_block_device(root_b.path)
    assert root_b.path != device and root_b.size == 8 * 1024 * 1024
    # The node really is that partition: bytes written through it land at the GPT range.
    write_through(root_b, b"slot-B-end")
    image_targets = find_slot_partitions(sparse_disk, SLOTS)
    with sparse_disk.open("rb") as f:
        end = image_targets["B"]["root"].offset + image_targets["B"]["root"].size
        f.seek(end - 10)
        assert f.read(10) == b"slot-B-end"
    # The device number of the node identifies the booted slot from mountinfo.
    st = os.stat(root_b.path)
    devnum = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    mountinfo = f"27 1 {devnum} / / rw - ext4 {root_b.path} rw\n"
    numbers = {
        t.path: partition_nodes(device)[n].devnum
        for n, t in ((2, targets["A"]["root"]), (3, root_b))
    }
    assert numbers[root_b.path] == devnum
    assert detect_booted_slot("ro", mountinfo, targets, device_numbers=numbers) == "B"


def test_without_partition_nodes_the_whole_device_is_addressed(
    loop_without_partitions: Path, sparse_disk: Path
) -> None:
    device = loop_without_partitions
    assert partition_nodes(device) == {}
    targets = find_slot_partitions(device, SLOTS)
    image_targets = find_slot_partitions(sparse_disk, SLOTS)
    for slot in ("A", "B"):
        target = targets[slot]["root"]
        assert target.path == device
        assert (target.offset, target.size) == (
            image_targets[slot]["root"].offset,
            image_targets[slot]["root"].size,
        )
    write_through(targets["A"]["root"], b"slot-A-end")
    with sparse_disk.open("rb") as f:
        f.seek(image_targets["A"]["root"].offset + image_targets["A"]["root"].size - 10)
        assert f.read(10) == b"slot-A-end"


def test_booted_slot_reads_this_machines_proc(loop_with_partitions: Path) -> None:
    targets = find_slot_partitions(loop_with_partitions, SLOTS)
    # This machine did not boot from the loop device: only the override can answer,
    # and without it the answer is a clear error, not a guess.
    assert booted_slot(targets, "A") == "A"
    cmdline = Path("/proc/cmdline").read_text()
    if "updater.slot=" not in cmdline:
        from core.errors import UpdateFailed

        with pytest.raises(UpdateFailed, match="cannot tell which slot is booted"):
            booted_slot(targets)
