"""Build release N+1's ext4 image from release N's, so unchanged files keep their blocks.

`mkfs.ext4 -d` (tools/node/release.py `_mkfs`) allocates files in the order it walks
the tree: one added package shifts every file allocated after it, and a delta install
(docs/delta.md) must fetch all the moved chunks. `build_incremental(base, tree, out,
label)` instead copies release N's image and applies the difference to N+1's staged
tree in place, on a loop mount (the idea of Android's e2fsdroid `base_fs`):

* new files are created, changed files are rewritten in place (overwritten, not
  unlinked and created: an equal-size rewrite keeps its blocks, a grown one keeps its
  first blocks), removed entries deleted; owners, modes, xattrs and mtimes are set as
  the tree has them, each only when it differs, so an unchanged inode is not written;
* timestamps are stored as `mkfs.ext4 -d` stores them (whole seconds; ctime and a new
  inode's crtime are the tree's ctime): the kernel's "now" is replaced with debugfs
  after the unmount, and the inodes this build freed are cleared (no dtime left);
* the journal is written by jbd2 while mounted; after a clean unmount it holds only
  retired transactions, so its blocks are copied back from N (which must be clean: no
  recovery pending). The journal stays where it was and reads as N's;
* free blocks holding what this build deleted or truncated are zeroed: stale data
  would ship in the image and grow the full download (mkfs leaves free space zero);
* the superblock fields the mount changes (mount and write times, mount count, kbytes
  written, last mount point) are put back to N's; the label is set to `label`;
* if N+1's tree needs more room than N's image has (the size `_mkfs` would pick for
  the tree), the copy is grown first with resize2fs: the new block groups are appended,
  nothing already placed moves. The image never shrinks (that would move blocks);
* placement is deterministic: the writes run in one process pinned to one CPU, mounted
  `nodelalloc` (blocks are chosen at write(), by this process, not by a flusher thread:
  ext4's per-CPU preallocation cannot differ) with every group's bitmap loaded before
  the first write (mballoc skips groups still loading). Not byte for byte: ext4 gives
  each new inode a random `i_generation`, which seeds the checksums of its inode,
  directory and extent blocks and cannot be set under metadata_csum
  (EXT4_IOC_SETVERSION is refused), so two builds differ in those few blocks;
* `e2fsck -fn` must pass at the end; the image is written as `<out>.partial` and
  renamed into place.

Needs root (mount), e2fsprogs (debugfs, tune2fs, resize2fs, e2fsck) and a loop device.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tools.node.rootfs import run

MiB = 1 << 20
PIECE = 1 << 20  # compare and rewrite files 1 MiB at a time
LAST_MOUNTED = 0x88  # s_last_mounted: the kernel writes the mount point there
MOUNT_OPTIONS = "loop,noatime,nodelalloc,noinit_itable,nodiscard,mb_optimize_scan=0"


class IncrementalBuildError(RuntimeError):
    """The incremental build could not be done; the message names the image and why."""


@dataclass
class Stats:
    """What the build did to N's filesystem."""

    created: int = 0  # inodes made (files, dirs, links, nodes)
    rewritten: int = 0  # regular files whose content was overwritten in place
    metadata_only: int = 0  # inodes whose owner, mode, xattrs or mtime alone changed
    removed: int = 0  # entries deleted (a removed directory counts once per entry)
    unchanged: int = 0
    bytes_written: int = 0  # file content written
    grown_from: int | None = None  # N's size when the image had to grow
    size: int = 0
    seconds: float = 0.0
    debugfs_commands: int = 0
    free_bytes_zeroed: int = 0  # stale data of deleted or truncated files, zeroed


