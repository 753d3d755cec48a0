"""The systemd-boot backend on an ESP directory: UAPI names, systemd-boot's choice, the
transitions and the order of a write.

Entries here are Type #1 files (their sort data is text); UKIs and the real bootctl are
in tests/integration/test_sdboot_interop.py. `boots()` plays systemd-boot at power-on:
it picks the entry `bls.select` names and renames a counted one as systemd-boot does
(`+1-0` -> `+0-1`), so the state machine is driven through the same files a node has.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, UpdateRejected
from updater import decide
from updater.boot import bls
from updater.boot.base import BootContext, SlotState
from updater.boot.registry import make_bootloader
from updater.boot.sdboot import (
    EntryError,
    Rename,
    SdBootBootloader,
    SdBootState,
    after,
    current_entry_file,
    loader_entry_selected,
    slot_of_entry,
    write_plan,
)
from updater.state import Journal

ENTRIES = {"A": "loader/entries/ab-a.conf", "B": "loader/entries/ab-b.conf"}


def conf(slot: str, version: str) -> str:
    return (
        f"title ab {slot}\nsort-key ab\nversion {version}\n"
        f"linux /ab/{slot}/vmlinuz\noptions root=PARTLABEL=root_{slot.lower()}\n"
    )


@pytest.fixture
def esp(tmp_path: Path) -> Path:
    """A provisioned ESP: slot A committed (no counter) and named by `default`, no B."""
    root = tmp_path / "esp"
    (root / "loader/entries").mkdir(parents=True)
    for slot in "AB":
        (root / f"ab/{slot}").mkdir(parents=True)
        (root / f"ab/{slot}/vmlinuz").write_bytes(b"kernel")
    (root / "loader/entries/ab-a.conf").write_text(conf("A", "1.0.0"))
    (root / "loader/loader.conf").write_text("timeout 0\ndefault ab-a.conf\neditor no\n")
    return root


def backend(esp: Path) -> SdBootBootloader:
    boot = make_bootloader("systemd-boot", BootContext(Path("/dev/null"), None, esp=esp,
                                                       slot_entries=ENTRIES))  # fmt: skip
    assert isinstance(boot, SdBootBootloader)
    return boot


def files(esp: Path) -> list[str]:
    return sorted(os.listdir(esp / "loader/entries"))


def boots(esp: Path) -> str | None:
    """systemd-boot at power-on: the slot it boots; a counted entry is renamed first."""
    state = backend(esp).load()
    entries = state.entries()
    chosen = bls.select([e for _, e in entries], state.default)
    if chosen is None:
        return None
    if chosen.name.counted:
        directory = esp / "loader/entries"
        os.rename(directory / chosen.name.name, directory / chosen.name.booted_once().name)
    return next(slot for slot, e in entries if e is chosen)


def install_into(esp: Path, slot: str, version: str) -> Path:
    """What the agent's file writer does to a slot's entry: replace it under its name."""
    path = current_entry_file(esp, ENTRIES[slot])
    path.write_text(conf(slot, version))
    return path


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stem", "left", "done"),
    [
        ("foo.conf", "foo", None, 0),
        ("foo+3.efi", "foo", 3, 0),
        ("foo+4-0.efi", "foo", 4, 0),
        ("foo+0-3.efi", "foo", 0, 3),
        ("debian-6.1.0-13-amd64+2-1.conf", "debian-6.1.0-13-amd64", 2, 1),
        ("a+b+1-2.conf", "a+b", 1, 2),  # the last '+' starts the counter
        ("foo+a.conf", "foo+a", None, 0),  # not digits: no counter
        ("foo+1-.conf", "foo+1-", None, 0),
        ("foo+-1.conf", "foo+-1", None, 0),
        ("foo+1-2-3.conf", "foo+1-2-3", None, 0),  # the counter must end at the dot
        ("foo+2147483648.conf", "foo+2147483648", None, 0),  # above INT_MAX
        ("noext+1", "noext+1", None, 0),
    ],
)
def test_entry_names_parse_as_systemd_does(
    name: str, stem: str, left: int | None, done: int
) -> None:
    parsed = bls.EntryName.parse(name)
    assert (parsed.stem, parsed.left, parsed.done) == (stem, left, done)


@settings(max_examples=300, deadline=None)
@given(
    st.text(st.characters(codec="ascii", exclude_characters="/\0"), min_size=1, max_size=20),
    st.sampled_from([".conf", ".efi", ".EFI"]),
    st.one_of(st.none(), st.integers(0, bls.INT_MAX)),
    st.integers(0, bls.INT_MAX),
)
def test_names_round_trip_and_bless_like_systemd_bless_boot(
    stem: str, suffix: str, left: int | None, done: int
) -> None:
    name = bls.EntryName(stem, suffix, left, done if left is not None else 0)
    reparsed = bls.EntryName.parse(name.name)
    if left is not None or bls.EntryName.parse(stem + suffix).stem == stem:
        assert reparsed.name == name.name
    assert name.blessed().name == stem + suffix
    assert name.cursed().left == 0 and name.cursed().bad
    assert name.cursed().done == (done if left is not None else 0)
    assert name.with_tries(1).booted_once().bad  # one try, spent by one boot


def test_a_name_as_found_is_the_one_renamed_from() -> None:
    # kernel-install writes `+3` (no DONE part): the file to rename is `foo+3.conf`,
    # not the `foo+3-0.conf` that the counter would print as.
    found = bls.EntryName.parse("foo+3.conf")
    assert (found.left, found.done, found.name) == (3, 0, "foo+3.conf")
    assert found == bls.EntryName("foo", ".conf", 3, 0)  # the same entry and counter
    assert found.booted_once().name == "foo+2-1.conf"
    assert found.blessed().name == "foo.conf" and found.cursed().name == "foo+0-0.conf"
    assert found.with_tries(1).name == "foo+1-0.conf"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_keeps_any_name_as_found(text: str) -> None:
    assert bls.EntryName.parse(text).name == text


def test_a_glob_naming_one_entry_wins_even_with_no_tries_left() -> None:
    """systemd-boot's config_entry_find: why a trial needs a glob naming both slots."""
    good = bls.Entry(bls.EntryName("ab-a", ".conf"), "ab", "1.0.0")
    spent = bls.Entry(bls.EntryName("ab-b", ".conf", 0, 1), "ab", "2.0.0")
    assert bls.select([good, spent], "ab-b.conf") is spent
    assert bls.select([good, spent], "ab-*.conf") is good  # no tries left: sorted last
    trying = bls.Entry(bls.EntryName("ab-b", ".conf", 1, 0), "ab", "2.0.0")
    assert bls.select([good, trying], "ab-*.conf") is trying  # newer first


