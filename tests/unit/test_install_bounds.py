"""install: every pwrite and read-back pread stays inside the partition it was given.

Defense in depth: `check_image` already refuses an image longer than its partition, so
these tests switch that first check off (as a future bug in it would) and show that
the writer and the verifier still refuse to touch a byte outside the partition.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.errors import SlotGuardError
from updater import install
from updater.install import OutOfPartition, SlotGuard, read_back_verify, write_image
from updater.slots import PartitionTarget

MiB = 1 << 20
SLOT = 4 * MiB
NEIGHBOUR = b"\xa5"  # what the partition after slot B holds; must survive


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(1 * MiB + 2 * SLOT)
        f.seek(1 * MiB + 2 * SLOT)
        f.write(NEIGHBOUR * MiB)  # the partition right after slot B
    return path


def slots(disk: Path) -> tuple[PartitionTarget, PartitionTarget]:
    a = PartitionTarget("A", "root", "root-a", disk, 1 * MiB, SLOT)
    b = PartitionTarget("B", "root", "root-b", disk, 1 * MiB + SLOT, SLOT)
    return a, b


def no_first_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "_check_length", lambda target, raw_length: None)


@pytest.mark.parametrize("excess", [1, 4096, MiB + 1])
def test_write_past_the_partition_is_refused(
    disk: Path, monkeypatch: pytest.MonkeyPatch, excess: int
) -> None:
    a, b = slots(disk)
    image = hashlib.shake_256(b"too long").digest(SLOT + excess)
    no_first_check(monkeypatch)
    with pytest.raises(OutOfPartition, match=r"refusing to write bytes .* of slot B root") as e:
        write_image(
            iter([image[i : i + MiB] for i in range(0, len(image), MiB)]),
            b,
            compression="none",
            raw_length=len(image),
            raw_sha256=hashlib.sha256(image).hexdigest(),
            guard=SlotGuard([a]),
        )
    assert isinstance(e.value, SlotGuardError)
    with disk.open("rb") as f:
        f.seek(b.offset + b.size)
        assert f.read(MiB) == NEIGHBOUR * MiB  # not one byte past the end of B


def test_read_back_past_the_partition_is_refused(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = slots(disk)
    # The hash of the partition plus 4 KiB of its neighbour: it must not "verify".
    with disk.open("rb") as f:
        f.seek(b.offset)
        beyond = hashlib.sha256(f.read(b.size + 4096)).hexdigest()
    no_first_check(monkeypatch)
    with pytest.raises(OutOfPartition, match=r"refusing to read back bytes"):
        read_back_verify(b, b.size + 4096, beyond)


def test_inside_is_exactly_the_partition(disk: Path) -> None:
    _, b = slots(disk)
    assert install._inside(b, 0, b.size, "write") == b.offset
    assert install._inside(b, b.size, 0, "write") == b.offset + b.size
    for position, length in ((-1, 1), (0, b.size + 1), (b.size, 1), (b.size - 1, 2)):
        with pytest.raises(OutOfPartition):
            install._inside(b, position, length, "write")
