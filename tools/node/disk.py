"""The e2e node's disks: the GPT node disk (ESP + two slots + data) and the UPDATES disk.

The node disk is laid out by the project itself (`updater layout apply
partition-layouts/grub-efi-ab.toml`); partition offsets are then read back with
`sfdisk --json`, an independent reader. The ESP is a FAT filesystem holding
EFI/BOOT/BOOTX64.EFI - a `grub-mkstandalone` image whose memdisk carries the project's
A/B script (partition-layouts/grub-efi-ab.cfg) unchanged, sourced by a small embedded
grub.cfg that points it at the grubenv - and EFI/BOOT/grubenv, made with grub-editenv.

Invariants: slot A of a fresh node holds the given release and is the only slot
GRUB may boot (ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0); images are written into
the disk without mounting anything, and all-zero blocks are skipped so disks stay
sparse; the template disk is cached, every node gets its own sparse copy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.node.cache import REPO, Key, cached, default_cache_dir
from tools.node.rootfs import run

LAYOUT = REPO / "partition-layouts" / "grub-efi-ab.toml"
GRUB_SCRIPT = REPO / "partition-layouts" / "grub-efi-ab.cfg"
GRUB_MODULES = Path("/usr/lib/grub/x86_64-efi")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
DISK_SIZE = "1G"
ESP_GRUBENV = "::/EFI/BOOT/grubenv"
# Kernel options the node needs: the console on the serial port the runner reads, and
# reboot at once on a panic (QEMU's -no-reboot turns that into an exit).
EXTRA_CMDLINE = "console=ttyS0,115200 panic=-1"
EMBEDDED_CFG = f"""\
# Embedded in BOOTX64.EFI by tools/node/disk.py: find the ESP by its grubenv and
# run the project's A/B script (in this memdisk, unchanged) against it.
set pager=0
insmod part_gpt
insmod fat
insmod ext2
search --no-floppy --set=ab_esp --file /EFI/BOOT/grubenv
set ab_env="($ab_esp)/EFI/BOOT/grubenv"
set ab_extra_cmdline="{EXTRA_CMDLINE}"
source "$prefix/grub-efi-ab.cfg"
"""
INITIAL_GRUBENV = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
DATA_FS_SIZE = 64 << 20
CHUNK = 1 << 20


@dataclass(frozen=True)
class Partition:
    name: str
    offset: int  # bytes from the start of the disk
    size: int  # bytes


def partitions(disk: Path) -> dict[str, Partition]:
    """The disk's partitions by GPT name, as `sfdisk --json` reads them."""
    table = json.loads(run("sfdisk", "--json", disk).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    return {
        p["name"]: Partition(p["name"], p["start"] * sector, p["size"] * sector)
        for p in table["partitions"]
    }


def write_image(disk: Path, part: Partition, image: Path) -> None:
    """Copy `image` into `part` of `disk`, refusing one that does not fit; sparse."""
    size = image.stat().st_size
    if size > part.size:
        raise ValueError(f"{image} ({size} bytes) does not fit partition {part.name} "
                         f"({part.size} bytes)")  # fmt: skip
    zero = bytes(CHUNK)
    with image.open("rb") as src, disk.open("r+b") as dst:
        pos = 0
        while chunk := src.read(CHUNK):
            if chunk != zero[: len(chunk)]:
                dst.seek(part.offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def grub_efi(cache: Path) -> Path:
    """BOOTX64.EFI: grub-mkstandalone with the project's A/B script in its memdisk."""
    version = run("grub-mkstandalone", "--version").stdout.strip()
    key = Key("grub").text(version, EMBEDDED_CFG).files([Path(__file__), GRUB_SCRIPT])

    def build(out: Path) -> None:
        (out / "grub.cfg").write_text(EMBEDDED_CFG)
        run(
            "grub-mkstandalone", "-O", "x86_64-efi", "-o", out / "BOOTX64.EFI",
            "--locales=", "--fonts=", "--themes=",
            f"boot/grub/grub.cfg={out / 'grub.cfg'}",
            f"boot/grub/grub-efi-ab.cfg={GRUB_SCRIPT}",
        )  # fmt: skip

    return cached(cache, key, build) / "BOOTX64.EFI"


def make_esp(efi: Path, out: Path, size: int) -> Path:
    """A FAT image of `size` bytes with EFI/BOOT/BOOTX64.EFI and the initial grubenv."""
    env = out.with_name(out.name + ".grubenv")
    env.unlink(missing_ok=True)
    run("grub-editenv", env, "create")
    run("grub-editenv", env, "set", *(f"{k}={v}" for k, v in INITIAL_GRUBENV.items()))
    out.unlink(missing_ok=True)
    run("mkfs.vfat", "-n", "ESP", "-C", out, str(size // 1024))
    run("mmd", "-i", out, "::/EFI", "::/EFI/BOOT")
    run("mcopy", "-i", out, efi, "::/EFI/BOOT/BOOTX64.EFI")
    run("mcopy", "-i", out, env, ESP_GRUBENV)
    env.unlink()
    return out


def _layout_apply(disk: Path, size: str, layout: Path = LAYOUT) -> None:
    """The project's own `updater layout apply`, through its console script."""
    script = Path(sys.executable).with_name("updater")
    argv = [str(script)]
    if not script.exists():
        argv = [sys.executable, "-c", "from updater.cli import main; main()"]
    run(*argv, "layout", "apply", layout, disk, "--size", size)


def node_template(slot_a: Path, *, cache: Path | None = None, size: str = DISK_SIZE) -> Path:
    """A cached, never booted node disk with `slot_a` (an ext4 image) in slot A."""
    cache = cache or default_cache_dir()
    efi = grub_efi(cache)
    key = Key("disk").text(size, efi.parent.name, slot_a.parent.name, str(slot_a))
    key.files([Path(__file__), LAYOUT])

    def build(out: Path) -> None:
        assemble(out, size, LAYOUT, slot_a, lambda esp, n: make_esp(efi, esp, n))

    return cached(cache, key, build) / "node.img"


def assemble(
    out: Path, size: str, layout: Path, slot_a: Path, esp: Callable[[Path, int], Path]
) -> Path:
    """`out/node.img`: `layout` applied by the project's own tool, the ESP made by
    `esp(path, size)`, `slot_a` in root_a, an empty ext4 labelled data; scratch removed."""
    disk = out / "node.img"
    _layout_apply(disk, size, layout)
    parts = partitions(disk)
    write_image(disk, parts["esp"], esp(out / "esp.img", parts["esp"].size))
    write_image(disk, parts["root_a"], slot_a)
    data = out / "data.img"
    with data.open("wb") as f:
        f.truncate(min(DATA_FS_SIZE, parts["data"].size))
    run("mkfs.ext4", "-q", "-F", "-L", "data", "-m", "0", data)
    write_image(disk, parts["data"], data)
    for scratch in ("esp.img", "data.img"):
        (out / scratch).unlink()
    return disk


@dataclass(frozen=True)
class Node:
    """One virtual node: its own disk and UEFI variable store, in its own directory."""

    workdir: Path
    disk: Path
    ovmf_vars: Path

    def esp_offset(self) -> int:
        return partitions(self.disk)["esp"].offset

    def read_grubenv(self) -> dict[str, str]:
        """The grubenv on the ESP now, as `grub-editenv list` reads it."""
        local = self.workdir / "grubenv.read"
        local.unlink(missing_ok=True)
        run("mcopy", "-n", "-i", f"{self.disk}@@{self.esp_offset()}", ESP_GRUBENV, local)
        out = run("grub-editenv", local, "list").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write_grubenv(self, values: dict[str, str]) -> None:
        """Set variables in the ESP's grubenv with grub-editenv (test setup only)."""
        local = self.workdir / "grubenv.write"
        local.unlink(missing_ok=True)
        offset = self.esp_offset()
        run("mcopy", "-n", "-i", f"{self.disk}@@{offset}", ESP_GRUBENV, local)
        run("grub-editenv", local, "set", *(f"{k}={v}" for k, v in values.items()))
        run("mcopy", "-o", "-i", f"{self.disk}@@{offset}", local, ESP_GRUBENV)

    def partitions(self) -> dict[str, Partition]:
        """The node disk's partitions by GPT name, in disk order."""
        return partitions(self.disk)


def make_node(workdir: Path, slot_a: Path, *, cache: Path | None = None) -> Node:
    """A fresh node in `workdir`: a sparse copy of the cached template, fresh OVMF vars."""
    return node_from(node_template(slot_a, cache=cache), workdir)


def node_from(template: Path, workdir: Path) -> Node:
    """A fresh node in `workdir` from a never booted disk `template` (sparse copy)."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "node.img"
    run("cp", "--sparse=always", template, disk)
    ovmf_vars = workdir / "OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, ovmf_vars)
    return Node(workdir=workdir, disk=disk, ovmf_vars=ovmf_vars)


def make_updates_disk(repo_dir: Path | None, out: Path, *, commands: tuple[str, ...] = ()) -> Path:
    """An ext4 image labelled UPDATES: `repo_dir`'s files plus e2e/commands for init.

    The way a USB stick reaches an air-gapped node: the guest has no network, the
    signed repository arrives as a second disk, mounted read-only at /mnt/updates.
    """
    stage = out.with_name(out.name + ".stage")
    if stage.exists():
        shutil.rmtree(stage)
    if repo_dir is not None:
        shutil.copytree(repo_dir, stage, symlinks=True)
    (stage / "e2e").mkdir(parents=True, exist_ok=True)
    (stage / "e2e" / "commands").write_text("".join(f"{c}\n" for c in commands))
    used = int(subprocess.run(["du", "-sb", stage], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip
    size = (used * 5 // 4 + (8 << 20)) // (1 << 20) * (1 << 20)
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(size)
    run("mkfs.ext4", "-q", "-F", "-L", "UPDATES", "-m", "0", "-d", stage, out)
    shutil.rmtree(stage)
    return out
