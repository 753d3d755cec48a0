"""Environment failures while installing: a full filesystem, a read-only device.

Both are real: a 2 MiB tmpfs holding a sparse 40 MiB disk image runs out of space while
the writer thread writes; `losetup --read-only` gives a device that refuses writes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import UpdateFailed
from tests.conftest import run_tool
from updater.install import SlotGuard, WriteFailed, write_image
from updater.slots import PartitionTarget

pytestmark = pytest.mark.root

MiB = 1 << 20


def _image(size: int) -> bytes:
    return hashlib.shake_256(b"full disk").digest(size)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a tmpfs (run `make test` as root)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_filesystem_is_a_write_failure(tiny_fs: Path) -> None:
    disk = tiny_fs / "disk.img"
    with disk.open("wb") as f:
        f.truncate(40 * MiB)  # sparse: the blocks only run out when written
    image = _image(12 * MiB)
    slot_a = PartitionTarget("A", "root", "root-a", disk, MiB, 16 * MiB)
    slot_b = PartitionTarget("B", "root", "root-b", disk, 17 * MiB, 16 * MiB)
    with pytest.raises(WriteFailed, match=r"writing slot B root \(root-b, .*\) at byte \d+") as e:
        write_image(
            iter([image[i : i + MiB] for i in range(0, len(image), MiB)]),
            slot_b,
            compression="none",
            raw_length=len(image),
            raw_sha256=hashlib.sha256(image).hexdigest(),
            guard=SlotGuard([slot_a]),
        )
    assert isinstance(e.value, UpdateFailed)
    assert isinstance(e.value.__cause__, OSError)


def test_read_only_device_is_a_write_failure(tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    with backing.open("wb") as f:
        f.truncate(40 * MiB)
    device = Path(run_tool("losetup", "--read-only", "--find", "--show", backing).stdout.strip())
    try:
        slot_a = PartitionTarget("A", "root", "root-a", device, MiB, 16 * MiB)
        slot_b = PartitionTarget("B", "root", "root-b", device, 17 * MiB, 16 * MiB)
        image = _image(MiB)
        # Linux lets a read-only loop device be opened O_WRONLY; the first write fails.
        with pytest.raises(WriteFailed, match=r"writing slot B root \(root-b, /dev/loop"):
            write_image(
                iter([image]),
                slot_b,
                compression="none",
                raw_length=len(image),
                raw_sha256=hashlib.sha256(image).hexdigest(),
                guard=SlotGuard([slot_a]),
            )
    finally:
        run_tool("losetup", "-d", device, check=False)
    assert backing.read_bytes() == bytes(40 * MiB)
