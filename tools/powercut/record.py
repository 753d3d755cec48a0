"""Record update cycles on a virtual node with every disk write logged.

A `Recording` is one node's cycle, boot by boot: the disk image just before each boot,
the boot's write log (QEMU's blklogwrites: every write and flush the guest issued to
the node disk, in order), the sha256 of the disk QEMU left, the repository the node's
UPDATES disk carried, and the console. Each boot is a new QEMU process with its own
log, so the boots chain: the disk after boot k (plus whatever the host changed before
the next power-on, e.g. the gptprio chooser) is the disk before boot k+1.

The cycles (`record_grub`, `record_gptprio`) are the e2e scenarios' (tools/node):
v1 commits itself and installs v2 into B, which boots and commits; v3 (whose health
check fails) is installed into A, boots, fails, rolls back to B; B finds nothing to
install. The grub cycle's releases remount the ESP with default options before the
agent runs, as a production node mounts it (fstab, systemd's automount: no `flush`;
the e2e init mounts it with `flush`, which makes vfat write metadata on close and so
hides how a plain mount orders the writes of a rename).

Invariants: nothing here judges; every path in a saved recording is inside its
directory; `Recording.load(save())` is the same recording.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.node import build_release
from tools.node.scenarios import HEALTH, INSTALL, Scenario, gptprio_config, kernel_only_release
from tools.powercut.fat import FatVolume
from tools.powercut.judge import BOOTX64, Release

Say = Callable[[str], None]
# What a production node's fstab does: the ESP mounted with the default options.
REAL_ESP_MOUNT = (
    'umount /boot/efi && mount -t vfat -o rw "$(blkid -t PARTLABEL=esp -o device | head -n 1)" '
    "/boot/efi"
)
REAL_NODE_BOOT = (REAL_ESP_MOUNT, HEALTH)


@dataclass
class RecordedBoot:
    number: int
    before: str  # file names, relative to the recording's directory
    log: str
    after_sha256: str
    repo: str | None  # the repository as published when this boot ran
    commands: list[str]
    console: str
    described: str


@dataclass
class Recording:
    variant: str  # grub | gptprio
    workdir: Path
    releases: dict[str, Release] = field(default_factory=dict)
    bootloader_sha256: str = ""
    boots: list[RecordedBoot] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.workdir / name

    def save(self) -> Path:
        doc = {
            "variant": self.variant,
            "releases": {k: asdict(r) for k, r in self.releases.items()},
            "bootloader_sha256": self.bootloader_sha256,
            "boots": [asdict(b) for b in self.boots],
        }
        out = self.workdir / "recording.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(out)
        return out

    @classmethod
    def load(cls, workdir: Path) -> Recording:
        doc = json.loads((workdir / "recording.json").read_text())
        return cls(
            variant=doc["variant"],
            workdir=workdir,
            releases={k: Release(**r) for k, r in doc["releases"].items()},
            bootloader_sha256=doc["bootloader_sha256"],
            boots=[RecordedBoot(**b) for b in doc["boots"]],
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Recorder:
    """Boots a `Scenario`'s node with its writes logged, keeping what replay needs."""

    def __init__(self, variant: str, workdir: Path, scenario: Scenario, slot_a: Path) -> None:
        self.rec = Recording(variant, workdir)
        self.scenario = scenario
        self.repo_snapshot: str | None = None
        disk = scenario.node.disk
        esp = next(p for n, p in scenario.node.partitions().items() if n == "esp")
        with disk.open("rb") as f:
            efi = FatVolume(f.fileno(), esp.offset).read_file(BOOTX64, 64 << 20)
        self.rec.bootloader_sha256 = hashlib.sha256(efi).hexdigest()
        self.add_release("1.0.0", slot_a)  # the factory image: a release too

    def add_release(self, version: str, image: Path) -> None:
        self.rec.releases[version] = Release(version, image.stat().st_size, sha256_file(image))

    def publish(self, image: Path, version: str) -> None:
        self.scenario.publish(image, version)
        self.add_release(version, image)
        snapshot = self.rec.workdir / f"repo-{len(self.rec.releases) - 1}"
        if snapshot.exists():
            shutil.rmtree(snapshot)
        # Hard links: published files are never rewritten in place (metadata is replaced).
        subprocess.run(["cp", "-al", str(self.scenario.repo), str(snapshot)], check=True)
        self.repo_snapshot = snapshot.name

    def boot(self, commands: Sequence[str] = ()) -> None:
        n = len(self.rec.boots) + 1
        before, log = f"before-{n}.img", f"boot-{n}.log"
        subprocess.run(
            ["cp", "--sparse=always", str(self.scenario.node.disk), str(self.rec.path(before))],
            check=True,
        )
        done = self.scenario.boot(commands, timeout=300, write_log=self.rec.path(log))
        self.rec.boots.append(
            RecordedBoot(
                number=n,
                before=before,
                log=log,
                after_sha256=sha256_file(self.scenario.node.disk),
                repo=self.repo_snapshot,
                commands=list(commands),
                console=str(done.result.log_path),
                described=done.describe(),
            )
        )
        self.rec.save()