# --- the state machine on files -----------------------------------------------------------


def test_update_try_commit_and_rollback_through_the_files(esp: Path) -> None:
    boot = backend(esp)
    state = boot.load()
    assert [state.state(s) for s in "AB"] == [SlotState.GOOD, SlotState.BAD]
    assert state.primary() == "A"

    # install: invalidate B (no entry yet: nothing to rename), then write its file.
    state = boot.write(state.invalidate("B"))
    assert files(esp) == ["ab-a.conf"]
    install_into(esp, "B", "2.0.0")
    assert files(esp) == ["ab-a.conf", "ab-b+0-0.conf"]  # created bad: cannot boot yet
    state = boot.load()
    assert state.state("B") is SlotState.BAD and state.primary() == "A"

    # activate: one try.
    state = boot.write(state.try_next("B"))
    assert files(esp) == ["ab-a.conf", "ab-b+1-0.conf"]
    assert "default ab-*.conf" in (esp / "loader/loader.conf").read_text()
    assert (esp / "loader/loader.conf").read_text().startswith("timeout 0\n")
    assert state.primary() == "B" and state.state("B") is SlotState.TRYING

    # power-on: systemd-boot spends B's try; the health check commits.
    assert boots(esp) == "B"
    assert files(esp) == ["ab-a.conf", "ab-b+0-1.conf"]
    state = boot.load()
    assert state.state("B") is SlotState.BAD  # `+0-1`: booted, not yet blessed
    state = boot.write(state.commit("B"))
    assert files(esp) == ["ab-a.conf", "ab-b.conf"]
    assert (esp / "loader/loader.conf").read_text() == "timeout 0\ndefault ab-b.conf\neditor no\n"
    assert boots(esp) == "B" and boots(esp) == "B"

    # a failed health check on B: back to A, B bad.
    state = boot.write(boot.load().fall_back("B"))
    assert files(esp) == ["ab-a.conf", "ab-b+0-0.conf"]
    assert "default ab-a.conf" in (esp / "loader/loader.conf").read_text()
    assert boots(esp) == "A"