@dataclass
class _Sync:
    """Makes the tree at `dst` (a mounted filesystem) equal the tree at `src`."""

    src: Path
    dst: Path
    stats: Stats
    links: dict[tuple[int, int], Path] = field(default_factory=dict)  # src inode -> dst path
    groups: dict[tuple[int, int], list[Path]] = field(default_factory=dict)  # its names
    claimed: dict[int, tuple[int, int]] = field(default_factory=dict)  # dst ino -> src inode
    touched: dict[Path, tuple[int, bool]] = field(default_factory=dict)  # rel -> (ctime, new)
    freed: set[int] = field(default_factory=set)  # dst inode numbers unlinked

    def touch(self, rel: Path, *, new: bool = False) -> None:
        ctime = int(os.lstat(self.src / rel).st_ctime)
        self.touched[rel] = (ctime, new or self.touched.get(rel, (0, False))[1])

    def directory(self, rel: Path) -> None:
        names = sorted(os.listdir(self.src / rel))
        keep = set(names) | ({"lost+found"} if rel == Path(".") else set())
        for name in sorted(os.listdir(self.dst / rel)):
            if name not in keep:  # deleted first: its space is free for what follows
                self.remove(self.dst / rel / name)
                self.touch(rel)
        for name in names:
            self.entry(rel / name)

    def remove(self, path: Path) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(path):
                self.remove(path / name)
            os.rmdir(path)
        else:
            os.unlink(path)
        self.stats.removed += 1
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):
            self.freed.add(st.st_ino)

    def entry(self, rel: Path) -> None:
        st = os.lstat(self.src / rel)
        path = self.dst / rel
        try:
            old: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            old = None
        kind = stat.S_IFMT(st.st_mode)
        if old is not None and stat.S_IFMT(old.st_mode) != kind:
            self.remove(path)
            old = None
        wrote = False
        if stat.S_ISDIR(kind):
            if old is None:
                os.mkdir(path, 0o700)
            self.directory(rel)
        elif stat.S_ISREG(kind):
            outcome = self.regular(rel, st, old)
            if outcome == "link":
                return  # another link of an inode already synced
            wrote = outcome in ("written", "adopted-written")
            if outcome == "created":
                old = None
        elif stat.S_ISLNK(kind):
            target = os.readlink(self.src / rel)
            if old is not None and os.readlink(path) != target:
                os.unlink(path)
                old = None
            if old is None:
                os.symlink(target, path)
        else:  # character or block device, FIFO, socket
            if old is not None and old.st_rdev != st.st_rdev:
                os.unlink(path)
                old = None
            if old is None:
                os.mknod(path, kind | 0o600, st.st_rdev)
        if old is None:
            self.stats.created += 1
            self.touch(rel, new=True)
            self.touch(rel.parent)
        self.metadata(rel, st, changed=old is None or wrote)

    def regular(self, rel: Path, st: os.stat_result, old: os.stat_result | None) -> str:
        """Sync one regular file: "link" (a further link of a synced inode), "created",
        "written" (rewritten in place), "same", or "adopted[-written]" (linked to the
        inode N holds under another name of the file, then synced in place)."""
        key = (st.st_dev, st.st_ino)
        path = self.dst / rel
        if st.st_nlink > 1 and key in self.links:
            first = self.links[key]
            if old is not None and old.st_ino == os.lstat(first).st_ino:
                self.stats.unchanged += 1
                return "link"
            if old is not None:
                os.unlink(path)
            os.link(first, path)
            self.stats.created += 1
            self.touch(rel)
            self.touch(rel.parent)
            return "link"
        if old is not None and self.claimed.get(old.st_ino, key) != key:
            os.unlink(path)  # that inode now belongs to another file of the tree
            old = None
        outcome = "same"
        adopted = old is None and self._adopt(key, rel)
        if adopted:  # a new name of a file N already has under another of its names
            old = os.lstat(path)
            self.stats.created += 1
            self.touch(rel.parent)
            outcome = "adopted"
        if old is None:
            outcome = "created"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                self.stats.bytes_written += _copy_into(self.src / rel, fd, st.st_size)
            finally:
                os.close(fd)
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                written = _copy_into(self.src / rel, fd, st.st_size, current=path)
            finally:
                os.close(fd)
            if written or old.st_size != st.st_size:
                outcome = "adopted-written" if adopted else "written"
                self.stats.rewritten += 1
                self.stats.bytes_written += written
                self.touch(rel)
        ino = os.lstat(path).st_ino
        self.claimed[ino] = key
        if st.st_nlink > 1:
            self.links[key] = path
        return outcome

    def _adopt(self, key: tuple[int, int], rel: Path) -> bool:
        """Link `rel` to the unclaimed file N holds under another name of inode `key`.

        The tree is walked in name order: without this, a hard link added before the
        old name ("big-link" < "big.bin") would copy the file into new blocks and the
        old name would then be relinked to the copy."""
        for other in self.groups.get(key, ()):
            try:
                found = os.lstat(self.dst / other)
            except FileNotFoundError:
                continue
            if other != rel and stat.S_ISREG(found.st_mode) and found.st_ino not in self.claimed:
                os.link(self.dst / other, self.dst / rel)
                return True
        return False

    def scan(self) -> None:
        """Every name of each multiply linked regular file of the tree, in walk order."""
        for dirpath, _dirs, files in os.walk(self.src):
            for name in sorted(files):
                path = Path(dirpath) / name
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    self.groups.setdefault(key, []).append(path.relative_to(self.src))

    def metadata(self, rel: Path, st: os.stat_result, *, changed: bool) -> None:
        """Owner, mode, xattrs and mtime as the tree has them, each only if it differs."""
        path, src = self.dst / rel, self.src / rel
        now = os.lstat(path)
        meta = False
        if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid):
            os.lchown(path, st.st_uid, st.st_gid)  # before chmod: chown clears set-id bits
            now, meta = os.lstat(path), True
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(now.st_mode) != stat.S_IMODE(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode))
            meta = True
        want = _xattrs(src)
        have = _xattrs(path)
        for name in have.keys() - want.keys():
            os.removexattr(path, name, follow_symlinks=False)
            meta = True
        for name, value in sorted(want.items()):
            if have.get(name) != value:  # after chown and writes: both drop capabilities
                os.setxattr(path, name, value, follow_symlinks=False)
                meta = True
        now = os.lstat(path)
        # mkfs.ext4 -d stores whole seconds; a directory whose entries changed has a new mtime
        if changed or meta or int(now.st_mtime) != int(st.st_mtime) or now.st_mtime_ns % 10**9:
            times = (int(st.st_atime) * 10**9, int(st.st_mtime) * 10**9)
            os.utime(path, ns=times, follow_symlinks=False)
            meta = True
        if meta:
            self.touch(rel)
            if not changed:
                self.stats.metadata_only += 1
        elif not changed:
            self.stats.unchanged += 1


