"""Crash-safe writes follow symlinks; bounded reads refuse what is not a regular file."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from core.fsutil import atomic_write, read_regular


def test_write_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    esp = tmp_path / "esp" / "EFI" / "BOOT"
    esp.mkdir(parents=True)
    real = esp / "grubenv"
    real.write_bytes(b"old")
    link = tmp_path / "grubenv"
    link.symlink_to(real)

    atomic_write(link, b"new")

    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == b"new"
    # The temp file was made beside the target (same file system), and is gone.
    assert sorted(p.name for p in esp.iterdir()) == ["grubenv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esp", "grubenv"]


def test_chain_of_relative_symlinks_and_a_dangling_one(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("d/c")  # dangling: d/c does not exist yet
    atomic_write(tmp_path / "a", b"x")
    assert (tmp_path / "d" / "c").read_bytes() == b"x"
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()


def test_symlink_loop_is_an_oserror_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "x", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "y"]


def test_read_regular_reads_bounded(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    assert read_regular(path, 5) == b"12345"
    with pytest.raises(OSError) as err:
        read_regular(path, 4)
    assert err.value.errno == errno.EFBIG and "larger than 4 bytes" in str(err.value.strerror)


@pytest.mark.parametrize("kind", ["fifo", "dir", "chardev"])
def test_read_regular_refuses_what_is_not_a_file_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif kind == "dir":
        path = tmp_path
    else:
        path = Path("/dev/zero")
    done = threading.Event()
    errors: list[OSError] = []

    def read() -> None:
        try:
            read_regular(path, 1 << 20)
        except OSError as e:
            errors.append(e)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(10), f"read_regular blocked on a {kind}"
    assert errors and "not a regular file" in str(errors[0].strerror)