def test_a_release_that_never_boots_falls_back_by_the_counter_alone(esp: Path) -> None:
    boot = backend(esp)
    boot.write(boot.load().invalidate("B"))
    install_into(esp, "B", "2.0.0")
    boot.write(boot.load().try_next("B"))
    assert boots(esp) == "B"  # the kernel panics: nobody runs to change anything
    assert boots(esp) == "A"  # no tries left: sorted last, the glob picks A
    assert boots(esp) == "A"
    state = boot.load()
    assert state.primary() == "A" and state.state("B") is SlotState.BAD


def test_write_of_an_unchanged_value_touches_nothing(esp: Path) -> None:
    boot = backend(esp)
    before = os.stat(esp / "loader/loader.conf").st_mtime_ns
    state = boot.load()
    assert write_plan(state.commit("A")) == ()
    boot.write(state.commit("A"))
    assert os.stat(esp / "loader/loader.conf").st_mtime_ns == before


def test_activation_is_refused_when_systemd_boot_would_not_try_the_slot(esp: Path) -> None:
    """An older release in B cannot be tried while a newer A is good: UKIs (and these
    entries) sort by version, so the agent refuses instead of recording a pending B."""
    boot = backend(esp)
    (esp / "loader/entries/ab-a.conf").write_text(conf("A", "3.0.0"))
    install_into(esp, "B", "2.0.0")
    journal = Journal().with_installed("B", "2.0.0")
    with pytest.raises(UpdateRejected, match=r"slot B \(2.0.0\) would not be booted next"):
        decide.activate(journal, boot.load(), "A", "B")
    assert files(esp) == ["ab-a.conf", "ab-b+0-0.conf"]


def test_two_files_for_one_entry_are_refused_naming_them(esp: Path) -> None:
    (esp / "loader/entries/ab-b+1-0.conf").write_text(conf("B", "2.0.0"))
    (esp / "loader/entries/AB-B+0-0.conf").write_text(conf("B", "2.0.0"))
    with pytest.raises(EntryError, match=r"2 files for one boot entry \(AB-B\+0-0.conf, ab-b"):
        backend(esp).load()


def test_unknown_slot_and_missing_entry_are_errors(esp: Path) -> None:
    state = backend(esp).load()
    with pytest.raises(ConfigError, match="unknown slot 'C'"):
        state.invalidate("C")
    with pytest.raises(UpdateRejected, match=r"slot B has no boot entry \(ab-b.conf\)"):
        state.try_next("B")


@pytest.mark.parametrize(
    "entries",
    [
        {"A": "loader/entries/x.conf"},
        {"A": "EFI/Linux/a.conf", "B": "EFI/Linux/b.efi"},
        {"A": "loader/entries/a+1-0.conf", "B": "loader/entries/b.conf"},
        {"A": "loader/entries/a.conf", "B": "loader/entries/A.conf"},
    ],
)
def test_bad_entry_configurations_are_config_errors(
    tmp_path: Path, entries: dict[str, str]
) -> None:
    with pytest.raises(ConfigError):
        SdBootBootloader(BootContext(tmp_path, None, esp=tmp_path, slot_entries=entries))


# --- a power cut in the middle of a write ---------------------------------------------------

TRANSITIONS = ("invalidate", "try_next", "commit", "fall_back")


def _state(tmp_path: Path, a: str | None, b: str | None, default: str) -> SdBootState:
    root = tmp_path / "esp"
    (root / "loader/entries").mkdir(parents=True, exist_ok=True)
    for slot, counter, version in (("A", a, "1.0.0"), ("B", b, "2.0.0")):
        (root / f"ab/{slot}").mkdir(parents=True, exist_ok=True)
        (root / f"ab/{slot}/vmlinuz").write_bytes(b"k")
        for old in (root / "loader/entries").glob(f"ab-{slot.lower()}*"):
            old.unlink()
        if counter is not None:
            (root / f"loader/entries/ab-{slot.lower()}{counter}.conf").write_text(
                conf(slot, version)
            )
    (root / "loader/loader.conf").write_text(f"default {default}\n")
    return backend(root).load()


