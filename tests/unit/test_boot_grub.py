"""The grub backend's state machine, checked through the real `grub-editenv list`."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, DeviceError
from tests.conftest import run_tool
from updater.boot.base import BootContext, SlotState
from updater.boot.grub import GrubBootloader, initial_grubenv, primary_slot, slot_state
from updater.boot.registry import known_bootloaders, make_bootloader
from updater.disk.grubenv import read_grubenv, write_grubenv


def _listed(path: Path) -> dict[str, str]:
    out = run_tool("grub-editenv", path, "list").stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def _env(order: str, a: str, b: str) -> dict[str, str]:
    """ORDER plus each slot's _OK and _TRY digits, e.g. _env("A B", "10", "00")."""
    return {"ORDER": order, "A_OK": a[0], "A_TRY": a[1], "B_OK": b[0], "B_TRY": b[1]}


@pytest.fixture
def grubenv(tmp_path: Path) -> Path:
    path = tmp_path / "grubenv"
    run_tool("grub-editenv", path, "create")
    run_tool("grub-editenv", path, "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0")
    return path


@pytest.fixture
def boot(grubenv: Path) -> GrubBootloader:
    backend = make_bootloader("grub", BootContext(disk=Path("/dev/null"), grubenv=grubenv))
    assert isinstance(backend, GrubBootloader)
    return backend


def test_provisioned_state(boot: GrubBootloader) -> None:
    assert boot.get_state("A") is SlotState.GOOD
    assert boot.get_state("B") is SlotState.BAD
    assert boot.get_primary() == "A"


def test_update_cycle_commit(boot: GrubBootloader, grubenv: Path) -> None:
    boot.set_state("B", good=False)  # invalidate before writing the image
    assert _listed(grubenv) == _env("A B", "10", "00")
    boot.set_primary("B")
    assert _listed(grubenv) == _env("B A", "10", "10")
    assert boot.get_primary() == "B"
    assert boot.get_state("B") is SlotState.GOOD  # primary, not yet started by GRUB
    # What GRUB's script saves when it starts B (save_env B_TRY):
    run_tool("grub-editenv", grubenv, "set", "B_TRY=1")
    assert boot.get_state("B") is SlotState.TRYING
    assert boot.get_primary() == "A"  # if B dies now, GRUB falls back to A
    boot.set_state("B", good=True)  # health check passed: commit
    assert _listed(grubenv)["B_TRY"] == "0"
    assert boot.get_state("B") is SlotState.GOOD
    assert boot.get_primary() == "B"


def test_update_cycle_rollback(boot: GrubBootloader, grubenv: Path) -> None:
    boot.set_primary("B")
    run_tool("grub-editenv", grubenv, "set", "B_TRY=1")
    boot.set_state("B", good=False)  # health check failed
    boot.set_primary("A")
    assert _listed(grubenv) == _env("A B", "10", "00")
    assert boot.get_state("B") is SlotState.BAD
    assert boot.get_primary() == "A"


def test_both_bad_has_no_primary(boot: GrubBootloader) -> None:
    boot.set_state("A", good=False)
    assert boot.get_primary() is None
    assert boot.get_state("A") is SlotState.BAD


def test_mutations_are_idempotent(boot: GrubBootloader, grubenv: Path) -> None:
    ops: list[Callable[[], None]] = [
        lambda: boot.set_primary("B"),
        lambda: boot.set_state("A", good=False),
        lambda: boot.set_state("A", good=True),
    ]
    for op in ops:
        op()
        once = grubenv.read_bytes()
        op()
        assert grubenv.read_bytes() == once


def test_commit_puts_a_missing_slot_back_in_order(boot: GrubBootloader, grubenv: Path) -> None:
    run_tool("grub-editenv", grubenv, "set", "ORDER=A", "B_OK=1")
    assert boot.get_state("B") is SlotState.BAD  # not in ORDER
    boot.set_state("B", good=True)
    assert _listed(grubenv)["ORDER"] == "A B"
    assert boot.get_state("B") is SlotState.GOOD


def test_unknown_variables_and_order_entries_are_kept(boot: GrubBootloader, grubenv: Path) -> None:
    run_tool("grub-editenv", grubenv, "set", "ORDER=C A B", "saved_entry=x", "C_OK=1")
    assert boot.get_primary() == "A"  # C is not one of our slots
    boot.set_primary("B")
    listed = _listed(grubenv)
    assert listed["ORDER"] == "B A C"
    assert listed["saved_entry"] == "x"


def test_missing_variables_default_like_the_script(tmp_path: Path) -> None:
    assert slot_state({}, "A") is SlotState.BAD
    assert slot_state({"A_OK": "1"}, "A") is SlotState.GOOD  # ORDER defaults to "A B"
    assert slot_state({"A_OK": "1", "A_TRY": "2"}, "A") is SlotState.BAD
    assert primary_slot({"B_OK": "1"}) == "B"
    assert primary_slot({"ORDER": "", "A_OK": "1"}) is None


def test_unknown_slot_and_missing_config(boot: GrubBootloader, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown slot 'C'"):
        boot.set_primary("C")
    with pytest.raises(ConfigError, match="no grubenv path"):
        make_bootloader("grub", BootContext(disk=tmp_path, grubenv=None))
    with pytest.raises(ConfigError, match=r"unknown bootloader 'lilo'; known bootloaders: .*grub"):
        make_bootloader("lilo", BootContext(disk=tmp_path, grubenv=None))
    assert "grub" in known_bootloaders()


def test_missing_grubenv_is_an_environment_error(tmp_path: Path) -> None:
    backend = GrubBootloader(BootContext(disk=tmp_path, grubenv=tmp_path / "nope"))
    with pytest.raises(DeviceError, match="nope: cannot open grubenv"):
        backend.get_primary()


def test_initial_grubenv() -> None:
    assert initial_grubenv("B") == {
        "ORDER": "B A",
        "A_OK": "0",
        "A_TRY": "0",
        "B_OK": "1",
        "B_TRY": "0",
    }


OPS = st.lists(
    st.tuples(st.sampled_from(["primary", "good", "bad", "grub-boot"]), st.sampled_from("AB")),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_operation_postconditions(ops: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grubenv"
        write_grubenv(path, initial_grubenv("A"))
        boot = GrubBootloader(BootContext(disk=path, grubenv=path))
        for op, slot in ops:
            before = read_grubenv(path)
            if op == "primary":
                boot.set_primary(slot)
                assert boot.get_primary() == slot
            elif op == "good":
                boot.set_state(slot, good=True)
                assert boot.get_state(slot) is SlotState.GOOD
            elif op == "bad":
                boot.set_state(slot, good=False)
                assert boot.get_state(slot) is SlotState.BAD
                assert boot.get_primary() != slot
            else:  # what GRUB's script saves when it starts the primary slot
                started = boot.get_primary()
                if started is not None:
                    update = read_grubenv(path) | {f"{started}_TRY": "1"}
                    write_grubenv(path, update)
                    assert boot.get_state(started) is SlotState.TRYING
                continue
            after = read_grubenv(path)
            other = "B" if slot == "A" else "A"
            for var in (f"{other}_OK", f"{other}_TRY"):
                assert after.get(var) == before.get(var)  # the other slot is untouched
