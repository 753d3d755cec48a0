"""The read-back behind the writer (updater.readback through install.write_image) on
sparse disk image files: on ext4 (read back with O_DIRECT) and on tmpfs (which refuses
O_DIRECT: read back through the cache after dropping it).

What the device holds is changed between a block's writeback and its read-back with
`readback.before_read_back`, the fault-injection seam: no real block device here
returns other bytes than it was given (no device-mapper in the test container), and a
file changed by another thread at some moment would be a race.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import UpdateFailed
from updater import readback
from updater.install import BLOCK_SIZE, ReadBackMismatch, SlotGuard, write_image
from updater.slots import PartitionTarget

MiB = 1 << 20
SLOT = 4 * BLOCK_SIZE
A_OFFSET = MiB
B_OFFSET = A_OFFSET + SLOT
IMAGE = random.Random(5).randbytes(2 * BLOCK_SIZE + 12345)  # three blocks, the last short
BOUND = 60.0  # seconds: a generous bound on waiting for the read-back thread


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunked(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture(params=["ext4", "tmpfs"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "tmpfs":
        # The O_DIRECT fallback path (tmpfs refuses O_DIRECT) must run, never skip.
        if not Path("/dev/shm").is_dir():
            pytest.fail("no /dev/shm tmpfs: the read-back's fallback path cannot be tested")
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            yield _make_disk(Path(d))
    else:
        yield _make_disk(tmp_path)


def _make_disk(where: Path) -> Path:
    path = where / "disk.img"
    with path.open("wb") as f:
        f.truncate(B_OFFSET + SLOT + MiB)
    return path


def target(name: str, disk: Path, offset: int, size: int = SLOT) -> PartitionTarget:
    return PartitionTarget(name, "root", f"root-{name.lower()}", disk, offset, size)


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records (position, length) of every block read back behind the writer."""
    seen: list[tuple[int, int]] = []

    def record(_t: PartitionTarget, position: int, length: int) -> None:
        seen.append((position, length))

    monkeypatch.setattr(readback, "before_read_back", record)
    return seen


def corrupt_on_read_back(
    monkeypatch: pytest.MonkeyPatch, path: Path, at: int
) -> list[tuple[int, int]]:
    """Flip byte `at` of the image (in `path`, slot B) just before its block is read back."""
    seen: list[tuple[int, int]] = []

    def flip(t: PartitionTarget, position: int, length: int) -> None:
        seen.append((position, length))
        if position <= at < position + length:
            fd = os.open(path, os.O_RDWR)
            try:
                old = os.pread(fd, 1, t.offset + at)
                os.pwrite(fd, bytes([old[0] ^ 0x40]), t.offset + at)
                os.fsync(fd)
            finally:
                os.close(fd)

    monkeypatch.setattr(readback, "before_read_back", flip)
    return seen


def install(disk: Path, image: bytes, chunks: Iterator[bytes] | None = None) -> None:
    write_image(
        chunked(image) if chunks is None else chunks,
        target("B", disk, B_OFFSET),
        compression="none",
        raw_length=len(image),
        raw_sha256=sha(image),
        guard=SlotGuard([target("A", disk, A_OFFSET)]),
    )


def test_every_block_is_read_back_in_order(disk: Path, hook: list[tuple[int, int]]) -> None:
    install(disk, IMAGE)
    assert hook == [(0, BLOCK_SIZE), (BLOCK_SIZE, BLOCK_SIZE), (2 * BLOCK_SIZE, 12345)]
    with disk.open("rb") as f:
        f.seek(B_OFFSET)
        assert f.read(len(IMAGE)) == IMAGE


@pytest.mark.parametrize("at", [0, BLOCK_SIZE + 4097, len(IMAGE) - 1])
def test_a_byte_changed_on_the_device_fails_the_install(
    disk: Path, monkeypatch: pytest.MonkeyPatch, at: int
) -> None:
    """The stream and its sha256 are right; the device returns one other byte."""
    seen = corrupt_on_read_back(monkeypatch, disk, at)
    with pytest.raises(ReadBackMismatch) as info:
        install(disk, IMAGE)
    assert isinstance(info.value, UpdateFailed)
    message = str(info.value)
    assert f"at byte {at} " in message and "slot B root (root-b" in message
    assert not [t for t in threading.enumerate() if t.name.startswith("image-")]
    # Nothing after the bad block was compared: the first difference is the error.
    assert seen[-1][0] <= at < seen[-1][0] + seen[-1][1]


def test_read_back_runs_while_the_stream_is_still_coming(
    disk: Path, hook: list[tuple[int, int]]
) -> None:
    """The stream holds back its last block until the first one has been read back:
    only a read-back overlapped with the writing lets this install finish."""

    def stream() -> Iterator[bytes]:
        yield from chunked(IMAGE[: 2 * BLOCK_SIZE])
        waited = threading.Event()
        for _ in range(int(BOUND / 0.01)):
            if hook:
                break
            waited.wait(0.01)
        assert hook, f"no block was read back within {BOUND:.0f} s while writing"
        yield from chunked(IMAGE[2 * BLOCK_SIZE :])

    install(disk, IMAGE, stream())
    assert hook[0] == (0, BLOCK_SIZE) and len(hook) == 3


def test_unaligned_tail_at_the_partition_end_is_read_back(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image filling a partition whose size is not a multiple of 4 KiB: its tail
    cannot be read with O_DIRECT rounded up inside the partition; it is still checked."""
    size = BLOCK_SIZE + 512 * 3
    image = IMAGE[:size]
    part = target("B", disk, B_OFFSET, size)
    corrupt_on_read_back(monkeypatch, disk, size - 1)
    guard = SlotGuard([target("A", disk, A_OFFSET)])
    with pytest.raises(ReadBackMismatch, match=f"at byte {size - 1} "):
        write_image(
            chunked(image),
            part,
            compression="none",
            raw_length=size,
            raw_sha256=sha(image),
            guard=guard,
        )
    monkeypatch.setattr(readback, "before_read_back", None)
    write_image(
        chunked(image), part, compression="none", raw_length=size, raw_sha256=sha(image),
        guard=guard,
    )  # fmt: skip
