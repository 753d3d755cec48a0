"""The grubenv we write is what the real `grub-editenv` writes and reads, and back."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import GrubenvError
from tests.conftest import run_tool
from updater.disk.grubenv import build_grubenv, read_grubenv, update_grubenv, write_grubenv

TRICKY = {
    "ORDER": "A B",
    "A_OK": "1",
    "back": "C:\\dir\\",
    "lines": "one\ntwo\n\nthree",
    "both": "a\\\nb",
    "spaces": "  lead and trail  ",
    "empty": "",
    "utf8": "grüße ✓",
}


def _grub_editenv_set(path: Path, env: dict[str, str]) -> None:
    run_tool("grub-editenv", path, "create")
    if env:
        run_tool("grub-editenv", path, "set", *(f"{k}={v}" for k, v in env.items()))


def _listed(env: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in env.items())


def test_ours_is_listed_exactly_by_grub_editenv(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    write_grubenv(path, TRICKY)
    assert run_tool("grub-editenv", path, "list").stdout == _listed(TRICKY)


def test_grub_editenv_output_is_read_exactly(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    _grub_editenv_set(path, TRICKY)
    assert read_grubenv(path) == TRICKY
    assert list(read_grubenv(path)) == list(TRICKY)


@pytest.mark.parametrize("env", [{}, {"ORDER": "A B"}, TRICKY])
def test_byte_identical_to_grub_editenv(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "grubenv"
    _grub_editenv_set(path, env)
    assert build_grubenv(env) == path.read_bytes()


def test_update_matches_grub_editenv_set_and_unset(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _grub_editenv_set(ours, TRICKY)
    _grub_editenv_set(theirs, TRICKY)
    update_grubenv(ours, set={"A_OK": "0", "new": "x\\y"}, unset=["lines"])
    run_tool("grub-editenv", theirs, "unset", "lines")
    run_tool("grub-editenv", theirs, "set", "A_OK=0", "new=x\\y")
    assert ours.read_bytes() == theirs.read_bytes()


def test_grub_editenv_edits_our_file(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    write_grubenv(path, {"ORDER": "A B", "A_TRY": "0"})
    run_tool("grub-editenv", path, "set", "A_TRY=1", "B_OK=1")
    assert read_grubenv(path) == {"ORDER": "A B", "A_TRY": "1", "B_OK": "1"}


def test_too_long_fails_like_grub_editenv_and_leaves_file(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    write_grubenv(path, {"ORDER": "A B"})
    before = path.read_bytes()
    with pytest.raises(GrubenvError, match="big= does not fit"):
        update_grubenv(path, set={"big": "x" * 950})
    assert path.read_bytes() == before
    # grub-editenv refuses the same value: the limit is the same.
    refused = run_tool("grub-editenv", path, "set", "big=" + "x" * 950, check=False)
    assert refused.returncode != 0
    assert path.read_bytes() == before
    # The largest value that fits for us also fits for grub-editenv, byte for byte.
    room = 1024 - len(before.rstrip(b"#")) - len("big=\n")
    update_grubenv(path, set={"big": "x" * room})
    other = tmp_path / "other"
    _grub_editenv_set(other, {"ORDER": "A B", "big": "x" * room})
    assert other.read_bytes() == path.read_bytes()


def test_grub_editenv_refuses_what_we_refuse(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(b"# GRUB Environment Blocc\n" + b"#" * 999)
    with pytest.raises(GrubenvError, match="signature"):
        read_grubenv(path)
    assert run_tool("grub-editenv", path, "list", check=False).returncode != 0
