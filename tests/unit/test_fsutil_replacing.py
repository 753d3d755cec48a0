"""core.fsutil.replacing, the streaming form of atomic_write, and the new disk image of
`layout apply` built through it: the file a path names (a symlink is followed, the link
kept), complete or absent, no temporary file left either way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import DeviceError
from core.fsutil import replacing
from updater.disk.gpt import read_gpt
from updater.disk.layout import apply_layout, load_layout

LAYOUTS = Path(__file__).resolve().parents[2] / "partition-layouts"
MIB = 1 << 20


def test_what_the_block_writes_replaces_the_file_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"old")
    with replacing(path, mode=0o640) as f:
        os.ftruncate(f.fileno(), 4 * MIB)  # the descriptor may be used directly
        os.pwrite(f.fileno(), b"tail", 4 * MIB - 4)
        assert path.read_bytes() == b"old"  # nothing visible before the block ends
    assert path.stat().st_size == 4 * MIB and path.read_bytes()[-4:] == b"tail"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]


def test_an_error_in_the_block_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing(path) as f:
        f.write(b"half of the new content")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]


def test_a_new_image_is_created_where_a_dangling_symlink_points(tmp_path: Path) -> None:
    """`layout apply LAYOUT link --size N`: the image is made at the link's target (as
    every other file the tools write), the link is kept; no temp file in either place."""
    images = tmp_path / "images"
    images.mkdir()
    link = tmp_path / "node.img"
    link.symlink_to(images / "disk.img")
    layout = load_layout(LAYOUTS / "grub-efi-ab.toml")

    disk, _notes = apply_layout(layout, link, size=1 << 30)

    assert link.is_symlink() and os.readlink(link) == str(images / "disk.img")
    assert sorted(p.name for p in images.iterdir()) == ["disk.img"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "node.img"]
    assert (images / "disk.img").stat().st_size == 1 << 30
    assert read_gpt(images / "disk.img").partitions == disk.partitions


def test_an_image_the_file_system_cannot_hold_leaves_nothing(tmp_path: Path) -> None:
    layout = load_layout(LAYOUTS / "grub-efi-ab.toml")
    with pytest.raises(DeviceError, match=r"new\.img: cannot size image to \d+: "):
        apply_layout(layout, tmp_path / "new.img", size=(1 << 63) - 512)
    assert list(tmp_path.iterdir()) == []
