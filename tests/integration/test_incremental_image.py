"""tools/node/incremental.py: release N+1's ext4 image built from release N's image.

Release N is made by the builder's own `mkfs.ext4 -d` (tools/node/release.py `_mkfs`);
N+1's tree differs from N's in every way a release can (files added, removed, rewritten
at equal, larger and smaller sizes; modes, owners, mtimes, xattrs; symlinks retargeted;
a file becoming a directory and a directory a symlink; hard links made and broken;
device nodes and FIFOs). The result must pass `e2fsck -fn` and, mounted read-only
through a loop device, equal N+1's tree path for path (type, mode, owner, size, sha256,
symlink target, device number, xattrs, mtime, hard-link groups) - compared here by a
walker of the test's own, not by the module's code. Unchanged files must keep their
blocks, the journal must read as N's, the label must be the one asked for, and a second
build must place every file on the same blocks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_tool, run_tool
from tools.node import release as builder
from tools.node.incremental import IncrementalBuildError, build_incremental

pytestmark = pytest.mark.root

MiB = 1 << 20


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _blob(seed: str, size: int) -> bytes:
    """`size` bytes that differ per seed and per 2 KiB (no block of one file is another's)."""
    pieces, block, length = [], hashlib.sha256(seed.encode()).digest(), 0
    while length < size:
        block = hashlib.sha256(block).digest()
        pieces.append(block * 64)
        length += 64 * len(block)
    return b"".join(pieces)[:size]


def _tree_n(root: Path) -> None:
    _write(root / "usr/lib/big.bin", _blob("big", 3 * MiB + 123))  # unchanged
    _write(root / "usr/lib/same-size.bin", _blob("same", 200_000))  # rewritten, equal size
    _write(root / "usr/lib/grows.bin", _blob("grows", 50_000))
    _write(root / "usr/lib/shrinks.bin", _blob("shrinks", 300_000))
    _write(root / "usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755)  # mode changes
    _write(root / "usr/bin/setuid", b"\x7fELF fake", 0o4755)
    _write(root / "etc/owned", b"owned by root\n")  # owner changes
    _write(root / "etc/touched", b"mtime changes\n")
    _write(root / "etc/empty", b"")
    _write(root / "etc/xattr-kept", b"x\n")
    os.setxattr(root / "etc/xattr-kept", "user.kept", b"1")
    os.setxattr(root / "etc/xattr-kept", "user.changed", b"old")
    os.setxattr(root / "etc/xattr-kept", "trusted.removed", b"gone")
    _write(root / "gone/deep/file", b"removed with its directory\n")
    _write(root / "etc/removed", b"removed\n")
    _write(root / "usr/lib/removed.bin", _blob("removed", 100_000))
    _write(root / "becomes-dir", b"a file in N\n")
    _write(root / "becomes-link/inside", b"a directory in N\n")
    os.symlink("usr/lib/big.bin", root / "link-kept")
    os.symlink("usr/lib/grows.bin", root / "link-retargeted")
    os.symlink("nowhere", root / "link-dangling")
    _write(root / "usr/lib/hard-a", b"one inode, two names\n")
    os.link(root / "usr/lib/hard-a", root / "usr/lib/hard-b")
    _write(root / "usr/lib/split-a", b"linked in N\n")
    os.link(root / "usr/lib/split-a", root / "usr/lib/split-b")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "dev/fifo", 0o600)
    os.mknod(root / "dev/changes", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    (root / "var/empty").mkdir(parents=True)
    os.utime(root / "etc/touched", (1_600_000_000, 1_600_000_000))


def _tree_n1(root: Path) -> None:
    """N+1: every kind of change from N."""
    _write(root / "usr/lib/same-size.bin", _blob("same2", 200_000))
    _write(root / "usr/lib/grows.bin", _blob("grows", 50_000) + _blob("more", 400_000))
    _write(root / "usr/lib/shrinks.bin", _blob("shrinks", 100_000))
    (root / "usr/bin/tool").chmod(0o700)
    os.chown(root / "etc/owned", 1000, 100)
    os.utime(root / "etc/touched", (1_700_000_000, 1_700_000_000))
    os.setxattr(root / "etc/xattr-kept", "user.changed", b"new value")
    os.removexattr(root / "etc/xattr-kept", "trusted.removed")
    os.setxattr(root / "etc/xattr-kept", "user.added", b"added")
    shutil.rmtree(root / "gone")
    (root / "etc/removed").unlink()
    (root / "usr/lib/removed.bin").unlink()
    (root / "becomes-dir").unlink()
    _write(root / "becomes-dir/now", b"a directory in N+1\n")
    shutil.rmtree(root / "becomes-link")
    os.symlink("usr/lib", root / "becomes-link")
    (root / "link-retargeted").unlink()
    os.symlink("usr/lib/shrinks.bin", root / "link-retargeted")
    (root / "usr/lib/split-b").unlink()
    _write(root / "usr/lib/split-b", b"its own inode in N+1\n")
    os.link(root / "usr/lib/big.bin", root / "usr/lib/big-link")
    (root / "dev/changes").unlink()
    os.mknod(root / "dev/changes", 0o600 | stat.S_IFBLK, os.makedev(7, 1))
    _write(root / "usr/share/pkg/new.bin", _blob("new", 700_000))  # the "package"
    _write(root / "usr/share/pkg/README", b"new package\n", 0o444)
    os.symlink("../share/pkg/new.bin", root / "usr/bin/new")


def _snapshot(root: Path) -> tuple[dict[str, tuple[object, ...]], list[list[str]]]:
    """Every path under `root`: what a release's contents are; plus its hard-link groups."""
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = defaultdict(list)
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for path in paths:
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        xattrs = sorted(
            (n, os.getxattr(path, n, follow_symlinks=False))
            for n in os.listxattr(path, follow_symlinks=False)
        )
        entry: list[object] = [
            stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            int(st.st_mtime), xattrs,
        ]  # fmt: skip
        if stat.S_ISREG(st.st_mode):
            entry += [st.st_size, hashlib.sha256(path.read_bytes()).hexdigest(), st.st_nlink]
            inodes[st.st_ino].append(rel)
        elif stat.S_ISLNK(st.st_mode):
            entry.append(os.readlink(path))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry.append(st.st_rdev)
        entries[rel] = tuple(entry)
    groups = sorted(sorted(names) for names in inodes.values() if len(names) > 1)
    return entries, groups


@contextmanager
def _mounted_ro(image: Path, mnt: Path) -> Iterator[Path]:
    device = run_tool("losetup", "-r", "--find", "--show", image).stdout.strip()
    try:
        mnt.mkdir(exist_ok=True)
        run_tool("mount", "-t", "ext4", "-o", "ro,noload", device, mnt)
        try:
            yield mnt
        finally:
            run_tool("umount", mnt)
    finally:
        run_tool("losetup", "-d", device, check=False)


def _blocks(image: Path, paths: list[str]) -> dict[str, str]:
    """Each path's physical blocks, as debugfs lists them."""
    script = image.with_suffix(".blocks")
    script.write_text("".join(f'blocks "/{p}"\n' for p in paths))
    out = run_tool("debugfs", "-f", script, image).stdout
    listed = out.split("debugfs: ")[1:]
    assert len(listed) == len(paths), out[-2000:]
    return {p: text.split("\n", 1)[1].strip() for p, text in zip(paths, listed, strict=True)}


def _field(image: Path, name: str) -> str:
    for line in run_tool("dumpe2fs", "-h", image).stdout.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"dumpe2fs -h {image} has no {name}")


def _journal_bytes(image: Path, reference: Path) -> bytes:
    """The bytes of `image` at the blocks of `reference`'s journal (inode 8)."""
    block = int(_field(reference, "Block size"))
    numbers = [int(n) for n in run_tool("debugfs", "-R", "blocks <8>", reference).stdout.split()]
    assert numbers
    with image.open("rb") as f:
        return b"".join(os.pread(f.fileno(), block, n * block) for n in numbers)


def _assert_equals_tree(image: Path, tree: Path, tmp_path: Path) -> None:
    check = run_tool("e2fsck", "-fn", image, check=False)
    assert check.returncode == 0, check.stdout
    want, want_groups = _snapshot(tree)
    with _mounted_ro(image, tmp_path / "mnt") as mnt:
        got, got_groups = _snapshot(mnt)
    got.pop("lost+found", None)  # mkfs.ext4 -d makes it; the tree has none
    assert sorted(got) == sorted(want)
    differ = {rel: (want[rel], got[rel]) for rel in want if want[rel] != got[rel]}
    assert differ == {}
    assert got_groups == want_groups


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    if os.geteuid() != 0:
        pytest.fail("incremental image builds need root (run `make test` as root)")
    for tool in ("mkfs.ext4", "debugfs", "tune2fs", "resize2fs", "e2fsck", "dumpe2fs"):
        require_tool(tool)
    n, n1 = tmp_path / "tree-n", tmp_path / "tree-n1"
    n.mkdir()
    _tree_n(n)
    subprocess.run(["cp", "-a", n, n1], check=True)
    _tree_n1(n1)
    return n, n1


def _image_n(tree_n: Path, tmp_path: Path) -> Path:
    """Release N's image as the builder makes it (`mkfs.ext4 -d`)."""
    base = tmp_path / "n.ext4"
    builder._mkfs(tree_n, base, "root_a")
    return base


def test_incremental_image_equals_the_new_tree_and_keeps_placement(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    tree_n, tree_n1 = trees
    base = _image_n(tree_n, tmp_path)
    out = tmp_path / "n1.ext4"
    stats = build_incremental(base, tree_n1, out, "root_b")

    _assert_equals_tree(out, tree_n1, tmp_path)
    assert _field(out, "Filesystem volume name") == "root_b"
    assert "has_journal" in _field(out, "Filesystem features").split()
    assert _field(out, "Filesystem UUID") == _field(base, "Filesystem UUID")
    assert _journal_bytes(out, base) == _journal_bytes(base, base)
    assert stats.grown_from is None and out.stat().st_size == base.stat().st_size
    # Stable placement: what did not change, or was rewritten at its size, kept its blocks.
    kept = ["usr/lib/big.bin", "usr/lib/same-size.bin", "usr/bin/tool", "etc/owned"]
    assert _blocks(out, kept) == _blocks(base, kept)
    assert stats.rewritten >= 3 and stats.created >= 5 and stats.removed >= 4
    # What N+1 deleted or truncated is not shipped: its blocks, unless reused, are zeros.
    stale = [
        int(b)
        for p in ("usr/lib/removed.bin", "usr/lib/shrinks.bin", "etc/removed")
        for b in _blocks(base, [p])[p].split()
    ]
    block = int(_field(base, "Block size"))
    owners = run_tool("debugfs", "-R", "icheck " + " ".join(map(str, stale)), out).stdout
    free = [int(line.split()[0]) for line in owners.splitlines() if "not found" in line]
    assert len(free) > 100_000 // block
    with out.open("rb") as f:
        assert all(os.pread(f.fileno(), block, b * block) == bytes(block) for b in free)

    # A second build of the same (image, tree) puts every file on the same blocks.
    again = tmp_path / "again.ext4"
    build_incremental(base, tree_n1, again, "root_b")
    files = sorted(
        str(p.relative_to(tree_n1))
        for p in tree_n1.rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    assert _blocks(again, files) == _blocks(out, files)


def test_incremental_image_grows_when_the_tree_needs_more_room(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    tree_n, tree_n1 = trees
    base = _image_n(tree_n, tmp_path)
    free = int(_field(base, "Free blocks")) * int(_field(base, "Block size"))
    _write(tree_n1 / "usr/share/huge.bin", _blob("huge", free + 8 * MiB))
    out = tmp_path / "n1.ext4"
    stats = build_incremental(base, tree_n1, out, "root_a")

    _assert_equals_tree(out, tree_n1, tmp_path)
    assert stats.grown_from == base.stat().st_size < out.stat().st_size
    kept = ["usr/lib/big.bin", "usr/bin/tool"]
    assert _blocks(out, kept) == _blocks(base, kept)


def test_a_base_whose_journal_needs_recovery_is_refused(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    tree_n, tree_n1 = trees
    base = _image_n(tree_n, tmp_path)
    run_tool("debugfs", "-w", "-R", "feature needs_recovery", base)
    with pytest.raises(IncrementalBuildError, match="journal needs recovery"):
        build_incremental(base, tree_n1, tmp_path / "n1.ext4", "root_a")
    assert not (tmp_path / "n1.ext4").exists()


def test_a_missing_or_special_base_or_tree_is_one_line(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    tree_n, tree_n1 = trees
    base = _image_n(tree_n, tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (tmp_path / "absent.ext4", tree_n1, "cannot read it"),
        (fifo, tree_n1, "is not a regular file"),
        (base, base, "is not a directory"),
    ]
    for image, tree, why in cases:
        with pytest.raises(IncrementalBuildError, match=why) as caught:
            build_incremental(image, tree, tmp_path / "n1.ext4", "root_a")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "n1.ext4").exists()
