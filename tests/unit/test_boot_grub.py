"""The grub backend's state machine, checked through the real `grub-editenv list`.

The state is a value (`GrubState`): `load()` reads the grubenv once, transitions return
new values without touching the file, `write()` replaces the file once (or not at all
when nothing changed). `step` below is one agent step: load, transitions, one write.
"""

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
from updater.boot.grub import (
    GrubBootloader,
    GrubState,
    initial_grubenv,
    primary_slot,
    slot_state,
)
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


def step(boot: GrubBootloader, *changes: Callable[[GrubState], GrubState]) -> GrubState:
    """One agent step: load once, apply `changes` in memory, write once."""
    state = boot.load()
    for change in changes:
        state = change(state)
    return boot.write(state)


@pytest.fixture
def boot(grubenv: Path) -> GrubBootloader:
    backend = make_bootloader("grub", BootContext(disk=Path("/dev/null"), grubenv=grubenv))
    assert isinstance(backend, GrubBootloader)
    return backend


def test_provisioned_state(boot: GrubBootloader) -> None:
    state = boot.load()
    assert state.state("A") is SlotState.GOOD
    assert state.state("B") is SlotState.BAD
    assert state.primary() == "A"


def test_update_cycle_commit(boot: GrubBootloader, grubenv: Path) -> None:
    step(boot, lambda s: s.invalidate("B"))  # invalidate before writing the image
    assert _listed(grubenv) == _env("A B", "10", "00")
    step(boot, lambda s: s.try_next("B"))
    assert _listed(grubenv) == _env("B A", "10", "10")
    assert boot.load().primary() == "B"
    assert boot.load().state("B") is SlotState.GOOD  # primary, not yet started by GRUB
    # What GRUB's script saves when it starts B (save_env B_TRY):
    run_tool("grub-editenv", grubenv, "set", "B_TRY=1")
    assert boot.load().state("B") is SlotState.TRYING
    assert boot.load().primary() == "A"  # if B dies now, GRUB falls back to A
    step(boot, lambda s: s.commit("B"))  # health check passed: commit
    assert _listed(grubenv)["B_TRY"] == "0"
    assert boot.load().state("B") is SlotState.GOOD
    assert boot.load().primary() == "B"


def test_update_cycle_rollback(boot: GrubBootloader, grubenv: Path) -> None:
    step(boot, lambda s: s.try_next("B"))
    run_tool("grub-editenv", grubenv, "set", "B_TRY=1")
    step(boot, lambda s: s.fall_back("B"))  # health check failed: one write
    assert _listed(grubenv) == _env("A B", "10", "00")
    assert boot.load().state("B") is SlotState.BAD
    assert boot.load().primary() == "A"


def test_fall_back_is_invalidate_then_the_other_primary_and_committed(
    boot: GrubBootloader, grubenv: Path
) -> None:
    run_tool("grub-editenv", grubenv, "set", "ORDER=B A C", "B_OK=1", "B_TRY=1", "A_TRY=1")
    state = boot.load()
    # The three backend calls of a rollback before, as one value: the same variables.
    assert state.fall_back("B") == state.invalidate("B").try_next("A").commit("A")
    step(boot, lambda s: s.fall_back("B"))
    assert _listed(grubenv) == {**_env("A B", "10", "00"), "ORDER": "A B C"}


def test_both_bad_has_no_primary(boot: GrubBootloader) -> None:
    step(boot, lambda s: s.invalidate("A"))
    assert boot.load().primary() is None
    assert boot.load().state("A") is SlotState.BAD


def test_mutations_are_idempotent(boot: GrubBootloader, grubenv: Path) -> None:
    ops: list[Callable[[GrubState], GrubState]] = [
        lambda s: s.try_next("B"),
        lambda s: s.invalidate("A"),
        lambda s: s.commit("A"),
        lambda s: s.fall_back("B"),
    ]
    for op in ops:
        step(boot, op)
        once = grubenv.read_bytes()
        inode = grubenv.stat().st_ino
        assert op(boot.load()) == boot.load()  # repeating it changes nothing...
        step(boot, op)
        assert grubenv.read_bytes() == once
        assert grubenv.stat().st_ino == inode  # ... and writes nothing (no replacement)


def test_transitions_never_touch_the_file(boot: GrubBootloader, grubenv: Path) -> None:
    before, inode = grubenv.read_bytes(), grubenv.stat().st_ino
    state = boot.load()
    changed = state.invalidate("B").try_next("B").commit("B").fall_back("A").invalidate("B")
    assert changed != state and state == boot.load()  # the loaded value is unchanged
    assert grubenv.read_bytes() == before and grubenv.stat().st_ino == inode


