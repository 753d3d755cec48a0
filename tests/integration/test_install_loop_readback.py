"""The read-back behind the writer on a real block device: a loop device (its own page
cache, `losetup` without direct I/O) over a GPT image, written through its partition node.

The image file behind the loop device is the "device": changing a byte in it after the
block was written back, and before it is read back, is what a device returning other
bytes than it was given looks like to the agent. The loop device's page cache still
holds the block as written, so only a read-back that really goes to the device (O_DIRECT
on the partition node) sees the change. The moment comes from
`readback.before_read_back` (the fault-injection seam; no device-mapper here).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator

import pytest

from tests.integration.test_install_loop import LoopDisk
from tests.integration.test_install_loop import loop_disk as loop_disk  # the fixture
from updater import readback
from updater.install import BLOCK_SIZE, ReadBackMismatch, SlotGuard, write_image
from updater.slots import PartitionTarget

pytestmark = pytest.mark.root


@pytest.fixture
def loop(request: pytest.FixtureRequest) -> LoopDisk:
    disk: LoopDisk = request.getfixturevalue("loop_disk")
    return disk


IMAGE = random.Random(11).randbytes(3 * BLOCK_SIZE + 999)


def node_target(disk: LoopDisk, slot: str, number: int) -> PartitionTarget:
    node, _offset, size = disk.parts[number]
    return PartitionTarget(slot, "root", f"root-{slot.lower()}", node, 0, size)


def chunks() -> Iterator[bytes]:
    for i in range(0, len(IMAGE), 1 << 16):
        yield IMAGE[i : i + (1 << 16)]


def install(disk: LoopDisk) -> None:
    write_image(
        chunks(),
        node_target(disk, "B", 3),
        compression="none",
        raw_length=len(IMAGE),
        raw_sha256=hashlib.sha256(IMAGE).hexdigest(),
        guard=SlotGuard([node_target(disk, "A", 2)]),
    )


def test_a_byte_the_device_changed_is_caught_past_the_loop_cache(
    loop: LoopDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = 2 * BLOCK_SIZE + 4242
    _node, part_offset, _size = loop.parts[3]
    cached: list[bytes] = []

    def change_backing_file(_t: PartitionTarget, position: int, length: int) -> None:
        if position <= at < position + length:
            fd = os.open(loop.image, os.O_RDWR)
            try:
                old = os.pread(fd, 1, part_offset + at)
                os.pwrite(fd, bytes([old[0] ^ 1]), part_offset + at)
                os.fsync(fd)
            finally:
                os.close(fd)
            # What a read through the loop device's cache would still return.
            with open(loop.parts[3][0], "rb", buffering=0) as f:
                f.seek(at)
                cached.append(f.read(1))

    monkeypatch.setattr(readback, "before_read_back", change_backing_file)
    with pytest.raises(ReadBackMismatch, match=f"at byte {at} "):
        install(loop)
    # The loop device's cache did hold the byte as written: a read-back served from
    # it would have passed.
    assert cached == [IMAGE[at : at + 1]]


def test_install_through_the_partition_node_reads_every_block_back(
    loop: LoopDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    monkeypatch.setattr(readback, "before_read_back", lambda _t, pos, _n: seen.append(pos))
    install(loop)
    assert seen == [0, BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE]
    _node, offset, _size = loop.parts[3]
    with loop.image.open("rb") as f:
        f.seek(offset)
        assert f.read(len(IMAGE)) == IMAGE
