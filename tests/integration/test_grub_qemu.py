"""The shipped GRUB A/B script, run by real GRUB (x86_64-efi) under QEMU + OVMF.

The disk image is a GPT (sgdisk) with an ESP (mkfs.vfat + mcopy) holding a
grub-mkstandalone BOOTX64.EFI, the shipped `partition-layouts/grub-efi-ab.cfg`
unchanged as /EFI/BOOT/grub.cfg, and the grubenv; two ext4 root filesystems (with the
same label, so the script must choose by partition number) hold /boot/vmlinuz and
/boot/initrd.img. The standalone image's embedded config only sets `ab_dry_run=1` and
sources the shipped script, which then prints its decision (and the kernel command
line) on the serial console and halts instead of booting. After each boot the grubenv
is copied back out of the FAT with mcopy and read with `grub-editenv list` - what
GRUB's save_env really wrote.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool, run_tool
from updater.boot.base import BootContext, SlotState
from updater.boot.grub import (
    GrubBootloader,
    GrubState,
    initial_grubenv,
    primary_slot,
    slot_state,
)
from updater.disk.grubenv import read_grubenv, write_grubenv

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "partition-layouts" / "grub-efi-ab.cfg"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
GRUB_EFI_MODULES = Path("/usr/lib/grub/x86_64-efi")
SECTOR = 512
# (name, first sector, last sector); 16 MiB ESP, two 8 MiB root filesystems.
PARTS = [("esp", 2048, 34815), ("root_a", 34816, 51199), ("root_b", 51200, 67583)]
ESP_OFFSET = PARTS[0][1] * SECTOR
BOOT_TIMEOUT = 90.0

HARNESS = """\
set pager=0
insmod part_gpt
insmod fat
set ab_dry_run=1
search --no-floppy --set=esp --file /EFI/BOOT/grub.cfg
source ($esp)/EFI/BOOT/grub.cfg
echo "HARNESS: the shipped script returned"
halt
"""


def _require_file(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing; run `make test`, which installs it")
    return path


@dataclass
class Machine:
    disk: Path
    vars_template: Path
    work: Path
    boots: int = 0
    last_seconds: float = 0.0

    def put_grubenv(self, env: dict[str, str]) -> None:
        local = self.work / "grubenv"
        write_grubenv(local, env)
        run_tool("mcopy", "-o", "-i", f"{self.disk}@@{ESP_OFFSET}", local, "::/EFI/BOOT/grubenv")

    def get_grubenv(self) -> dict[str, str]:
        local = self.work / "grubenv.out"
        local.unlink(missing_ok=True)
        run_tool("mcopy", "-i", f"{self.disk}@@{ESP_OFFSET}", "::/EFI/BOOT/grubenv", local)
        out = run_tool("grub-editenv", local, "list").stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    def boot(self) -> str:
        """Power on, let GRUB decide, return the serial console text."""
        self.boots += 1
        vars_copy = self.work / f"vars{self.boots}.fd"
        shutil.copyfile(self.vars_template, vars_copy)
        log = self.work / f"serial{self.boots}.log"
        argv = [
            require_tool("qemu-system-x86_64"),
            "-machine", "q35,accel=tcg",
            "-m", "256",
            "-nodefaults",
            "-display", "none",
            "-serial", f"file:{log}",
            "-net", "none",
            "-no-reboot",
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-drive", f"if=virtio,format=raw,file={self.disk}",
        ]  # fmt: skip
        start = time.monotonic()
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"GRUB did not halt within {BOOT_TIMEOUT}s; console:\n{_read(log)}")
        self.last_seconds = time.monotonic() - start
        return _read(log)


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    work = tmp_path_factory.mktemp("grub-qemu")
    _require_file(OVMF_CODE)
    _require_file(GRUB_EFI_MODULES / "normal.mod")
    vars_template = _require_file(OVMF_VARS)

    harness = work / "harness.cfg"
    harness.write_text(HARNESS)
    efi = work / "BOOTX64.EFI"
    run_tool(
        "grub-mkstandalone", "-O", "x86_64-efi", "-o", efi,
        "--locales=", "--fonts=", "--themes=",
        f"boot/grub/grub.cfg={harness}",
    )  # fmt: skip

    esp = work / "esp.img"
    esp_sectors = PARTS[0][2] - PARTS[0][1] + 1
    run_tool("mkfs.vfat", "-C", esp, str(esp_sectors * SECTOR // 1024))
    run_tool("mmd", "-i", esp, "::/EFI", "::/EFI/BOOT")
    run_tool("mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI")
    run_tool("mcopy", "-i", esp, SCRIPT, "::/EFI/BOOT/grub.cfg")

    images = {"esp": esp}
    for name in ("root_a", "root_b"):
        tree = work / name
        (tree / "boot").mkdir(parents=True)
        (tree / "boot" / "vmlinuz").write_bytes(f"kernel of {name}\n".encode())
        (tree / "boot" / "initrd.img").write_bytes(f"initrd of {name}\n".encode())
        image = work / f"{name}.img"
        # Both slots carry the same filesystem label, as they do when one signed image
        # is written to either slot: GRUB must pick the slot by partition.
        run_tool("mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", tree, image, "8M")
        images[name] = image

    disk = work / "disk.img"
    with disk.open("wb") as f:
        f.truncate((PARTS[-1][2] + 2048) * SECTOR)
    args: list[str] = []
    for number, (name, first, last) in enumerate(PARTS, start=1):
        kind = "ef00" if name == "esp" else "8300"
        args += [f"-n{number}:{first}:{last}", f"-t{number}:{kind}", f"-c{number}:{name}"]
    run_tool("sgdisk", *args, disk)
    with disk.open("r+b") as f:
        for name, first, _last in PARTS:
            f.seek(first * SECTOR)
            f.write(images[name].read_bytes())
    yield Machine(disk=disk, vars_template=vars_template, work=work)


def _lines(console: str) -> list[str]:
    """The script's console lines, without the firmware's colour escapes."""
    text = re.sub(r"\x1b\[[0-9;=]*[A-Za-z]", "", console)
    return [line.strip() for line in text.splitlines() if line.startswith("ab-updater:")]


def _edit(machine: Machine, change: Callable[[GrubState], GrubState]) -> None:
    """Apply a backend transition to the grubenv on the image's ESP (load, write)."""
    local = machine.work / "edit.grubenv"
    write_grubenv(local, machine.get_grubenv())
    boot = GrubBootloader(BootContext(disk=machine.disk, grubenv=local))
    boot.write(change(boot.load()))
    machine.put_grubenv(read_grubenv(local))


