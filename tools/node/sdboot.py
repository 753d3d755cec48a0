"""systemd-boot e2e nodes: the real systemd-boot, Unified Kernel Images, UAPI boot counting.

A node disk laid out by `partition-layouts/systemd-boot-ab.toml`, whose ESP holds
Debian's systemd-boot (`systemd-bootx64.efi`, package systemd-boot-efi) as
EFI/BOOT/BOOTX64.EFI, `loader/loader.conf` (`timeout 0`, `default ab-a.efi`) and slot
A's UKI `EFI/Linux/ab-A.efi` - no counter: committed. Slot B has no entry yet.

A UKI (`build_uki`) is made with `objcopy` from systemd's stub (`linuxx64.efi.stub`),
as the systemd 252 documentation describes it (ukify is not in Debian 12): `.osrel` is
the release's os-release (systemd-boot sorts by its IMAGE_ID and IMAGE_VERSION),
`.linux` the release's own kernel, `.initrd` a busybox initrd that mounts the root
filesystem by its ext4 UUID, `.cmdline` `ab.root=UUID=<uuid> console=... panic=-1`.
The UKI names its root filesystem by content, not by slot, so one signed UKI boots
from either slot - the way a dm-verity `usrhash=` does in mkosi-built images.

The agent's config on these nodes (`sdboot_config`): `bootloader = "systemd-boot"`,
`esp = "/boot/efi"`, `boot_entries` `EFI/Linux/ab-A.efi` / `ab-B.efi`, and the role
`uki` of each slot a `file:` of that same path. A release is then two images: `root`
(the ext4 image, written to the slot's partition) and `uki` (written as the slot's
entry file on the ESP).

Invariants: every artefact is cached by its inputs (`tools.node.cache`); the ESP is
made and read with mtools, without mounting; the GRUB nodes of `tools.node.disk` are
untouched by this module.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools.node import disk as node_disk
from tools.node.cache import REPO, Key, cached, default_cache_dir
from tools.node.disk import DISK_SIZE, Node, assemble, node_from, partitions
from tools.node.release import HARDWARE, agent_config
from tools.node.rootfs import run

LAYOUT = REPO / "partition-layouts" / "systemd-boot-ab.toml"
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
BUSYBOX = Path("/bin/busybox")
ENTRIES = {"A": "EFI/Linux/ab-A.efi", "B": "EFI/Linux/ab-B.efi"}
LOADER_CONF = "timeout 0\ndefault ab-a.efi\n"
CMDLINE = "ab.root=UUID={uuid} console=ttyS0,115200 panic=-1"
# Section addresses for objcopy: after the stub's own sections (which end below 0x20000).
SECTIONS = ((".osrel", 0x20000), (".cmdline", 0x30000), (".linux", 0x2000000),
            (".initrd", 0x4000000))  # fmt: skip

INITRD_INIT = """#!/bin/busybox sh
# initrd of the ab-updater e2e UKIs (tools/node/sdboot.py): mount the root filesystem
# named by ab.root=UUID=... on the kernel command line, whichever slot holds it.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev
want=$($bb sed -n 's/.*ab\\.root=UUID=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
i=0
until dev=$($bb findfs "UUID=$want" 2>/dev/null); do
    i=$((i + 1)); [ $i -gt 200 ] && { echo "initrd: no filesystem UUID=$want"; exit 1; }
    $bb sleep 0.05
done
echo "initrd: root UUID=$want is $dev"
$bb mount -o ro -t ext4 "$dev" /root || { echo "initrd: cannot mount $dev"; exit 1; }
$bb umount /sys /proc
$bb umount /dev
exec $bb switch_root /root /sbin/init
"""

GRUB_LINES = 'bootloader = "grub"\ngrubenv = "/boot/efi/EFI/BOOT/grubenv"\n'
SDBOOT_LINES = (
    'bootloader = "systemd-boot"\nesp = "/boot/efi"\n'
    'boot_entries = {{ A = "{A}", B = "{B}" }}\n'.format(**ENTRIES)
)


def sdboot_config() -> str:
    """The node's agent config for systemd-boot: entries and `uki` file roles."""
    text = agent_config()
    edits = [(GRUB_LINES, SDBOOT_LINES)]
    for slot in ENTRIES:
        roots = f'[slots.{slot}]\nroot = "root_{slot.lower()}"\n'
        edits.append((roots, f'{roots}uki = "file:{ENTRIES[slot]}"\n'))
    for old, new in edits:
        if old not in text:
            raise AssertionError(f"agent_config() changed; update sdboot_config ({old!r})")
        text = text.replace(old, new)
    return text


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as an initrd)."""
    out = bytearray()
    for ino, (name, mode, content) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(content), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + "".join(f"{v:08X}" for v in fields).encode() + encoded
        out += bytes(-len(out) % 4) + content
        out += bytes(-len(out) % 4)
    return bytes(out)


def initrd(cache: Path) -> Path:
    """The UKIs' initrd: static busybox and INITRD_INIT, gzip'd newc cpio (cached)."""
    key = Key("initrd").text(INITRD_INIT, BUSYBOX.read_bytes()).files([Path(__file__)])

    def build(out: Path) -> None:
        dirs = [(d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "root")]
        files = [("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
                 ("init", 0o100755, INITRD_INIT.encode())]  # fmt: skip
        (out / "initrd.img").write_bytes(gzip.compress(_cpio(dirs + files), 6, mtime=0))

    return cached(cache, key, build) / "initrd.img"


def _debugfs(image: Path, command: str) -> bytes:
    done = subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, check=True)
    return done.stdout


def fs_uuid(image: Path) -> str:
    return run("blkid", "-o", "value", "-s", "UUID", image).stdout.strip()


def build_uki(release: Path, *, cache: Path | None = None) -> Path:
    """The UKI of the ext4 release image `release`: its kernel and os-release, an initrd
    that mounts it by UUID (cached by the image's identity and this builder)."""
    cache = cache or default_cache_dir()
    init = initrd(cache)
    st = release.stat()
    key = Key("uki").text(str(release), st.st_size, st.st_mtime_ns, init.parent.name)
    key.files([Path(__file__)]).text(STUB.read_bytes())

    def build(out: Path) -> None:
        (out / "vmlinuz").write_bytes(b"")
        run("debugfs", "-R", f"dump /boot/vmlinuz {out / 'vmlinuz'}", release)
        (out / "osrel").write_bytes(_debugfs(release, "cat /etc/os-release"))
        (out / "cmdline").write_text(CMDLINE.format(uuid=fs_uuid(release)) + "\n")
        shutil.copyfile(init, out / "initrd")
        files = {".osrel": "osrel", ".cmdline": "cmdline", ".linux": "vmlinuz", ".initrd": "initrd"}
        argv: list[str | Path] = ["objcopy"]
        for section, vma in SECTIONS:
            argv += ["--add-section", f"{section}={out / files[section]}",
                     "--change-section-vma", f"{section}={vma:#x}"]  # fmt: skip
        run(*argv, STUB, out / "uki.efi")
        for scratch in files.values():
            (out / scratch).unlink()

    return cached(cache, key, build) / "uki.efi"


def make_esp(out: Path, size: int, uki_a: Path) -> Path:
    """A FAT image: systemd-boot, loader.conf, slot A's UKI (committed), no slot B."""
    out.unlink(missing_ok=True)
    run("mkfs.vfat", "-n", "ESP", "-C", out, str(size // 1024))
    run("mmd", "-i", out, "::/EFI", "::/EFI/BOOT", "::/EFI/Linux", "::/loader")
    run("mcopy", "-i", out, SYSTEMD_BOOT, "::/EFI/BOOT/BOOTX64.EFI")
    conf = out.with_name(out.name + ".loader.conf")
    conf.write_text(LOADER_CONF)
    run("mcopy", "-i", out, conf, "::/loader/loader.conf")
    conf.unlink()
    run("mcopy", "-i", out, uki_a, f"::/{ENTRIES['A']}")
    return out


def node_template(slot_a: Path, *, cache: Path | None = None, size: str = DISK_SIZE) -> Path:
    """A cached, never booted systemd-boot node disk: `slot_a` and its UKI in slot A."""
    cache = cache or default_cache_dir()
    uki = build_uki(slot_a, cache=cache)
    key = Key("sdboot-disk").text(size, slot_a.parent.name, str(slot_a), uki.parent.name)
    key.files([Path(__file__), Path(node_disk.__file__), LAYOUT]).text(SYSTEMD_BOOT.read_bytes())

    def build(out: Path) -> None:
        assemble(out, size, LAYOUT, slot_a, lambda esp, n: make_esp(esp, n, uki))

    return cached(cache, key, build) / "node.img"


def make_node(workdir: Path, slot_a: Path, *, cache: Path | None = None) -> Node:
    """A fresh systemd-boot node in `workdir` (sparse copy of the template, new OVMF vars)."""
    return node_from(node_template(slot_a, cache=cache), workdir)


@dataclass(frozen=True)
class EspState:
    """What the ESP holds after a boot, read with mtools: the UKIs' names, loader.conf."""

    ukis: tuple[str, ...]  # file names in EFI/Linux, sorted
    loader_conf: str

    @property
    def default(self) -> str | None:
        for line in self.loader_conf.splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "default":
                return value.strip()
        return None

    def uki_of(self, slot: str) -> str | None:
        stem = Path(ENTRIES[slot]).stem.lower()
        found = [n for n in self.ukis if n.lower().split("+")[0].removesuffix(".efi") == stem]
        return found[0] if len(found) == 1 else (None if not found else "|".join(found))


def read_esp(node: Node) -> EspState:
    image = f"{node.disk}@@{partitions(node.disk)['esp'].offset}"
    listing = run("mdir", "-b", "-i", image, "::/EFI/Linux").stdout.split()
    names = tuple(sorted(Path(line).name for line in listing if line.lower().endswith(".efi")))
    conf = run("mtype", "-i", image, "::/loader/loader.conf").stdout
    return EspState(names, conf)


__all__ = [
    "ENTRIES",
    "HARDWARE",
    "EspState",
    "build_uki",
    "make_node",
    "node_template",
    "read_esp",
    "sdboot_config",
]