def _scenario(
    workdir: Path, slot_a: Path, cache: Path | None, name: str, say: Say, gptprio: bool = False
) -> Scenario:
    return Scenario(workdir / "scenario", slot_a, cache=cache, name=name, say=say, gptprio=gptprio)


def record_grub(workdir: Path, *, cache: Path | None, say: Say) -> Recording:
    """The grub cycle (module docstring): 5 boots."""
    workdir.mkdir(parents=True, exist_ok=True)
    v1, v2 = (build_release(n, cache=cache, boot_commands=REAL_NODE_BOOT) for n in (1, 2))
    v3 = build_release(3, cache=cache, health="fail", boot_commands=REAL_NODE_BOOT)
    r = Recorder("grub", workdir, _scenario(workdir, v1, cache, "powercut-grub", say), v1)
    r.publish(v2, "2.0.0")
    r.boot([INSTALL])  # v1 commits, installs v2 into B, activates it, reboots
    r.boot()  # B boots, v2's health check commits it
    r.publish(v3, "3.0.0")
    r.boot([INSTALL])  # B: installs v3 into A, activates it, reboots
    r.boot()  # A: v3's health check fails: A invalidated, B primary, reboot
    r.boot([INSTALL])  # B: nothing to install (3.0.0 failed here)
    return r.rec


def record_gptprio(workdir: Path, *, cache: Path | None, say: Say) -> Recording:
    """The gptprio cycle: the agent writes GPT attribute bits (backup, then primary);
    the host plays the firmware's chooser before each boot (Scenario.gptprio_choose)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = gptprio_config()
    v1, v2 = (build_release(n, cache=cache, config=config) for n in (1, 2))
    v3 = build_release(3, cache=cache, health="fail", config=config)
    sc = _scenario(workdir, v1, cache, "powercut-gptprio", say, gptprio=True)
    sc.set_gpt("A", priority=1, tries=0, successful=True)
    sc.set_gpt("B", priority=0, tries=0, successful=False)
    r = Recorder("gptprio", workdir, sc, v1)
    r.publish(v2, "2.0.0")
    for step, commands in ((None, [INSTALL]), (None, []), (v3, [INSTALL]), (None, [])):
        if step is not None:
            r.publish(step, "3.0.0")
        sc.gptprio_choose()
        r.boot(commands)
    return r.rec


def record_small(workdir: Path, *, cache: Path | None, say: Say) -> Recording:
    """One boot, for `make test`: v1 commits and installs a 20 MiB kernel-only 2.0.0
    into B (grubenv commit, invalidate and activate; journal; slot writes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    v1 = build_release(1, cache=cache, boot_commands=REAL_NODE_BOOT)
    small = kernel_only_release("2.0.0", workdir / "small-2.0.0.ext4", kernel_from=v1)
    r = Recorder("grub", workdir, _scenario(workdir, v1, cache, "powercut-small", say), v1)
    r.publish(small, "2.0.0")
    r.boot([INSTALL])
    return r.rec