def test_update_fallback_and_no_slot(machine: Machine) -> None:
    # Provisioned with A committed; the updater then makes B primary (one try).
    machine.put_grubenv(initial_grubenv("A"))
    _edit(machine, lambda state: state.try_next("B"))

    # Boot 1: GRUB boots B and records the try before booting.
    lines = _lines(machine.boot())
    assert lines == [
        "ab-updater: booting slot B (ORDER=B A)",
        "ab-updater: DRY RUN: slot B: linux (hd0,gpt3)/boot/vmlinuz",
        "ab-updater: DRY RUN: cmdline: root=PARTLABEL=root_b updater.slot=B",
    ]
    env = machine.get_grubenv()
    assert env == {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}
    assert slot_state(env, "B") is SlotState.TRYING

    # Boot 2: B never committed (it crashed): GRUB skips it and falls back to A.
    lines = _lines(machine.boot())
    assert lines == [
        "ab-updater: skipping slot B (OK=1 TRY=1)",
        "ab-updater: booting slot A (ORDER=B A)",
        "ab-updater: DRY RUN: slot A: linux (hd0,gpt2)/boot/vmlinuz",
        "ab-updater: DRY RUN: cmdline: root=PARTLABEL=root_a updater.slot=A",
    ]
    assert machine.get_grubenv() == {
        "ORDER": "B A", "A_OK": "1", "A_TRY": "1", "B_OK": "1", "B_TRY": "1"
    }  # fmt: skip

    # Boot 3: B was invalidated, A's try was never committed: no slot qualifies.
    _edit(machine, lambda state: state.invalidate("B"))
    lines = _lines(machine.boot())
    assert lines[:2] == [
        "ab-updater: skipping slot B (OK=0 TRY=0)",
        "ab-updater: skipping slot A (OK=1 TRY=1)",
    ]
    assert "ab-updater: NO BOOTABLE SLOT" in lines[2]
    assert lines[-1] == "ab-updater: DRY RUN: halt instead of reboot"
    # A (never invalidated) gets another try next boot; B stays invalid.
    env = machine.get_grubenv()
    assert env == {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
    assert primary_slot(env) == "A"
    assert machine.last_seconds < 30