def _xattrs(path: Path) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def _copy_into(src: Path, fd: int, size: int, *, current: Path | None = None) -> int:
    """Write `src` over the file open as `fd`, only the pieces that differ; bytes written."""
    written = 0
    with src.open("rb") as s, (current or src).open("rb") as c:
        offset = 0
        while True:
            piece = s.read(PIECE)
            if not piece:
                break
            if current is None or c.read(len(piece)) != piece:
                os.pwrite(fd, piece, offset)
                written += len(piece)
            offset += len(piece)
    if offset != size:
        raise IncrementalBuildError(f"{src} changed size while it was copied")
    if current is not None and os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
    return written


def build_incremental(base: Path, tree: Path, out: Path, label: str) -> Stats:
    """Write at `out` release N+1's image: `base` (N's ext4 image) synced to `tree`.

    Built as `<out>.partial` and renamed into place when e2fsck passes: an interrupted
    or failed build leaves no `out`.
    """
    started = time.monotonic()
    _check_inputs(base, tree)
    _check_clean(base)
    partial = out.with_name(out.name + ".partial")
    try:
        stats = _build(base, tree, partial, label)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    stats.seconds = round(time.monotonic() - started, 3)
    return stats


def _build(base: Path, tree: Path, out: Path, label: str) -> Stats:
    stats = Stats()
    saved = _super(base)
    # e2fsprogs stamps the superblock's write time when it closes an image: N's, not now
    clock = {**os.environ, "E2FSPROGS_FAKE_TIME": saved["wtime"].removeprefix("@")}
    run("cp", "--sparse=always", base, out)
    needed = _mkfs_size(tree)
    if needed > out.stat().st_size:
        stats.grown_from = out.stat().st_size
        with out.open("r+b") as f:
            f.truncate(needed)
        run("resize2fs", "-f", out, env=clock)
    journal = _journal_runs(out)
    with tempfile.TemporaryDirectory(prefix="incremental-") as tmp:
        mnt = Path(tmp)
        sync = _Sync(tree, mnt, stats)
        with _mounted(out, mnt), _one_cpu():
            try:
                sync.scan()
                sync.directory(Path("."))
                sync.metadata(Path("."), os.lstat(tree), changed=False)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise IncrementalBuildError(
                        f"{out}: no room for {tree} ({e.strerror}: {e.filename}); "
                        "grow the base image or build this release with mkfs"
                    ) from e
                raise
            inodes = {
                os.lstat(mnt / rel).st_ino: value for rel, value in sorted(sync.touched.items())
            }
            os.sync()
    _restore_journal(base, out, journal)
    stats.free_bytes_zeroed = _zero_free(out)
    freed = sync.freed - inodes.keys()
    commands = _inode_commands(inodes, freed)
    _put_last_mounted(base, out)
    commands += [f"ssv {name} {value}" for name, value in saved.items()]
    _debugfs(out, commands, clock)
    # last: tune2fs writes the backup superblocks too (debugfs only the primary)
    run("tune2fs", "-L", label, out, env=clock)
    stats.debugfs_commands = len(commands)
    check = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    if check.returncode != 0:
        raise IncrementalBuildError(f"{out}: e2fsck -fn is not clean:\n{check.stdout[-4000:]}")
    stats.size = out.stat().st_size
    return stats