@settings(max_examples=400, deadline=None)
@given(
    a=st.sampled_from([None, "", "+1-0", "+0-1", "+0-0", "+2-1"]),
    b=st.sampled_from([None, "", "+1-0", "+0-1", "+0-0"]),
    default=st.sampled_from(["ab-a.conf", "ab-b.conf", "ab-*.conf", "other.conf"]),
    steps=st.lists(st.tuples(st.sampled_from(TRANSITIONS), st.sampled_from("AB")), max_size=3),
)
def test_every_state_a_cut_can_leave_boots_the_old_or_the_new_choice(
    tmp_path_factory: pytest.TempPathFactory,
    a: str | None,
    b: str | None,
    default: str,
    steps: list[tuple[str, str]],
) -> None:
    loaded = _state(tmp_path_factory.mktemp("cut"), a, b, default)
    state = loaded
    for transition, slot in steps:
        try:
            state = getattr(state, transition)(slot)
        except UpdateRejected:
            return  # no entry to try or commit: nothing would be written
    old, new = loaded.primary(), state.primary()
    plan = write_plan(state)
    for done in range(len(plan) + 1):
        cut = after(state, plan[:done])
        assert cut.primary() in (old, new), (plan, done)
        if done < len(plan) and isinstance(plan[done], Rename):
            # Inside a FAT rename: both names may exist, pointing at the same clusters.
            step = plan[done]
            assert isinstance(step, Rename)
            meta = state.sorting[step.slot]
            assert meta is not None
            both = [e for _, e in after(state, plan[: done + 1]).entries()]
            both.append(bls.Entry(step.old, meta.sort_key, meta.version))
            chosen = bls.select(both, cut.default)
            assert chosen is not None
            slot_of = {"ab-a": "A", "ab-b": "B"}[chosen.name.stem]
            assert slot_of in (old, new), (plan, done, chosen)
    assert after(state, plan).primary() == new


# --- which entry was booted ---------------------------------------------------------------


def test_loader_entry_selected_is_read_from_efivarfs(tmp_path: Path) -> None:
    var = tmp_path / "LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
    assert loader_entry_selected(tmp_path) is None
    var.write_bytes(b"\x06\x00\x00\x00" + "ab-b+0-1.efi\0".encode("utf-16-le"))
    assert loader_entry_selected(tmp_path) == "ab-b+0-1.efi"
    entries = {"A": "EFI/Linux/ab-A.efi", "B": "EFI/Linux/ab-B.efi"}
    assert slot_of_entry("ab-b+0-1.efi", entries) == "B"
    assert slot_of_entry("AB-A.EFI", entries) == "A"
    assert slot_of_entry("\\EFI\\Linux\\ab-a+1-0.efi", entries) == "A"
    assert slot_of_entry("debian.conf", entries) is None


def _finishes(call: Callable[[], object], seconds: float = 20.0) -> object:
    """`call()`'s result, or a failure if it has not returned within `seconds` (a FIFO
    opened for reading blocks until a writer comes: the test must not hang with it)."""
    done: list[tuple[object, BaseException | None]] = []

    def run() -> None:
        try:
            done.append((call(), None))
        except BaseException as err:  # re-raised in the test's thread
            done.append((None, err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"still blocked after {seconds} s"
    result, error = done[0]
    if error is not None:
        raise error
    return result


def test_a_fifo_where_a_uki_or_loader_conf_should_be_never_blocks(esp: Path) -> None:
    (esp / "EFI/Linux").mkdir(parents=True)
    os.mkfifo(esp / "EFI/Linux/other.efi")  # another OS's UKI, as systemd-boot sorts it
    state = _finishes(backend(esp).load)
    assert isinstance(state, SdBootState) and state.primary() == "A"  # the FIFO: skipped
    (esp / "loader/loader.conf").unlink()
    os.mkfifo(esp / "loader/loader.conf")
    with pytest.raises(EntryError, match="not a regular file"):
        _finishes(backend(esp).load)