def test_a_value_written_is_the_base_of_the_next_write(boot: GrubBootloader, grubenv: Path) -> None:
    # Install's two writes from one load: the second brings back the loaded variables
    # (B primary, as it was), and must still be written over the first.
    step(boot, lambda s: s.try_next("B"))
    state = boot.write(boot.load().invalidate("B"))
    assert _listed(grubenv)["B_OK"] == "0"
    boot.write(state.try_next("B"))
    assert _listed(grubenv) == _env("B A", "10", "10")


def test_a_value_of_another_backend_is_refused(boot: GrubBootloader, tmp_path: Path) -> None:
    class Other:
        pass

    with pytest.raises(TypeError, match="grub: cannot write a Other"):
        boot.write(Other())  # type: ignore[arg-type]


def test_commit_puts_a_missing_slot_back_in_order(boot: GrubBootloader, grubenv: Path) -> None:
    run_tool("grub-editenv", grubenv, "set", "ORDER=A", "B_OK=1")
    assert boot.load().state("B") is SlotState.BAD  # not in ORDER
    step(boot, lambda s: s.commit("B"))
    assert _listed(grubenv)["ORDER"] == "A B"
    assert boot.load().state("B") is SlotState.GOOD


def test_unknown_variables_and_order_entries_are_kept(boot: GrubBootloader, grubenv: Path) -> None:
    run_tool("grub-editenv", grubenv, "set", "ORDER=C A B", "saved_entry=x", "C_OK=1")
    assert boot.load().primary() == "A"  # C is not one of our slots
    step(boot, lambda s: s.try_next("B"))
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
    for transition in ("try_next", "commit", "invalidate", "fall_back", "state"):
        with pytest.raises(ConfigError, match="unknown slot 'C'"):
            getattr(boot.load(), transition)("C")
    with pytest.raises(ConfigError, match="no grubenv path"):
        make_bootloader("grub", BootContext(disk=tmp_path, grubenv=None))
    with pytest.raises(ConfigError, match=r"unknown bootloader 'lilo'; known bootloaders: .*grub"):
        make_bootloader("lilo", BootContext(disk=tmp_path, grubenv=None))
    assert "grub" in known_bootloaders()


def test_missing_grubenv_is_an_environment_error(tmp_path: Path) -> None:
    backend = GrubBootloader(BootContext(disk=tmp_path, grubenv=tmp_path / "nope"))
    with pytest.raises(DeviceError, match="nope: cannot open grubenv"):
        backend.load()


def test_initial_grubenv() -> None:
    assert initial_grubenv("B") == {
        "ORDER": "B A",
        "A_OK": "0",
        "A_TRY": "0",
        "B_OK": "1",
        "B_TRY": "0",
    }


OPS = st.lists(
    st.tuples(
        st.sampled_from(["primary", "good", "bad", "fall-back", "grub-boot"]), st.sampled_from("AB")
    ),
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
                step(boot, lambda s: s.try_next(slot))  # noqa: B023 (called at once)
                assert boot.load().primary() == slot
            elif op == "good":
                step(boot, lambda s: s.commit(slot))  # noqa: B023
                assert boot.load().state(slot) is SlotState.GOOD
            elif op == "bad":
                step(boot, lambda s: s.invalidate(slot))  # noqa: B023
                assert boot.load().state(slot) is SlotState.BAD
                assert boot.load().primary() != slot
            elif op == "fall-back":
                step(boot, lambda s: s.fall_back(slot))  # noqa: B023
                fallback = "B" if slot == "A" else "A"
                assert boot.load().state(slot) is SlotState.BAD
                assert boot.load().state(fallback) is SlotState.GOOD
                assert boot.load().primary() == fallback
                continue  # it changes both slots by design
            else:  # what GRUB's script saves when it starts the primary slot
                started = boot.load().primary()
                if started is not None:
                    update = read_grubenv(path) | {f"{started}_TRY": "1"}
                    write_grubenv(path, update)
                    assert boot.load().state(started) is SlotState.TRYING
                continue
            after = read_grubenv(path)
            other = "B" if slot == "A" else "A"
            for var in (f"{other}_OK", f"{other}_TRY"):
                assert after.get(var) == before.get(var)  # the other slot is untouched
