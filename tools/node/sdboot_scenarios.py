"""Update scenarios on systemd-boot nodes (tools/node/sdboot.py), for tests/e2e.

Two nodes, each a fresh copy of the cached template (release 1.0.0 and its UKI in slot
A, committed):

* `run_update_and_rollback` (scenarios f and h): v1 installs v2 (root + UKI) into B and
  reboots; systemd-boot boots B once (`ab-B+1-0.efi` -> `+0-1`), v2's health check
  commits it (`ab-B.efi`, `default ab-b.efi`); a further boot is B again and installs
  v3, whose health check fails, into A; A boots once, fails, the agent marks A bad and
  reboots; systemd-boot boots B; a plain install finds nothing (v3 failed here).
* `run_panic` (scenario g): v1 installs a release whose kernel panics into B; B is
  booted once and panics; systemd-boot's counter has run out, so it boots A; the
  agent's health check records the version as failed; a plain install skips it.

Facts come from the console and from the disk after QEMU exited: the ESP's UKI names
and loader.conf through mtools (`read_esp`), the journal through debugfs, each slot's
partition and UKI by sha256 against the signed images. Nothing here decides an outcome.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.examplerepo import ImageSpec, add_release, make_repo, publish
from tools.node import BootResult, Node, boot, build_release, make_updates_disk
from tools.node.disk import partitions
from tools.node.scenarios import (
    INSTALL,
    health_of,
    install_of,
    json_lines,
    kernel_only_release,
    sha256_file,
)
from tools.node.sdboot import HARDWARE, EspState, build_uki, make_node, read_esp, sdboot_config

SLOT_OF_ROOT = {"/dev/nvme0n1p2": "A", "/dev/nvme0n1p3": "B"}
SLOT_PARTITION = {"A": "root_a", "B": "root_b"}
STATUS = "updater --json status"


@dataclass
class SdBoot:
    """One power-on of a systemd-boot node and what it showed."""

    number: int
    result: BootResult
    esp: EspState  # after QEMU exited
    esp_at_boot: tuple[str, ...]  # EFI/Linux as systemd-boot left it (the init's marker)
    journal: dict[str, Any]
    holds: dict[str, str | None]  # slot -> published version its partition holds
    ukis: dict[str, str | None]  # slot -> published version its UKI file is

    @property
    def slot(self) -> str | None:
        return SLOT_OF_ROOT.get(self.result.booted.get("root", ""))

    @property
    def version(self) -> str | None:
        return self.result.booted.get("version")

    @property
    def loader_entry(self) -> str | None:
        """LoaderEntrySelected as the booted system saw it (the init's marker)."""
        return self.result.fields("loader").get("entry")

    @property
    def health(self) -> str | None:
        return health_of(self.result)

    @property
    def install(self) -> dict[str, Any] | None:
        return install_of(self.result)

    @property
    def status(self) -> dict[str, Any] | None:
        docs = json_lines(self.result, STATUS)
        return docs[-1] if docs else None

    def describe(self) -> str:
        r = self.result
        words = [f"systemd-boot picked {self.loader_entry or '?'}"]
        if self.slot:
            words.append(f"slot {self.slot} came up running {self.version}")
        elif r.exit_reason == "panic":
            words.append("the kernel panicked")
        if self.health:
            words.append(f"health check: {self.health}")
        if self.install is not None:
            words.append(f"install: {json.dumps(self.install, sort_keys=True)[:80]}")
        words.append(r.exit_reason)
        return (
            f"boot {self.number} ({r.seconds:.0f} s): " + "; ".join(words)
            + f". EFI/Linux: {' '.join(self.esp.ukis)}; default {self.esp.default}"
        )  # fmt: skip


class SdBootScenario:
    """A fresh systemd-boot node with v1 in slot A, and the signed repository for it."""

    def __init__(
        self, workdir: Path, slot_a: Path, *, cache: Path | None, name: str,
        say: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.cache = cache
        self.name = name
        self.say = say
        self.node: Node = make_node(workdir / "node", slot_a, cache=cache)
        self.repo = workdir / "repo"
        self.boots: list[SdBoot] = []
        self.root_digest: dict[str, tuple[int, str]] = {}  # version -> (size, sha256)
        self.uki_digest: dict[str, str] = {}

    def publish(self, image: Path, version: str) -> None:
        """Sign `image` and its UKI as release `version` (roles root and uki)."""
        uki = build_uki(image, cache=self.cache)
        specs = [
            ImageSpec(image, version, role="root", hardware=(HARDWARE,), compression="zstd"),
            ImageSpec(uki, version, role="uki", hardware=(HARDWARE,), compression="zstd"),
        ]
        start = time.monotonic()
        if not self.repo.exists():
            make_repo(self.repo, specs)
        else:
            add_release(self.repo, specs)
            publish(self.repo)
        self.root_digest[version] = (image.stat().st_size, sha256_file(image))
        self.uki_digest[version] = sha256_file(uki)
        self.say(f"[{self.name}] published {version} ({time.monotonic() - start:.1f} s)")

    def boot(self, commands: Sequence[str] = (), *, timeout: float = 300.0) -> SdBoot:
        number = len(self.boots) + 1
        updates = None
        if commands:
            updates = make_updates_disk(
                self.repo if self.repo.exists() else None,
                self.workdir / f"updates-{number}.img",
                commands=tuple(commands),
            )
        result = boot(self.node, updates_disk=updates, timeout=timeout)
        if updates is not None:
            updates.unlink()
        esp = read_esp(self.node)
        at_boot = tuple(result.fields("esp-entries").get("linux", "").split(",")) or ()
        done = SdBoot(
            number, result, esp, tuple(x for x in at_boot if x), self.journal(),
            {s: self.slot_version(s) for s in SLOT_PARTITION},
            {s: self.uki_version(esp, s) for s in SLOT_PARTITION},
        )  # fmt: skip
        self.boots.append(done)
        self.say(f"[{self.name}] {done.describe()}  (console: {result.log_path})")
        return done

    def journal(self) -> dict[str, Any]:
        part = partitions(self.node.disk)["data"]
        out = subprocess.run(
            ["debugfs", "-R", "cat /journal.json", f"{self.node.disk}?offset={part.offset}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        doc: dict[str, Any] = json.loads(out.stdout) if out.stdout.strip() else {}
        return doc

    def slot_version(self, slot: str) -> str | None:
        part = partitions(self.node.disk)[SLOT_PARTITION[slot]]
        for version, (size, digest) in self.root_digest.items():
            if sha256_file(self.node.disk, size, part.offset) == digest:
                return version
        return None

    def uki_version(self, esp: EspState, slot: str) -> str | None:
        name = esp.uki_of(slot)
        if name is None or "|" in name:
            return None
        local = self.workdir / "uki.read"
        local.unlink(missing_ok=True)
        image = f"{self.node.disk}@@{partitions(self.node.disk)['esp'].offset}"
        subprocess.run(["mcopy", "-n", "-i", image, f"::/EFI/Linux/{name}", str(local)],
                       check=True, capture_output=True)  # fmt: skip
        digest = sha256_file(local)
        local.unlink()
        return next((v for v, d in self.uki_digest.items() if d == digest), None)


Say = Callable[[str], None]


def summary(boots: Sequence[SdBoot]) -> str:
    times = [b.result.seconds for b in boots]
    return f"{len(times)} boots, {sum(times):.0f} s, per boot max {max(times, default=0):.1f} s"


def run_update_and_rollback(workdir: Path, *, cache: Path | None, say: Say) -> SdBootScenario:
    """Scenarios f (update) and h (rollback) on one node: five boots (module docstring)."""
    config = sdboot_config()
    v1 = build_release(1, cache=cache, config=config)
    v2 = build_release(2, cache=cache, config=config)
    v3 = build_release(3, cache=cache, config=config, health="fail")
    node = SdBootScenario(workdir, v1, cache=cache, name="sd-boot", say=say)
    node.publish(v2, "2.0.0")
    node.boot([INSTALL])  # A: install v2 (root + UKI) into B, one try, reboot
    node.boot([STATUS])  # B, its one try: health check commits
    node.publish(v3, "3.0.0")
    node.boot([INSTALL])  # B again; install v3 into A, reboot
    node.boot()  # A, its one try: the health check fails, A bad, reboot
    node.boot([INSTALL])  # B; v3 failed here: nothing to install
    say(f"[sd-boot] {summary(node.boots)}")
    return node


def run_panic(workdir: Path, *, cache: Path | None, say: Say) -> SdBootScenario:
    """Scenario g: a release whose kernel panics; systemd-boot's counter falls back."""
    v1 = build_release(1, cache=cache, config=sdboot_config())
    broken = kernel_only_release("2.0.0", workdir / "broken-2.0.0.ext4", kernel_from=v1)
    node = SdBootScenario(workdir, v1, cache=cache, name="sd-panic", say=say)
    node.publish(broken, "2.0.0")
    node.boot([INSTALL])  # A: install the broken release into B, reboot
    node.boot()  # B, its one try: the kernel panics
    node.boot([INSTALL])  # the counter ran out: A; health check fell-back; no retry
    say(f"[sd-panic] {summary(node.boots)}")
    return node
