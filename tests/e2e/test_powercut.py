"""Power cuts on a real node: the small seeded subset of `make powercut` (docs/powercut.md).

1. A write the agent reported done survives a power cut at once: the node's ESP is
   mounted as a production node mounts it (no vfat `flush`), the health check commits,
   and QEMU is killed the moment the command's exit marker reaches the console.
2. One recorded boot (commit, install of a 20 MiB release into B, activation) with
   every disk write logged by QEMU's blklogwrites; a handful of seeded cuts replayed
   and judged on the host (GPT, grubenv, GRUB's choice, slot image, journal); one of
   them booted with real GRUB, which must choose the slot the model chose.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tools.node import Node, boot, boot_until, build_release, make_node, make_updates_disk
from tools.node.disk import OVMF_VARS
from tools.node.scenarios import HEALTH
from tools.powercut.campaign import (
    GRUB_DECISION,
    Report,
    grub_lines,
    judge_recording,
    layout_regions,
    sparse_copy,
    touched,
)
from tools.powercut.fat import FatVolume
from tools.powercut.grubmodel import grub_load_env
from tools.powercut.judge import Verdict
from tools.powercut.record import REAL_NODE_BOOT, Recording, record_small
from tools.powercut.replay import Cut, plan_cuts
from tools.powercut.writelog import read_log

pytestmark = pytest.mark.e2e
SEED = int(os.environ.get("AB_POWERCUT_SEED") or 4242)
CUTS = 8


def grubenv_as_grub_reads_it(disk: Path, esp_offset: int) -> dict[str, str] | None:
    with disk.open("rb") as f:
        raw = FatVolume(f.fileno(), esp_offset).read_file("/EFI/BOOT/grubenv", 1 << 20)
    return grub_load_env(raw)


def test_the_health_checks_commit_survives_a_power_cut_as_soon_as_it_returns(
    tmp_path: Path, e2e_cache: Path
) -> None:
    node = make_node(tmp_path / "node", build_release(1, cache=e2e_cache,
                                                      boot_commands=REAL_NODE_BOOT))  # fmt: skip
    updates = make_updates_disk(None, tmp_path / "u.img", commands=("sleep 120",))
    done = f"E2E: exit=0 {HEALTH}"
    r = boot(node, updates_disk=updates, timeout=240, kill_when=lambda line: line == done)
    assert r.exit_reason == "killed", r.log_path
    assert "committed: slot A" in r.serial_log, r.log_path
    env = grubenv_as_grub_reads_it(node.disk, node.esp_offset())
    # GRUB wrote A_TRY=1 in place at power-on; the commit that returned wrote A_TRY=0.
    assert env is not None and env["A_TRY"] == "0", (env, r.log_path)


class KeepDisk:
    """A `SampleSink` that keeps a sparse copy of the cut's disk, to boot it afterwards."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.kept: list[tuple[Path, Verdict]] = []

    def submit(self, rec: Recording, cut: Cut, disk: Path, verdict: Verdict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        copy = self.out / f"{cut.name}.img"
        sparse_copy(disk, copy)
        self.kept.append((copy, verdict))


def test_seeded_cuts_of_a_recorded_install_are_bootable(tmp_path: Path, e2e_cache: Path) -> None:
    rec = record_small(tmp_path / "rec", cache=e2e_cache, say=print)
    log = read_log(rec.path(rec.boots[0].log))
    where = layout_regions(rec.path(rec.boots[0].before))
    focus = [r for r in where if r.name in ("esp", "data")]
    # A handful of the campaign's cuts, spread over the regions at stake.
    chosen: dict[str, str] = {}
    for cut in plan_cuts({1: log.entries}, SEED, focus=focus):
        stake = touched(log.entries, cut.pending(), where)
        for name in ("esp", "data", "root_b"):
            if name in stake and list(chosen.values()).count(name) < CUTS // 3:
                chosen[cut.name] = name
                break
    assert set(chosen.values()) == {"esp", "data", "root_b"}, chosen
    first_esp = next(n for n, r in chosen.items() if r == "esp")
    keep = KeepDisk(tmp_path / "boot")
    report = Report(SEED)
    judge_recording(rec, report, seed=SEED, work=tmp_path / "work", say=print,
                    samples={first_esp}, sampler=keep, only=set(chosen))  # fmt: skip
    print("\n".join(report.lines()))
    assert report.cuts == len(chosen)
    assert not report.bricks and not report.stuck and not report.lost, report.lines()

    # Real GRUB on one replayed disk (a cut in an ESP write): it chooses the model's slot
    # and says what the model said; the agent's health check then finishes.
    [(disk, verdict)] = keep.kept
    vars_copy = tmp_path / "boot" / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, vars_copy)
    # GRUB may need a second pass (no slot on the first: it resets the tries and
    # reboots), as the model says (verdict.passes); its lines are read across passes.
    boots = boot_until(Node(tmp_path / "boot", disk, vars_copy), max_boots=3, timeout=240)
    assert len(boots) >= verdict.passes, [b.log_path for b in boots]
    said = [line for b in boots[: verdict.passes] for line in grub_lines(b.serial_log)]
    r = boots[verdict.passes - 1]  # the pass that started a kernel
    expected = [x for x in verdict.said if GRUB_DECISION.match(x)]
    assert r.booted.get("slot") == verdict.chosen, (said, expected, r.log_path)
    assert said[: len(expected)] == expected, r.log_path
    assert r.exit_status(HEALTH) in (0, 5), r.log_path
    assert all("Traceback" not in b.serial_log for b in boots), r.log_path
