"""The gptprio backend on a real disk image laid out by `gptprio-ab.toml`, each operation
checked against `cgpt show` (the ChromeOS tool that reads these bits for firmware)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, GPTError
from tests.conftest import run_tool
from updater.boot.base import BootContext, SlotState
from updater.boot.registry import make_bootloader
from updater.disk import gpt
from updater.disk.layout import apply_layout, load_layout

LAYOUT = Path(__file__).resolve().parents[2] / "partition-layouts" / "gptprio-ab.toml"
NUMBER = {"root_a": 2, "root_b": 3}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    apply_layout(load_layout(LAYOUT), path, size=1 << 30)
    return path


def _ctx(disk: Path) -> BootContext:
    return BootContext(disk=disk, grubenv=None, slot_partitions={"A": "root_a", "B": "root_b"})


def _cgpt(disk: Path, label: str) -> tuple[int, int, int]:
    def one(flag: str) -> int:
        out = run_tool("cgpt", "show", "-i", str(NUMBER[label]), flag, disk)
        return int(out.stdout.strip())

    return one("-P"), one("-T"), one("-S")


def test_full_update_cycle_seen_by_cgpt(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    assert boot.name == "gptprio"
    # as laid out: A booted and good, B empty
    assert (boot.get_state("A"), boot.get_state("B")) == (SlotState.GOOD, SlotState.BAD)
    assert boot.get_primary() == "A"
    assert _cgpt(disk, "root_a") == (1, 0, 1)

    boot.set_state("B", good=False)  # invalidate before writing the image
    assert _cgpt(disk, "root_b") == (0, 0, 0)
    boot.set_primary("B")
    assert _cgpt(disk, "root_b") == (2, 1, 0)
    assert _cgpt(disk, "root_a") == (1, 0, 1)
    assert boot.get_state("B") is SlotState.TRYING
    assert boot.get_primary() == "B"

    # the firmware spends the one try (as cgpt/ChromeOS firmware would)
    run_tool("cgpt", "add", "-i", "3", "-T", "0", disk)
    assert boot.get_state("B") is SlotState.BAD
    assert boot.get_primary() == "A"  # fallback

    # ...or the boot succeeded and the health check commits it
    run_tool("cgpt", "add", "-i", "3", "-T", "1", disk)
    boot.set_state("B", good=True)
    assert _cgpt(disk, "root_b") == (2, 1, 1)
    assert boot.get_state("B") is SlotState.GOOD
    assert boot.get_primary() == "B"

    boot.set_state("A", good=False)
    assert _cgpt(disk, "root_a") == (0, 0, 0)
    assert boot.get_state("A") is SlotState.BAD
    assert "No problems found" in run_tool("sgdisk", "-v", disk).stdout


def test_good_raises_a_zero_priority_and_keeps_other_bits(disk: Path) -> None:
    run_tool("cgpt", "add", "-i", "3", "-P", "0", "-T", "0", "-S", "0", "-B", "1", disk)
    boot = make_bootloader("gptprio", _ctx(disk))
    boot.set_state("B", good=True)
    assert _cgpt(disk, "root_b") == (1, 0, 1)
    legacy_boot = int(run_tool("cgpt", "show", "-i", "3", "-B", disk).stdout)
    assert legacy_boot == 1  # bit 2 untouched


def test_no_slot_will_boot(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    boot.set_state("A", good=False)
    assert boot.get_primary() is None


def test_repeating_an_operation_writes_nothing(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    boot.set_primary("B")
    before = disk.stat().st_mtime_ns
    boot.set_primary("B")
    assert disk.stat().st_mtime_ns == before


def test_damaged_primary_is_healed_by_the_next_write(disk: Path) -> None:
    with disk.open("r+b") as f:
        f.seek(512 + 40)
        f.write(b"\x00\xff")
    boot = make_bootloader("gptprio", _ctx(disk))
    assert boot.get_state("A") is SlotState.GOOD  # read from the backup
    boot.set_primary("B")
    assert gpt.read_gpt(disk).damaged == []
    assert _cgpt(disk, "root_b") == (2, 1, 0)


def test_bad_configuration(disk: Path) -> None:
    with pytest.raises(ConfigError, match="no partition label for slot"):
        make_bootloader(
            "gptprio", BootContext(disk=disk, grubenv=None, slot_partitions={"A": "root_a"})
        )
    with pytest.raises(ConfigError, match="share"):
        make_bootloader(
            "gptprio", BootContext(disk=disk, grubenv=None, slot_partitions={"A": "x", "B": "x"})
        )
    boot = make_bootloader(
        "gptprio",
        BootContext(disk=disk, grubenv=None, slot_partitions={"A": "root_a", "B": "root_c"}),
    )
    with pytest.raises(GPTError, match="no partition named 'root_c'"):
        boot.get_state("B")
    with pytest.raises(ConfigError, match="unknown slot"):
        boot.get_state("C")
