"""tools.powercut.replay: the cut model (what a disk keeps after a power cut) and the
Replayer that builds those disks, against a model disk built sector by sector."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.unit.test_powercut_writelog import SS, pack_log
from tools.powercut.campaign import NoRecording, run
from tools.powercut.replay import (
    Cut,
    Region,
    Replayer,
    choose_subset,
    durable_before,
    plan_cuts,
    tear,
)
from tools.powercut.writelog import FLUSH, Entry, WriteLog, read_log

DISK_SECTORS = 40


def random_log(path: Path, rng: random.Random, n: int) -> WriteLog:
    entries: list[tuple[int, int, int, bytes]] = []
    for _ in range(n):
        if rng.random() < 0.2:
            entries.append((0, 0, FLUSH, b""))
        else:
            nr = rng.randrange(1, 5)
            entries.append((rng.randrange(DISK_SECTORS - nr), nr, 0, rng.randbytes(nr * SS)))
    return read_log(pack_log(path, entries))


def model_disk(before: bytes, log: WriteLog, cut: Cut) -> bytes:
    """What the cut says the disk holds, computed sector by sector."""
    disk = bytearray(before)
    kept: list[tuple[Entry, set[int]]] = [
        (e, set(range(e.nr_sectors))) for e in log.entries[: cut.durable] if e.is_write
    ]
    for index in sorted(cut.persisted):
        e = log.entries[index]
        kept.append((e, set(cut.torn.get(index, range(e.nr_sectors)))))
    for e, offsets in kept:
        data = log.data(e)
        for i in offsets:
            s = e.sector + i
            disk[s * SS : (s + 1) * SS] = data[i * SS : (i + 1) * SS]
    return bytes(disk)


def test_durable_is_through_the_last_flush_before_the_cut(tmp_path: Path) -> None:
    log = read_log(pack_log(tmp_path / "l", [
        (1, 1, 0, bytes(SS)), (0, 0, FLUSH, b""), (2, 1, 0, bytes(SS)), (3, 1, 0, bytes(SS)),
        (0, 0, FLUSH, b""),
    ]))  # fmt: skip
    assert [durable_before(log.entries, at) for at in range(6)] == [0, 0, 2, 2, 2, 5]


def test_every_flush_is_a_cut_point_and_no_cut_keeps_a_write_after_it(tmp_path: Path) -> None:
    rng = random.Random(7)
    for case in range(60):
        log = random_log(tmp_path / f"l{case}", rng, rng.randrange(2, 30))
        cuts = plan_cuts({1: log.entries}, seed=case, between=2)
        assert cuts == plan_cuts({1: log.entries}, seed=case, between=2)  # seeded
        flush_points = {c.at for c in cuts if c.kind == "flush"}
        assert flush_points == set(log.flushes())
        for cut in cuts:
            assert cut.durable == durable_before(log.entries, cut.at)
            assert all(cut.durable <= i < cut.at and log.entries[i].is_write
                       for i in cut.persisted)  # fmt: skip
            for index, kept in cut.torn.items():
                assert index in cut.persisted
                assert 0 < len(kept) < log.entries[index].nr_sectors


def test_a_focus_region_gets_more_cut_points(tmp_path: Path) -> None:
    log = read_log(pack_log(tmp_path / "l", [
        (1, 1, 0, bytes(SS)), (30, 1, 0, bytes(SS)), (31, 1, 0, bytes(SS)), (0, 0, FLUSH, b""),
        (2, 1, 0, bytes(SS)), (3, 1, 0, bytes(SS)), (0, 0, FLUSH, b""),
    ]))  # fmt: skip
    focus = [Region("esp", 30, 32)]
    cuts = plan_cuts({1: log.entries}, seed=1, between=1, focus=focus, focus_extra=3)
    between = [c for c in cuts if c.kind == "between"]
    assert len([c for c in between if c.at < 3]) == 4  # the window writing to the focus
    assert len([c for c in between if c.at > 3]) == 1


def test_subsets_tear_multi_sector_writes_only(tmp_path: Path) -> None:
    rng = random.Random(3)
    for _ in range(500):
        n = rng.randrange(2, 64)
        kept = tear(n, rng)
        assert 0 < len(kept) < n and len(set(kept)) == len(kept)
        assert all(0 <= i < n for i in kept)
    log = read_log(pack_log(tmp_path / "l", [(1, 1, 0, bytes(SS)), (2, 1, 0, bytes(SS))]))
    persisted, torn = choose_subset(log.entries, 0, 2, "random", rng)
    assert persisted and not torn  # one-sector writes are never torn
    assert choose_subset(log.entries, 0, 2, "none", rng) == ((), {})
    assert choose_subset(log.entries, 0, 2, "all", rng) == ((0, 1), {})


def test_replayed_disks_are_the_model_disk_and_are_undone(tmp_path: Path) -> None:
    """40 random logs, every planned cut: the replayed disk is the model's, and after
    the `with` block the working copy is back to the durable state."""
    rng = random.Random(11)
    checked = 0
    for case in range(40):
        log = random_log(tmp_path / f"l{case}", rng, rng.randrange(4, 40))
        before = rng.randbytes(DISK_SECTORS * SS)
        (tmp_path / "before").write_bytes(before)
        cuts = sorted(plan_cuts({1: log.entries}, seed=case, between=2),
                      key=lambda c: (c.durable, c.at))  # fmt: skip
        with Replayer(tmp_path / "before", log, tmp_path / "work") as replayer:
            for cut in cuts:
                with replayer.replayed(cut) as disk:
                    assert disk.read_bytes() == model_disk(before, log, cut), (case, cut)
                durable = Cut(1, cut.durable, cut.durable, ())
                assert (tmp_path / "work").read_bytes() == model_disk(before, log, durable)
                checked += 1
            replayer.advance(len(log.entries))
            everything = Cut(1, len(log.entries), len(log.entries), ())
            assert (tmp_path / "work").read_bytes() == model_disk(before, log, everything)
    assert checked > 300


def test_content_key_changes_only_with_the_writes_to_a_region(tmp_path: Path) -> None:
    log = read_log(pack_log(tmp_path / "l", [
        (1, 1, 0, bytes(SS)), (0, 0, FLUSH, b""), (20, 2, 0, bytes(2 * SS)), (0, 0, FLUSH, b""),
    ]))  # fmt: skip
    (tmp_path / "before").write_bytes(bytes(DISK_SECTORS * SS))
    slot, esp = Region("slot", 10, 30), Region("esp", 0, 10)
    with Replayer(tmp_path / "before", log, tmp_path / "w") as r:
        a = Cut(1, 3, 2, ())
        b = Cut(1, 3, 2, (2,), {2: (1,)})
        assert r.content_key(a, esp) == r.content_key(b, esp)
        assert r.content_key(a, slot) != r.content_key(b, slot)


def test_reuse_without_a_recording_records_nothing(tmp_path: Path) -> None:
    # --reuse used to record a whole campaign (~5 min of QEMU) when nothing was saved.
    with pytest.raises(NoRecording, match=r"no recording of grub in .*grub"):
        run(tmp_path / "w", seed=1, samples=0, reuse=True, say=lambda _: None)
    assert not (tmp_path / "w").exists()
