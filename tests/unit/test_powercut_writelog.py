"""tools.powercut.writelog: the dm-log-writes reader against logs packed by hand with
`struct` (the layout of Linux's dm-log-writes.c and QEMU's blklogwrites.c), and
`apply` against a model disk (a dict of sectors)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from tools.powercut.writelog import DISCARD, FLUSH, FUA, LogError, apply, read_log

SS = 512
MAGIC = 0x6A736677736872


def pack_log(
    path: Path,
    entries: list[tuple[int, int, int, bytes]],
    *,
    counted: int | None = None,
    tail: bytes = b"",
    magic: int = MAGIC,
) -> Path:
    """A log as QEMU writes it: superblock, then header sector + data per entry."""
    out = bytearray(
        struct.pack("<QQQI", magic, 1, len(entries) if counted is None else counted, SS)
    )
    out += bytes(SS - len(out))
    for sector, nr, flags, data in entries:
        header = struct.pack("<QQQQ", sector, nr, flags, 0)
        out += header + bytes(SS - len(header)) + data
    path.write_bytes(bytes(out) + tail)
    return path


def sectors(n: int, fill: int) -> bytes:
    return bytes([fill]) * (n * SS)


def test_reads_writes_flushes_and_discards_in_order(tmp_path: Path) -> None:
    log = read_log(pack_log(tmp_path / "l", [
        (10, 2, 0, sectors(2, 1)),
        (0, 0, FLUSH, b""),
        (99, 8, DISCARD, b""),  # no data follows a discard
        (4, 1, FUA, sectors(1, 2)),
    ]))  # fmt: skip
    assert [(e.sector, e.nr_sectors, e.flags) for e in log.entries] == [
        (10, 2, 0), (0, 0, FLUSH), (99, 8, DISCARD), (4, 1, FUA)
    ]  # fmt: skip
    assert log.flushes() == [1]
    assert [e.index for e in log.writes()] == [0, 3]
    assert log.data(log.entries[0]) == sectors(2, 1)
    assert log.data(log.entries[3]) == sectors(1, 2)
    assert log.data(log.entries[0], 1, 1) == sectors(1, 1)
    assert not log.truncated and log.counted == 4


def test_entries_after_the_last_counted_flush_are_read(tmp_path: Path) -> None:
    # QEMU updates the superblock's count on a flush only: what follows is still there.
    log = read_log(pack_log(tmp_path / "l", [
        (0, 0, FLUSH, b""), (7, 1, 0, sectors(1, 3)), (8, 1, 0, sectors(1, 4)),
    ], counted=1))  # fmt: skip
    assert log.counted == 1 and len(log.entries) == 3


def test_a_tail_cut_short_is_dropped_and_reported(tmp_path: Path) -> None:
    cut = struct.pack("<QQQQ", 5, 4, 0, 0) + bytes(SS - 32) + sectors(2, 9)  # 2 of 4 sectors
    log = read_log(pack_log(tmp_path / "l", [(1, 1, 0, sectors(1, 1))], tail=cut))
    assert len(log.entries) == 1 and log.truncated


@pytest.mark.parametrize(
    ("entries", "kw", "message"),
    [
        ([(1, 1, 0x10, sectors(1, 1))], {}, "unknown flags 0x10"),
        ([(1, 1, 0, sectors(1, 1))], {"magic": 0x1234}, "not a dm-log-writes log"),
        ([(1, 1, 0, sectors(1, 1))], {"counted": 5}, "counts 5 entries but only 1"),
    ],
)
def test_what_qemu_never_writes_is_refused(
    tmp_path: Path, entries: list[tuple[int, int, int, bytes]], kw: dict[str, int], message: str
) -> None:
    with pytest.raises(LogError, match=message):
        read_log(pack_log(tmp_path / "l", entries, counted=kw.get("counted"),
                          magic=kw.get("magic", MAGIC)))  # fmt: skip


def test_apply_whole_torn_and_out_of_range(tmp_path: Path) -> None:
    log = read_log(pack_log(tmp_path / "l", [
        (2, 3, 0, sectors(1, 1) + sectors(1, 2) + sectors(1, 3)), (9, 2, 0, sectors(2, 7)),
        (0, 0, DISCARD, b""),
    ]))  # fmt: skip
    disk = tmp_path / "d"
    disk.write_bytes(bytes(10 * SS))
    fd = os.open(disk, os.O_RDWR)
    try:
        apply(fd, log, log.entries[0], [0, 2], disk_sectors=10)  # torn: sector 1 not kept
        apply(fd, log, log.entries[2], disk_sectors=10)  # a discard changes nothing
        with pytest.raises(LogError, match="ends past the disk"):
            apply(fd, log, log.entries[1], disk_sectors=10)
    finally:
        os.close(fd)
    data = disk.read_bytes()
    assert data[2 * SS : 5 * SS] == sectors(1, 1) + bytes(SS) + sectors(1, 3)
    assert data.count(0) == 8 * SS


def test_random_logs_apply_like_a_model_disk(tmp_path: Path) -> None:
    """300 seeded random logs: applying every entry gives the model's sectors."""
    rng = random.Random(1313)
    for case in range(300):
        entries: list[tuple[int, int, int, bytes]] = []
        model: dict[int, bytes] = {}
        for _ in range(rng.randrange(1, 12)):
            kind = rng.random()
            if kind < 0.2:
                entries.append((0, 0, FLUSH, b""))
                continue
            if kind < 0.3:
                entries.append((rng.randrange(32), rng.randrange(1, 4), DISCARD, b""))
                continue
            start, nr = rng.randrange(30), rng.randrange(1, 3)
            data = rng.randbytes(nr * SS)
            entries.append((start, nr, FUA if kind > 0.9 else 0, data))
            for i in range(nr):
                model[start + i] = data[i * SS : (i + 1) * SS]
        log = read_log(pack_log(tmp_path / f"l{case}", entries))
        disk = tmp_path / "d"
        disk.write_bytes(bytes(32 * SS))
        fd = os.open(disk, os.O_RDWR)
        try:
            for entry in log.entries:
                apply(fd, log, entry, disk_sectors=32)
        finally:
            os.close(fd)
        got = disk.read_bytes()
        for s in range(32):
            assert got[s * SS : (s + 1) * SS] == model.get(s, bytes(SS)), (case, s)
