"""The power-cut campaign's model of GRUB (tools.powercut.grubmodel) against real GRUB.

The campaign decides, for hundreds of replayed disks, which slot GRUB would boot from
the grubenv a power cut left - including blocks no agent writes: torn between two
versions, without a signature, with a name that swallowed a newline. Here real GRUB
(x86_64-efi, OVMF, the shipped script in dry-run mode: test_grub_qemu's machine) reads
such blocks, and its console lines and the variables it saved must be the model's.
"""

from __future__ import annotations

import pytest

from tests.conftest import run_tool
from tests.integration.test_grub_qemu import ESP_OFFSET, Machine, _lines
from tests.integration.test_grub_qemu import machine as machine
from tools.powercut.campaign import GRUB_DECISION
from tools.powercut.grubmodel import grub_decide
from updater.disk.grubenv import build_grubenv

BOTH = {"A": True, "B": True}


def _put_raw(m: Machine, raw: bytes) -> None:
    local = m.work / "raw.grubenv"
    local.write_bytes(raw)
    run_tool("mcopy", "-o", "-i", f"{m.disk}@@{ESP_OFFSET}", local, "::/EFI/BOOT/grubenv")


def _get_raw(m: Machine) -> bytes:
    local = m.work / "raw.out"
    local.unlink(missing_ok=True)
    run_tool("mcopy", "-i", f"{m.disk}@@{ESP_OFFSET}", "::/EFI/BOOT/grubenv", local)
    return local.read_bytes()


# The torn block: the first sector of the activation of B, the second of the block
# before it (the variables of each straddle the sector boundary).
_OLD = build_grubenv({"X": "x" * 390, "ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0",
                      "B_TRY": "0"})  # fmt: skip
_NEW = build_grubenv({"X": "x" * 390, "ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "1",
                      "B_TRY": "0"})  # fmt: skip
CASES = {
    "torn between two blocks": _NEW[:512] + _OLD[512:],
    "no signature": b"# GRUB Environment Blocx\n" + _NEW[25:],
    "a name that swallowed a line": (b"# GRUB Environment Block\nB_OK\nORDER=B A\nA_OK=1\n"
                                     b"A_TRY=1\nB_OK=1\nB_TRY=0\nB_TRY=1\n").ljust(1024, b"#"),
}  # fmt: skip


def _first_boot(said: tuple[str, ...]) -> list[str]:
    """The model's decision lines of the first boot: up to its NO BOOTABLE SLOT, if any."""
    out = []
    for line in (x for x in said if GRUB_DECISION.match(x)):
        out.append(line)
        if line.startswith("NO BOOTABLE SLOT"):
            break
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_grub_chooses_what_the_model_chooses(machine: Machine, case: str) -> None:
    raw = CASES[case]
    decision = grub_decide(raw, BOTH)
    _put_raw(machine, raw)
    said = [x.removeprefix("ab-updater: ") for x in _lines(machine.boot())]
    assert [x for x in said if GRUB_DECISION.match(x)] == _first_boot(decision.said), said
    if decision.passes == 1:
        assert decision.slot is not None
        part = {"A": 2, "B": 3}[decision.slot]
        assert f"DRY RUN: slot {decision.slot}: linux (hd0,gpt{part})/boot/vmlinuz" in said
    # What GRUB saved, byte for byte, is what the model says the next boot reads.
    assert _get_raw(machine) == (decision.first_saved or raw)
