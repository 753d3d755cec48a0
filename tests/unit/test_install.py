"""install.write_image / read_back_verify / SlotGuard on sparse disk image files.

Streams are real zstd / xz / gzip made with the libraries; the disk is a sparse file
with the slots at byte offsets, as on a node without partition device nodes.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import lzma
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.decompress import ZSTD_MAX_WINDOW, CorruptStream
from core.errors import DeviceError, SlotGuardError, UpdateFailed, UpdateRejected
from updater.install import (
    BLOCK_SIZE,
    ImageRejected,
    ReadBackMismatch,
    SlotGuard,
    WriteFailed,
    read_back_verify,
    write_image,
)
from updater.slots import PartitionTarget

MiB = 1 << 20
SLOT_SIZE = 16 * MiB
A_OFFSET = 1 * MiB
B_OFFSET = A_OFFSET + SLOT_SIZE
FILLER = b"\x5a"  # what the partition held before; must survive past raw_length


def make_image(size: int, seed: int = 4) -> bytes:
    """Semi-compressible content: random, zero and text blocks, deterministic."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.randrange(1, 64 * 1024)
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            out += bytes(n)
        else:
            out += (f"line {rng.random()} of a config file\n" * (n // 30 + 1)).encode()[:n]
    return bytes(out[:size])


def compress(data: bytes, compression: str) -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    if compression == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    if compression == "gzip":
        return gzip.compress(data)
    return data


def chunked(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def slot(name: str, disk: Path, offset: int, size: int = SLOT_SIZE) -> PartitionTarget:
    return PartitionTarget(name, "root", f"root-{name.lower()}", disk, offset, size)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A sparse 40 MiB disk image whose slot B is filled with FILLER."""
    path = tmp_path / "disk.img"
    with path.open("wb") as f:
        f.truncate(40 * MiB)
        f.seek(B_OFFSET)
        f.write(FILLER * SLOT_SIZE)
    return path


@pytest.fixture
def guard(disk: Path) -> SlotGuard:
    return SlotGuard([slot("A", disk, A_OFFSET)])


def read_range(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


IMAGE = make_image(3 * MiB + 12345)  # not a multiple of the block size


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip", "none"])
def test_each_compression_is_written_and_verified(
    disk: Path, guard: SlotGuard, compression: str
) -> None:
    target = slot("B", disk, B_OFFSET)
    calls: list[tuple[int, int]] = []
    result = write_image(
        chunked(compress(IMAGE, compression)),
        target,
        compression=compression,
        raw_length=len(IMAGE),
        raw_sha256=sha(IMAGE),
        guard=guard,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.bytes_written == len(IMAGE)
    assert result.raw_sha256 == sha(IMAGE)
    assert result.compressed_bytes == len(compress(IMAGE, compression))
    assert read_range(disk, B_OFFSET, len(IMAGE)) == IMAGE
    # The rest of the partition is left as it was, and slot A is untouched.
    rest = SLOT_SIZE - len(IMAGE)
    assert read_range(disk, B_OFFSET + len(IMAGE), rest) == FILLER * rest
    assert read_range(disk, A_OFFSET, SLOT_SIZE) == bytes(SLOT_SIZE)
    assert calls[0] == (0, len(IMAGE))
    assert calls[-1] == (len(IMAGE), len(IMAGE))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_failure_after_several_blocks_stops_the_threads(
    disk: Path, guard: SlotGuard, compression: str
) -> None:
    """A stream failing after blocks went through the writer thread: the error
    propagates and no hashing/writing thread is left behind."""
    image = make_image(3 * BLOCK_SIZE + 777, seed=3)
    data = compress(image, compression)

    def failing() -> Iterator[bytes]:
        yield data[: len(data) * 3 // 4]
        raise UpdateRejected("connection dropped for good")

    with pytest.raises(UpdateRejected, match="dropped for good"):
        write_image(
            failing(),
            slot("B", disk, B_OFFSET),
            compression=compression,
            raw_length=len(image),
            raw_sha256=sha(image),
            guard=guard,
        )
    assert not [t for t in threading.enumerate() if t.name.startswith("image-")]
    # The next install into the same slot works.
    write_image(
        chunked(data, 100_003),
        slot("B", disk, B_OFFSET),
        compression=compression,
        raw_length=len(image),
        raw_sha256=sha(image),
        guard=guard,
    )
    assert read_range(disk, B_OFFSET, len(image)) == image


SMALL = make_image(200_000, seed=9)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    compression=st.sampled_from(["zstd", "xz", "gzip", "none"]),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30),
)
def test_any_chunking_gives_the_same_image(
    disk: Path, guard: SlotGuard, compression: str, cuts: list[int]
) -> None:
    data = compress(SMALL, compression)
    # Repeated cuts give empty chunks, which an HTTP stack may yield too.
    bounds = sorted([0, len(data), *(c % (len(data) + 1) for c in cuts)])
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    target = slot("B", disk, B_OFFSET)
    write_image(
        iter(chunks),
        target,
        compression=compression,
        raw_length=len(SMALL),
        raw_sha256=sha(SMALL),
        guard=guard,
    )
    assert read_range(disk, B_OFFSET, len(SMALL)) == SMALL


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip"])
def test_concatenated_members_and_frames(disk: Path, guard: SlotGuard, compression: str) -> None:
    parts = [IMAGE[:MiB], IMAGE[MiB : 2 * MiB + 7], IMAGE[2 * MiB + 7 :]]
    data = b"".join(compress(p, compression) for p in parts)
    write_image(
        chunked(data, 10_000),
        slot("B", disk, B_OFFSET),
        compression=compression,
        raw_length=len(IMAGE),
        raw_sha256=sha(IMAGE),
        guard=guard,
    )
    assert read_range(disk, B_OFFSET, len(IMAGE)) == IMAGE


def test_stream_error_midway_propagates(disk: Path, guard: SlotGuard) -> None:
    data = compress(IMAGE, "zstd")
    boom = UpdateRejected("target root.img.zst: sha256 mismatch")
    calls: list[tuple[int, int]] = []

    def stream() -> Iterator[bytes]:
        yield data[: len(data) // 2]
        raise boom

    with pytest.raises(UpdateRejected) as info:
        write_image(
            stream(),
            slot("B", disk, B_OFFSET),
            compression="zstd",
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
            progress=lambda d, t: calls.append((d, t)),
        )
    assert info.value is boom
    assert (len(IMAGE), len(IMAGE)) not in calls


def test_error_raised_by_the_last_chunk_fails_the_write(disk: Path, guard: SlotGuard) -> None:
    """The repository raises only when the iterator ends: all bytes written, still an error."""

    def stream() -> Iterator[bytes]:
        yield from chunked(IMAGE)
        raise UpdateRejected("length or hash mismatch at end of stream")

    with pytest.raises(UpdateRejected, match="end of stream"):
        write_image(
            stream(),
            slot("B", disk, B_OFFSET),
            compression="none",
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


def test_wrong_raw_sha256_is_an_error_after_the_write(disk: Path, guard: SlotGuard) -> None:
    wrong = sha(b"another image")
    with pytest.raises(ImageRejected) as info:
        write_image(
            chunked(compress(IMAGE, "gzip")),
            slot("B", disk, B_OFFSET),
            compression="gzip",
            raw_length=len(IMAGE),
            raw_sha256=wrong,
            guard=guard,
        )
    message = str(info.value)
    assert sha(IMAGE) in message and wrong in message and "slot B" in message


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_too_long_stream_is_aborted_early(disk: Path, guard: SlotGuard, compression: str) -> None:
    raw_length = BLOCK_SIZE + MiB + 3
    endless = make_image(10 * raw_length, seed=1)
    data = compress(endless, compression)
    pulled = 0

    def stream() -> Iterator[bytes]:
        nonlocal pulled
        for chunk in chunked(data):
            pulled += len(chunk)
            yield chunk

    with pytest.raises(ImageRejected, match="more than raw_length"):
        write_image(
            stream(),
            slot("B", disk, B_OFFSET),
            compression=compression,
            raw_length=raw_length,
            raw_sha256=sha(endless[:raw_length]),
            guard=guard,
        )
    # Stopped within a couple of MiB of input; the first full block was written, the
    # block that overflowed raw_length was not, nor anything after it.
    assert pulled < raw_length + 2 * MiB
    assert read_range(disk, B_OFFSET, BLOCK_SIZE) == endless[:BLOCK_SIZE]
    rest = SLOT_SIZE - BLOCK_SIZE
    assert read_range(disk, B_OFFSET + BLOCK_SIZE, rest) == FILLER * rest


def test_image_larger_than_partition_is_refused_before_writing(
    disk: Path, guard: SlotGuard
) -> None:
    pulled = False

    def stream() -> Iterator[bytes]:
        nonlocal pulled
        pulled = True
        yield b"x"

    before = disk.stat().st_mtime_ns
    with pytest.raises(ImageRejected, match=r"does not fit slot B root \(root-b"):
        write_image(
            stream(),
            slot("B", disk, B_OFFSET),
            compression="none",
            raw_length=SLOT_SIZE + 1,
            raw_sha256=sha(b""),
            guard=guard,
        )
    assert not pulled
    assert disk.stat().st_mtime_ns == before


def test_short_stream_is_rejected(disk: Path, guard: SlotGuard) -> None:
    with pytest.raises(ImageRejected, match=f"ended after {len(IMAGE)} of {len(IMAGE) + 1}"):
        write_image(
            chunked(compress(IMAGE, "xz")),
            slot("B", disk, B_OFFSET),
            compression="xz",
            raw_length=len(IMAGE) + 1,
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


def test_truncated_zstd_is_rejected(disk: Path, guard: SlotGuard) -> None:
    data = compress(IMAGE, "zstd")
    with pytest.raises(UpdateRejected):
        write_image(
            chunked(data[: len(data) - 100]),
            slot("B", disk, B_OFFSET),
            compression="zstd",
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip"])
def test_corrupt_stream_is_rejected(disk: Path, guard: SlotGuard, compression: str) -> None:
    data = bytearray(compress(IMAGE, compression))
    for i in range(0, 64, 4):  # the header region: format errors, not just a bad hash
        data[i] ^= 0xFF
    with pytest.raises(CorruptStream, match=f"slot B.*{compression}"):
        write_image(
            chunked(bytes(data)),
            slot("B", disk, B_OFFSET),
            compression=compression,
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


def test_zstd_window_beyond_the_cap_is_rejected(disk: Path, guard: SlotGuard) -> None:
    """A frame may demand a window of up to 2 GiB; the decoder refuses more than the cap."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=26)  # 64 MiB
    # Streamed (size unknown), so zstd cannot shrink the window to the input size.
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = compressor.compress(IMAGE) + compressor.flush()
    assert zstandard.get_frame_parameters(data).window_size > ZSTD_MAX_WINDOW
    with pytest.raises(CorruptStream, match="window of at most 32 MiB"):
        write_image(
            chunked(data),
            slot("B", disk, B_OFFSET),
            compression="zstd",
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_truncated_xz_and_gzip_report_truncation(
    disk: Path, guard: SlotGuard, compression: str
) -> None:
    data = compress(IMAGE, compression)
    with pytest.raises(CorruptStream, match="truncated"):
        write_image(
            chunked(data[:-9]),
            slot("B", disk, B_OFFSET),
            compression=compression,
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


def test_trailing_garbage_is_rejected(disk: Path, guard: SlotGuard) -> None:
    with pytest.raises(UpdateRejected):
        write_image(
            chunked(compress(IMAGE, "gzip") + b"garbage after the last member"),
            slot("B", disk, B_OFFSET),
            compression="gzip",
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


def test_unknown_compression_is_rejected(disk: Path, guard: SlotGuard) -> None:
    with pytest.raises(ImageRejected, match="unknown compression 'lz4'"):
        write_image(
            chunked(IMAGE),
            slot("B", disk, B_OFFSET),
            compression="lz4",
            raw_length=len(IMAGE),
            raw_sha256=sha(IMAGE),
            guard=guard,
        )


def test_read_back_detects_corruption(disk: Path, guard: SlotGuard) -> None:
    target = slot("B", disk, B_OFFSET)
    write_image(
        chunked(IMAGE),
        target,
        compression="none",
        raw_length=len(IMAGE),
        raw_sha256=sha(IMAGE),
        guard=guard,
    )
    read_back_verify(target, len(IMAGE), sha(IMAGE))  # usable on its own: passes
    with disk.open("r+b") as f:
        f.seek(B_OFFSET + len(IMAGE) - 1)
        f.write(bytes([IMAGE[-1] ^ 1]))
        f.flush()
        os.fsync(f.fileno())
    tampered = IMAGE[:-1] + bytes([IMAGE[-1] ^ 1])
    with pytest.raises(ReadBackMismatch) as info:
        read_back_verify(target, len(IMAGE), sha(IMAGE))
    message = str(info.value)
    assert "slot B root (root-b" in message
    assert sha(IMAGE) in message and sha(tampered) in message
    assert isinstance(info.value, UpdateFailed)


def test_read_back_of_a_short_file_fails(tmp_path: Path) -> None:
    short = tmp_path / "short.img"
    short.write_bytes(b"abc")
    with pytest.raises(ReadBackMismatch, match="ends after 3 of 10 bytes"):
        read_back_verify(slot("B", short, 0), 10, sha(b"x"))


def test_partition_beyond_end_of_disk_file_fails(tmp_path: Path, guard: SlotGuard) -> None:
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    with pytest.raises(WriteFailed, match="has only 1048576 bytes"):
        write_image(
            chunked(SMALL),
            slot("B", small, 0, 2 * MiB),
            compression="none",
            raw_length=len(SMALL),
            raw_sha256=sha(SMALL),
            guard=guard,
        )
    assert small.read_bytes() == bytes(MiB)  # pwrite would have grown it


def test_missing_target_is_an_environment_failure(tmp_path: Path, guard: SlotGuard) -> None:
    with pytest.raises(SlotGuardError, match="cannot check"):
        write_image(
            chunked(SMALL),
            slot("B", tmp_path / "nope.img", 0),
            compression="none",
            raw_length=len(SMALL),
            raw_sha256=sha(SMALL),
            guard=guard,
        )


# --- the guard on files ----------------------------------------------------------------


def test_guard_refuses_the_booted_slot_itself(disk: Path, guard: SlotGuard) -> None:
    booted = slot("A", disk, A_OFFSET)
    with pytest.raises(SlotGuardError, match="slot A is the booted slot"):
        guard.check(booted)
    with pytest.raises(SlotGuardError):
        write_image(
            chunked(SMALL),
            booted,
            compression="none",
            raw_length=len(SMALL),
            raw_sha256=sha(SMALL),
            guard=guard,
        )
    assert read_range(disk, A_OFFSET, SLOT_SIZE) == bytes(SLOT_SIZE)


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (A_OFFSET, SLOT_SIZE),  # same range, mislabelled as slot B
        (A_OFFSET + SLOT_SIZE - 1, SLOT_SIZE),  # last byte of A
        (0, A_OFFSET + 1),  # first byte of A
        (A_OFFSET + MiB, MiB),  # inside A
        (0, 40 * MiB),  # the whole disk
    ],
)
def test_guard_refuses_overlapping_ranges(
    disk: Path, guard: SlotGuard, offset: int, size: int
) -> None:
    with pytest.raises(SlotGuardError, match="overlaps the booted slot A"):
        guard.check(slot("B", disk, offset, size))


def test_guard_sees_through_other_names_of_the_same_file(
    tmp_path: Path, disk: Path, guard: SlotGuard
) -> None:
    link = tmp_path / "link.img"
    link.symlink_to(disk)
    hard = tmp_path / "hard.img"
    os.link(disk, hard)
    for alias in (link, hard):
        with pytest.raises(SlotGuardError, match="overlaps"):
            guard.check(slot("B", alias, A_OFFSET, MiB))


def test_guard_allows_adjacent_range_and_other_file(
    tmp_path: Path, disk: Path, guard: SlotGuard
) -> None:
    guard.check(slot("B", disk, B_OFFSET))  # starts where A ends
    guard.check(slot("B", disk, 0, A_OFFSET))  # ends where A starts
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    guard.check(slot("B", other, 0, MiB))


def test_guard_needs_a_booted_slot(disk: Path) -> None:
    with pytest.raises(SlotGuardError, match="no partition of the booted slot"):
        SlotGuard([])
    with pytest.raises(SlotGuardError, match="several slots"):
        SlotGuard([slot("A", disk, A_OFFSET), slot("B", disk, B_OFFSET)])


def test_guard_fails_closed_on_an_unresolvable_booted_partition(tmp_path: Path) -> None:
    with pytest.raises(SlotGuardError, match="cannot check"):
        SlotGuard([slot("A", tmp_path / "missing.img", 0)])


def test_errors_are_one_line_and_in_the_right_family() -> None:
    assert issubclass(WriteFailed, DeviceError) and issubclass(WriteFailed, UpdateFailed)
    assert issubclass(ImageRejected, UpdateRejected)
    assert issubclass(CorruptStream, UpdateRejected)
    assert issubclass(SlotGuardError, UpdateRejected)
