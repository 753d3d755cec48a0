"""The gptprio backend on a real disk image laid out by `gptprio-ab.toml`, each operation
checked against `cgpt show` (the ChromeOS tool that reads these bits for firmware).

The state is a value (`GptPrioState`): `load()` reads the GPT once, transitions return
new values, `write()` commits the table once (`step`: one agent step)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import ConfigError, GPTError
from tests.conftest import run_tool
from updater.boot.base import BootContext, Bootloader, BootState, SlotState
from updater.boot.registry import bits_partitions, make_bootloader
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


def step(boot: Bootloader, *changes: Callable[[BootState], BootState]) -> BootState:
    """One agent step: load once, apply `changes` in memory, write once."""
    state = boot.load()
    for change in changes:
        state = change(state)
    return boot.write(state)


def _cgpt(disk: Path, label: str) -> tuple[int, int, int]:
    def one(flag: str) -> int:
        out = run_tool("cgpt", "show", "-i", str(NUMBER[label]), flag, disk)
        return int(out.stdout.strip())

    return one("-P"), one("-T"), one("-S")


def test_full_update_cycle_seen_by_cgpt(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    assert boot.name == "gptprio"
    # as laid out: A booted and good, B empty
    state = boot.load()
    assert (state.state("A"), state.state("B")) == (SlotState.GOOD, SlotState.BAD)
    assert state.primary() == "A"
    assert _cgpt(disk, "root_a") == (1, 0, 1)

    step(boot, lambda s: s.invalidate("B"))  # invalidate before writing the image
    assert _cgpt(disk, "root_b") == (0, 0, 0)
    step(boot, lambda s: s.try_next("B"))
    assert _cgpt(disk, "root_b") == (2, 1, 0)
    assert _cgpt(disk, "root_a") == (1, 0, 1)
    assert boot.load().state("B") is SlotState.TRYING
    assert boot.load().primary() == "B"

    # the firmware spends the one try (as cgpt/ChromeOS firmware would)
    run_tool("cgpt", "add", "-i", "3", "-T", "0", disk)
    assert boot.load().state("B") is SlotState.BAD
    assert boot.load().primary() == "A"  # fallback

    # ...or the boot succeeded and the health check commits it
    run_tool("cgpt", "add", "-i", "3", "-T", "1", disk)
    step(boot, lambda s: s.commit("B"))
    assert _cgpt(disk, "root_b") == (2, 1, 1)
    assert boot.load().state("B") is SlotState.GOOD
    assert boot.load().primary() == "B"

    step(boot, lambda s: s.invalidate("A"))
    assert _cgpt(disk, "root_a") == (0, 0, 0)
    assert boot.load().state("A") is SlotState.BAD
    assert "No problems found" in run_tool("sgdisk", "-v", disk).stdout


def test_fall_back_is_one_write_of_the_three_steps(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    step(boot, lambda s: s.try_next("B"))
    state = boot.load()
    assert state.fall_back("B") == state.invalidate("B").try_next("A").commit("A")
    step(boot, lambda s: s.fall_back("B"))  # B failed its health checks
    assert _cgpt(disk, "root_b") == (1, 0, 0)  # priority 1 as the fallback's other, no tries
    assert _cgpt(disk, "root_a") == (2, 1, 1)
    after = boot.load()
    assert (after.state("A"), after.state("B"), after.primary()) == (
        SlotState.GOOD,
        SlotState.BAD,
        "A",
    )


def test_transitions_never_touch_the_disk(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    before = disk.read_bytes()
    state = boot.load()
    changed = state.invalidate("A").try_next("B").commit("B").fall_back("B")
    assert changed != state and state == boot.load()
    assert disk.read_bytes() == before


def test_bits_live_on_the_boot_partition_if_the_slot_has_one() -> None:
    both = {"A": {"root": "root_a", "boot": "boot_a"}, "B": {"root": "root_b", "boot": "boot_b"}}
    assert bits_partitions(both) == {"A": "boot_a", "B": "boot_b"}
    roots = {"A": {"root": "root_a"}, "B": {"root": "root_b"}}
    assert bits_partitions(roots) == {"A": "root_a", "B": "root_b"}


def test_good_raises_a_zero_priority_and_keeps_other_bits(disk: Path) -> None:
    run_tool("cgpt", "add", "-i", "3", "-P", "0", "-T", "0", "-S", "0", "-B", "1", disk)
    boot = make_bootloader("gptprio", _ctx(disk))
    step(boot, lambda s: s.commit("B"))
    assert _cgpt(disk, "root_b") == (1, 0, 1)
    legacy_boot = int(run_tool("cgpt", "show", "-i", "3", "-B", disk).stdout)
    assert legacy_boot == 1  # bit 2 untouched


def test_no_slot_will_boot(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    step(boot, lambda s: s.invalidate("A"))
    assert boot.load().primary() is None


def test_repeating_an_operation_writes_nothing(disk: Path) -> None:
    boot = make_bootloader("gptprio", _ctx(disk))
    step(boot, lambda s: s.try_next("B"))
    before = disk.stat().st_mtime_ns
    step(boot, lambda s: s.try_next("B"))
    step(boot, lambda s: s.invalidate("A").commit("A").try_next("B"))  # back to as loaded
    assert disk.stat().st_mtime_ns == before


def test_damaged_primary_is_healed_by_the_next_write(disk: Path) -> None:
    with disk.open("r+b") as f:
        f.seek(512 + 40)
        f.write(b"\x00\xff")
    boot = make_bootloader("gptprio", _ctx(disk))
    assert boot.load().state("A") is SlotState.GOOD  # read from the backup
    step(boot)  # nothing changed: nothing written, the damage stays for now
    assert gpt.read_gpt(disk).damaged != []
    step(boot, lambda s: s.try_next("B"))
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
        boot.load()
    state = make_bootloader("gptprio", _ctx(disk)).load()
    for transition in ("try_next", "commit", "invalidate", "fall_back", "state"):
        with pytest.raises(ConfigError, match="unknown slot"):
            getattr(state, transition)("C")