def _check_inputs(base: Path, tree: Path) -> None:
    """N's image is a regular file and N+1's tree a directory: one line naming which is
    not, before any tool runs on them."""
    for path, want, test in (
        (base, "a regular file", stat.S_ISREG),
        (tree, "a directory", stat.S_ISDIR),
    ):
        try:
            mode = os.stat(path).st_mode
        except OSError as err:
            raise IncrementalBuildError(f"{path}: cannot read it: {err.strerror}") from err
        if not test(mode):
            raise IncrementalBuildError(f"{path}: is not {want}")


def _check_clean(image: Path) -> None:
    features = _dumpe2fs(image).get("Filesystem features", "").split()
    if "needs_recovery" in features:
        raise IncrementalBuildError(
            f"{image}: its journal needs recovery; build from a clean image"
        )
    if "has_journal" not in features:
        raise IncrementalBuildError(f"{image}: not an ext4 image with a journal")
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    if check.returncode != 0:
        raise IncrementalBuildError(f"{image}: e2fsck -fn is not clean: {check.stdout[-2000:]}")


def _dumpe2fs(image: Path) -> dict[str, str]:
    text = run("dumpe2fs", "-h", image).stdout
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    return fields


def _mkfs_size(tree: Path) -> int:
    """The image size release.py `_mkfs` would choose for `tree`."""
    used = int(run("du", "-sb", tree).stdout.split()[0])
    return (used * 5 // 4 + 24 * MiB + 4 * MiB - 1) // (4 * MiB) * (4 * MiB)


def _super(image: Path) -> dict[str, str]:
    """The superblock fields a mount changes, as debugfs `ssv` takes them back (ext4's
    on-disk superblock at byte 1024: s_mtime, s_wtime, s_mnt_count, s_kbytes_written and
    the high bytes of the two times)."""
    with image.open("rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    mtime, wtime, count = struct.unpack_from("<IIH", sb, 0x2C)
    wtime_hi, mtime_hi = sb[0x274], sb[0x275]
    (kbytes,) = struct.unpack_from("<Q", sb, 0x178)
    return {
        "mtime": f"@{mtime | mtime_hi << 32}",
        "wtime": f"@{wtime | wtime_hi << 32}",
        "mnt_count": str(count),
        "kbytes_written": str(kbytes),
    }


def _put_last_mounted(base: Path, out: Path) -> None:
    """N's s_last_mounted bytes back (ssv writes a string, not the 64 bytes behind it);
    the superblock checksum is recomputed by the debugfs run that follows."""
    with base.open("rb") as f:
        f.seek(1024 + LAST_MOUNTED)
        raw = f.read(64)
    with out.open("r+b") as f:
        f.seek(1024 + LAST_MOUNTED)
        f.write(raw)


def _zero_free(image: Path) -> int:
    """Zero every free block that is not zero yet; returns the bytes zeroed.

    What this build deleted or truncated stays on its blocks after the unmount: it
    would ship in the image (a deleted file of an older release, readable by anyone with
    the image) and make the full download larger. `mkfs.ext4 -d` leaves free space zero;
    so does this."""
    block = int(_dumpe2fs(image)["Block size"])
    zeroed = 0
    with image.open("r+b") as f:
        for line in run("dumpe2fs", image).stdout.splitlines():
            # a group's "  Free blocks: 10-20, 25" (indented; the header's is a total)
            if not line.startswith("  Free blocks:"):
                continue
            for item in line.partition(":")[2].replace(" ", "").split(","):
                if not item:
                    continue
                first, _, last = item.partition("-")
                start, end = int(first) * block, (int(last or first) + 1) * block
                for offset in range(start, end, PIECE):
                    length = min(PIECE, end - offset)
                    if os.pread(f.fileno(), length, offset).count(0) != length:
                        os.pwrite(f.fileno(), bytes(length), offset)
                        zeroed += length
        os.fsync(f.fileno())
    return zeroed


def _journal_runs(image: Path) -> list[tuple[int, int]]:
    """The journal's blocks as (byte offset, length) runs."""
    block = int(_dumpe2fs(image)["Block size"])
    numbers = [int(n) for n in run("debugfs", "-R", "blocks <8>", image).stdout.split()]
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][0] + runs[-1][1] == n * block:
            runs[-1] = (runs[-1][0], runs[-1][1] + block)
        else:
            runs.append((n * block, block))
    if not runs:
        raise IncrementalBuildError(f"{image}: debugfs lists no journal blocks")
    return runs


def _restore_journal(base: Path, out: Path, runs: list[tuple[int, int]]) -> None:
    """Copy N's journal blocks back over the retired transactions of the mount."""
    with base.open("rb") as src, out.open("r+b") as dst:
        for offset, length in runs:
            src.seek(offset)
            dst.seek(offset)
            while length:
                piece = src.read(min(length, PIECE))
                dst.write(piece)
                length -= len(piece)
        dst.flush()
        os.fsync(dst.fileno())


def _inode_commands(inodes: dict[int, tuple[int, bool]], freed: set[int]) -> list[str]:
    """debugfs commands replacing the kernel's clock and random numbers with fixed values."""
    commands = []
    for ino, (ctime, new) in sorted(inodes.items()):
        commands += [f"sif <{ino}> ctime @{ctime}", f"sif <{ino}> ctime_extra 0"]
        if new:
            commands += [
                f"sif <{ino}> crtime @{ctime}",
                f"sif <{ino}> crtime_extra 0",
            ]
    commands += [f"clri <{ino}>" for ino in sorted(freed)]
    return commands


def _debugfs(image: Path, commands: list[str], env: dict[str, str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
        f.write("".join(c + "\n" for c in commands))
        f.flush()
        # -n: the superblock checksum is stale until this run writes it again
        proc = run("debugfs", "-w", "-n", "-f", f.name, image, env=env)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("debugfs 1.")]
    if errors:
        raise IncrementalBuildError(f"{image}: debugfs failed: {errors[0]}")


@contextmanager
def _mounted(image: Path, mnt: Path) -> Iterator[None]:
    run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, image, mnt)
    try:
        # mballoc skips groups whose bitmaps are not loaded yet (prefetch is asynchronous):
        # reading mb_groups loads every group first, so placement does not depend on I/O
        device = run("findmnt", "-n", "-o", "SOURCE", mnt).stdout.strip()
        Path(f"/proc/fs/ext4/{Path(device).name}/mb_groups").read_bytes()
        yield
    finally:
        run("umount", mnt)


@contextmanager
def _one_cpu() -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
