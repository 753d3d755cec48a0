"""Update scenarios on virtual nodes: boots, what each boot showed, and the disk after.

Shared by the scenario tests (tests/e2e/test_scenarios.py) and `make demo`
(tools/demo.py), so it lives beside the node builder, outside tests/. A `Scenario` is
one node (a fresh copy of the cached template) plus the signed TUF repository its
UPDATES disk carries; `Scenario.boot()` powers the node on once and returns a `Boot`:
the facts read from that boot's serial console (which slot GRUB chose, which version
came up, what the agent's health check decided, the `install --json` output) and from
the disk after QEMU exited (the grubenv through `grub-editenv`, the agent's journal
and its recorded chunk indexes through `debugfs`, GPT bits through `cgpt`, slot
contents by sha256); what was published is read from the repository's own targets
metadata on the host (`Scenario.signed`).

The scenarios: `HappyThenFailed` (a, b and i on one node, run lazily so a test or the
demo runs only the boots it needs), `run_panic` (c), `run_power_cuts` (d),
`run_gptprio` (e); `Runner` runs them in background threads, two QEMUs at a time.

Invariants: nothing here decides an outcome - every fact comes from the console or
from the disk image read by an independent tool after the guest stopped; a command
runs in the guest only when a boot asks for it (python start-ups cost ~5 s under
TCG); each boot's wall-clock time is reported as it ends; the power cuts' seed is
reported and replayable (`AB_E2E_SEED`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.examplerepo import ImageSpec, add_release, make_repo, publish
from tools.node import BootResult, Node, boot, build_release, make_node, make_updates_disk
from tools.node.release import HARDWARE, agent_config

HEALTH = "updater health-check"
INSTALL = "updater --json install"
# An install that prints its result document (bytes fetched and reused), and then the
# reboot the agent would have asked for: its reboot hook, run as the next command.
INSTALL_NO_REBOOT = f"{INSTALL} --no-reboot"
REBOOT = "/usr/sbin/reboot"
SLOT_PARTITION = {"A": "root_a", "B": "root_b"}
GPT_INDEX = {"A": 2, "B": 3}  # partition-layouts/grub-efi-ab.toml (and gptprio-ab.toml)
# A failed slot is an error (SlotFailed, exit 5): its line is `updater: error: <outcome>`.
HEALTH_LINE = re.compile(
    r"^(?:updater: error: )?(nothing|waiting-for-reboot|committed|rolled-back|fell-back|"
    r"no-fallback|health check failed): slot ([AB])?"
)

ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")
GRUB_LINES = 'bootloader = "grub"\ngrubenv = "/boot/efi/EFI/BOOT/grubenv"\n'


def gptprio_config() -> str:
    """The node's agent config with `bootloader = "gptprio"` (no grubenv, as required)."""
    text = agent_config()
    if GRUB_LINES not in text:
        raise AssertionError("agent_config() changed; update GRUB_LINES in scenarios.py")
    return text.replace(GRUB_LINES, 'bootloader = "gptprio"\n')


def sha256_file(path: Path, length: int | None = None, offset: int = 0) -> str:
    """sha256 of `length` bytes (default: all) of `path` from `offset`."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = length if length is not None else path.stat().st_size - offset
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise ValueError(f"{path}: short read at {offset} + {length}")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def install_command(result: BootResult) -> str:
    """The `updater --json install ...` command line a boot started first (INSTALL if
    none); read from the `E2E: run` markers, as a rebooting install never finishes."""
    for line in result.serial_log.splitlines():
        cmd = line.removeprefix("E2E: run ")
        if cmd != line and (cmd == INSTALL or cmd.startswith(INSTALL + " ")):
            return cmd
    return INSTALL


def command_output(result: BootResult, command: str) -> list[str]:
    """Console lines between `E2E: run <command>` and its exit marker (first run)."""
    lines = result.serial_log.splitlines()
    try:
        start = lines.index(f"E2E: run {command}")
    except ValueError:
        return []
    out: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("E2E: exit=") and line.endswith(command):
            break
        out.append(line)
    return out


def json_lines(result: BootResult, command: str) -> list[dict[str, Any]]:
    """The JSON documents a command printed on the console, one per line."""
    docs = []
    for line in command_output(result, command):
        if line.startswith("{"):
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a kernel message cut into the line; never a whole document
    return docs


def grubenv_marker(result: BootResult) -> dict[str, str]:
    """The grubenv as GRUB left it, from the init's `E2E: grubenv ...` marker."""
    for line in result.markers:
        if line.startswith("grubenv "):
            rest = line.removeprefix("grubenv ")
            return dict(re.findall(r"(\w+)=(.*?)(?=\s+\w+=|\s*$)", rest))
    return {}


def health_of(result: BootResult) -> str | None:
    """The health check's decision in one boot (committed, rolled-back, fell-back,
    nothing...), None if it did not run."""
    output = command_output(result, HEALTH)
    for line in output:
        m = HEALTH_LINE.match(line)
        if m:
            return m.group(1)
    # A rollback reboots before the command prints its outcome: read the agent's log.
    if any("rolling back to slot" in line for line in output):
        return "rolled-back"
    return None


def install_of(result: BootResult) -> dict[str, Any] | None:
    """What `install` did in one boot, None if it never got as far as choosing.

    The `install --json` result document when the command printed one (nothing to
    install, or --no-reboot); an install that reboots the node (the agent's reboot
    hook) never returns, so then the agent's own log lines say what it did:
    `installing V into slot S`, `slot S (V) will be booted next`, `rebooting`.
    """
    command = install_command(result)
    results = [d for d in json_lines(result, command) if d.get("event") == "result"]
    if results:
        return {**results[-1], "result_printed": True}
    output = "\n".join(command_output(result, command))
    m = re.search(r"installing (\S+) into slot ([AB])", output)
    if m is None:
        return None
    version, slot = m.group(1), m.group(2)
    activated = f"slot {slot} ({version}) will be booted next" in output
    return {
        "installed": activated,  # written, verified, journalled, then activated
        "started": True,
        "version": version,
        "slot": slot,
        "activated": activated,
        "rebooting": "rebooting:" in output and "reboot" in result.markers,
        "reused": "already holds verified" in output,
        "result_printed": False,
    }


@dataclass
class Boot:
    """One power-on of a node and what it showed."""

    number: int
    result: BootResult
    grubenv: dict[str, str]  # on the ESP after QEMU exited (grub-editenv list)
    grubenv_at_boot: dict[str, str]  # as GRUB left it (the init's marker)
    journal: dict[str, Any]  # the agent's journal.json after QEMU exited (debugfs)
    holds: dict[str, str | None]  # slot -> published version it holds byte for byte
    gpt: dict[str, dict[str, int]] = field(default_factory=dict)  # cgpt, gptprio nodes
    # slot -> published version whose chunk index the agent recorded for the slot's root
    # (`<state_dir>/index/<slot>.root.index`, compared by sha256 with the signed index)
    indexes: dict[str, str | None] = field(default_factory=dict)

    @property
    def slot(self) -> str | None:
        return self.result.booted.get("slot")

    @property
    def version(self) -> str | None:
        return self.result.booted.get("version")

    @property
    def grub_said(self) -> list[str]:
        """The GRUB script's own lines (`ab-updater: ...`), without GRUB's colour codes."""
        lines = ANSI.sub("", self.result.serial_log).splitlines()
        return [x[x.index("ab-updater: ") :] for x in lines if "ab-updater: " in x]

    @property
    def health(self) -> str | None:
        """The health check's decision (committed, rolled-back, fell-back, nothing...)."""
        return health_of(self.result)

    @property
    def install(self) -> dict[str, Any] | None:
        """What `install` did (`install_of`), None if it never got as far as choosing."""
        return install_of(self.result)

    @property
    def progress(self) -> list[dict[str, Any]]:
        lines = json_lines(self.result, install_command(self.result))
        return [d for d in lines if d.get("event") == "progress"]

    def throughput_mib_s(self) -> float | None:
        """Install throughput inside the guest: progress lines over host arrival times.

        From the first progress line to the last one (download, decompression, hashing
        and writing; the read-back verify follows), timed as the host read the console.
        """
        points = []
        for seconds, line in self.result.timeline:
            if line.startswith("{") and '"progress"' in line:
                try:
                    points.append((seconds, int(json.loads(line)["done"])))
                except (json.JSONDecodeError, KeyError, ValueError):
                    continue
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        (t0, d0), (t1, d1) = points[0], points[-1]
        return (d1 - d0) / (1 << 20) / (t1 - t0)

    def describe(self) -> str:
        """This boot in plain words, from the console and the grubenv only."""
        r = self.result
        words = []
        chose = [x for x in self.grub_said if "booting slot" in x or "skipping" in x]
        if chose:
            words.append("GRUB: " + "; ".join(x.removeprefix("ab-updater: ") for x in chose))
        if self.slot:
            words.append(f"slot {self.slot} came up running version {self.version}")
        elif r.exit_reason == "panic":
            words.append("the kernel panicked before user space ran")
        if self.health:
            words.append(f"health check: {self.health}")
        install = self.install
        if install is not None:
            if install.get("installed"):
                rate = self.throughput_mib_s()
                words.append(
                    f"agent installed {install['version']} into slot {install['slot']}"
                    + (f" at {rate:.1f} MiB/s" if rate else "")
                    + (", made it primary with one try" if install.get("activated") else "")
                )
            elif install.get("started"):
                words.append(f"agent was writing {install['version']} into slot {install['slot']}")
            else:
                words.append("agent: nothing to install")
        ending = {
            "reboot": "the agent rebooted the node",
            "poweroff": "powered off",
            "panic": "the machine reset after the panic",
            "killed": f"POWER CUT ({r.killed_at})",
            "reset": "the machine reset itself",
            "timeout": "TIMED OUT",
            "error": "QEMU failed",
        }[r.exit_reason]
        words.append(ending)
        env = " ".join(f"{k}={v}" for k, v in sorted(self.grubenv.items()))
        return f"boot {self.number} ({r.seconds:.0f} s): " + "; ".join(words) + f". grubenv: {env}"


@dataclass(frozen=True)
class SignedImage:
    """One published image, as the repository's targets metadata lists it."""

    path: str
    length: int  # the compressed target: what a full install fetches
    raw_length: int
    raw_sha256: str
    index_length: int  # its chunk index target (0: none)
    index_sha256: str | None


class Scenario:
    """A fresh node with release v1 in slot A, and the signed repository for it."""

    def __init__(
        self,
        workdir: Path,
        slot_a: Path,
        *,
        cache: Path | None = None,
        name: str = "node",
        say: Callable[[str], None] = print,
        gptprio: bool = False,
    ) -> None:
        self.workdir = workdir
        self.cache = cache
        self.name = name
        self.say = say
        self.gptprio = gptprio
        self.node: Node = make_node(workdir / "node", slot_a, cache=cache)
        self.repo = workdir / "repo"
        self.boots: list[Boot] = []
        self.published: dict[str, Path] = {}
        self._digests: dict[str, str] = {}  # version -> sha256 of its raw image

    # --- the repository ----------------------------------------------------------

    def publish(self, image: Path, version: str) -> None:
        """Sign `image` as release `version` (zstd) and publish it on the UPDATES disk."""
        spec = ImageSpec(image, version, role="root", hardware=(HARDWARE,), compression="zstd")
        start = time.monotonic()
        if not self.repo.exists():
            make_repo(self.repo, [spec])
        else:
            add_release(self.repo, [spec])
            publish(self.repo)
        self.published[version] = image
        self._digests[version] = sha256_file(image)
        self.say(f"[{self.name}] published {version} ({time.monotonic() - start:.1f} s)")

    # --- booting -----------------------------------------------------------------

    def boot(
        self,
        commands: Sequence[str] = (),
        *,
        timeout: float = 240.0,
        kill_when: Callable[[str], bool] | None = None,
        write_log: Path | None = None,
    ) -> Boot:
        """Power on once; `commands` run after the image's own health check.

        `write_log`: record the node disk's writes and flushes there (`boot`'s option)."""
        number = len(self.boots) + 1
        updates = None
        if commands:
            updates = make_updates_disk(
                self.repo if self.repo.exists() else None,
                self.workdir / f"updates-{number}.img",
                commands=tuple(commands),
            )
        result = boot(
            self.node,
            updates_disk=updates,
            timeout=timeout,
            kill_when=kill_when,
            write_log=write_log,
        )
        if updates is not None:
            updates.unlink()
        at_boot = grubenv_marker(result)
        gpt = {slot: self.cgpt(slot) for slot in GPT_INDEX} if self.gptprio else {}
        holds = {slot: self.slot_version(slot) for slot in SLOT_PARTITION}
        indexes = {slot: self.index_version(slot) for slot in SLOT_PARTITION}
        done = Boot(
            number, result, self.node.read_grubenv(), at_boot, self.journal(), holds, gpt, indexes
        )
        self.boots.append(done)
        self.say(f"[{self.name}] {done.describe()}  (console: {result.log_path})")
        return done

    # --- the disk after a boot ---------------------------------------------------

    def data_file(self, path: str) -> bytes:
        """A file of the data partition (the agent's state_dir), read with debugfs (no
        mount); empty if there is none (debugfs then only complains on stderr)."""
        part = self.node.partitions()["data"]
        out = subprocess.run(
            ["debugfs", "-R", f"cat {path}", f"{self.node.disk}?offset={part.offset}"],
            capture_output=True, check=True,
        )  # fmt: skip
        return out.stdout

    def journal(self) -> dict[str, Any]:
        """The agent's journal on the data partition."""
        text = self.data_file("/journal.json")
        if not text.strip():
            return {}
        doc: dict[str, Any] = json.loads(text)
        return doc

    def index_version(self, slot: str, role: str = "root") -> str | None:
        """The published release whose signed chunk index the agent recorded for `slot`."""
        data = self.data_file(f"/index/{slot}.{role}.index")
        if not data or not self.repo.exists():
            return None
        digest = hashlib.sha256(data).hexdigest()
        for version in self.published:
            if self.signed(version, role).index_sha256 == digest:
                return version
        return None

    def signed(self, version: str, role: str = "root") -> SignedImage:
        """Release `version`'s `role` image as the newest targets metadata of the
        repository lists it (the file the node's TUF client verifies, read on the host)."""
        meta = self.repo / "metadata"
        newest = max(meta.glob("*.targets.json"), key=lambda p: int(p.name.split(".", 1)[0]))
        targets: dict[str, Any] = json.loads(newest.read_text())["signed"]["targets"]
        for path, target in targets.items():
            release = (target.get("custom") or {}).get("release", {})
            if (release.get("version"), release.get("role")) == (version, role):
                index = targets.get(release.get("index") or "")
                return SignedImage(
                    path,
                    int(target["length"]),
                    int(release["raw_length"]),
                    str(release["raw_sha256"]),
                    int(index["length"]) if index else 0,
                    index["hashes"]["sha256"] if index else None,
                )
        raise KeyError(f"{newest}: no {role} image of release {version}")

    def slot_version(self, slot: str) -> str | None:
        """The published release whose raw image slot `slot` starts with, if any."""
        part = self.node.partitions()[SLOT_PARTITION[slot]]
        by_size: dict[int, str] = {}
        for version, image in self.published.items():
            size = image.stat().st_size
            digest = by_size.get(size) or sha256_file(self.node.disk, size, part.offset)
            by_size[size] = digest
            if digest == self._digests[version]:
                return version
        return None

    def cgpt(self, slot: str) -> dict[str, int]:
        """priority, tries, successful of the slot's partition, as `cgpt show` reads them."""
        values = {}
        for flag, name in (("-P", "priority"), ("-T", "tries"), ("-S", "successful")):
            out = subprocess.run(
                ["cgpt", "show", "-i", str(GPT_INDEX[slot]), flag, str(self.node.disk)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            values[name] = int(out.stdout.strip())
        return values

    def set_gpt(self, slot: str, *, priority: int, tries: int, successful: bool) -> None:
        """Provision a slot's gptprio bits with `cgpt add` (factory setup, not the agent)."""
        subprocess.run(
            ["cgpt", "add", "-i", str(GPT_INDEX[slot]), "-P", str(priority), "-T", str(tries),
             "-S", str(int(successful)), str(self.node.disk)], check=True,
        )  # fmt: skip

    def gptprio_choose(self) -> str | None:
        """Play the firmware's gptprio chooser on the host, with cgpt, then point GRUB at it.

        What ChromeOS depthcharge / CoreOS's `gptprio.next` do: among the slots with
        `successful or (priority > 0 and tries > 0)`, the highest priority wins (ties:
        partition order); a slot not yet successful has its tries decremented before it
        is booted. The chosen slot is then forced in the grubenv (the only slot with
        _OK=1), because upstream GRUB cannot read these bits itself.
        """
        bits = {slot: self.cgpt(slot) for slot in GPT_INDEX}
        bootable = [
            s for s, b in bits.items()
            if b["successful"] or (b["priority"] > 0 and b["tries"] > 0)
        ]  # fmt: skip
        if not bootable:
            return None
        chosen = sorted(bootable, key=lambda s: (-bits[s]["priority"], GPT_INDEX[s]))[0]
        if not bits[chosen]["successful"]:
            tries = bits[chosen]["tries"] - 1
            subprocess.run(
                ["cgpt", "add", "-i", str(GPT_INDEX[chosen]), "-T", str(tries),
                 str(self.node.disk)], check=True,
            )  # fmt: skip
        other = "B" if chosen == "A" else "A"
        self.node.write_grubenv({
            "ORDER": f"{chosen} {other}", f"{chosen}_OK": "1", f"{chosen}_TRY": "0",
            f"{other}_OK": "0", f"{other}_TRY": "0",
        })  # fmt: skip
        self.say(f"[{self.name}] gptprio chooser (host, cgpt): {bits} -> slot {chosen}")
        return chosen


def per_boot_summary(boots: Sequence[Boot]) -> str:
    """One line: how long the boots took (for the test output and docs)."""
    if not boots:
        return "no boots"
    times = [b.result.seconds for b in boots]
    return (
        f"{len(times)} boots, {sum(times):.0f} s, per boot min {min(times):.1f} s "
        f"max {max(times):.1f} s mean {sum(times) / len(times):.1f} s"
    )


class HappyThenFailed:
    """Scenarios a, b and i on one node, boot by boot, run only as far as asked.

    1. v1 in slot A commits itself; the agent installs v2 (UPDATES disk) into B, reboots.
       A full install: the template's slot A has no recorded chunk index. The agent
       records v2's index for B.
    2. GRUB boots B (one try); v2's health check passes: committed.
    3. A further boot still boots B (committed again); v3 (whose health check
       fails) is published; the agent installs it into A by delta (chunks read from
       the booted B) and reboots.
    4. GRUB boots A; v3's health check fails: A marked bad, B primary, reboot.
    5. GRUB boots B; a plain `install` does not install v3 again.
    6. v4 (healthy) is published; from B the agent installs it into A by delta (chunks
       from the booted B at any offset, from A's v3 in place) with `--no-reboot`, so
       that it prints its result (bytes fetched and reused); then the reboot hook.
    7. GRUB boots A (one try); v4's health check passes: committed.
    """

    def __init__(
        self, workdir: Path, *, cache: Path | None = None, say: Callable[[str], None] = print
    ) -> None:
        self.say = say
        self.v1 = build_release(1, cache=cache)
        self.v2 = build_release(2, cache=cache)
        self.v3 = build_release(3, cache=cache, health="fail")
        self.cache = cache
        self.v4: Path | None = None  # built by boot 6 (the demo stops at boot 5)
        self.scenario = Scenario(workdir, self.v1, cache=cache, name="a/b", say=say)
        self.steps: list[Callable[[], list[Boot]]] = [
            self._boot1, self._boot2, self._boot3, self._boot4, self._boot5, self._boot6,
            self._boot7,
        ]  # fmt: skip

    @property
    def boots(self) -> list[Boot]:
        return self.scenario.boots

    def run_until(self, number: int) -> list[Boot]:
        """Run the boots up to `number` (1-7) that have not run yet; all boots so far."""
        while len(self.boots) < number:
            self.steps[len(self.boots)]()
        return self.boots[:number]

    def _boot1(self) -> list[Boot]:
        self.scenario.publish(self.v2, "2.0.0")
        return [self.scenario.boot([INSTALL])]

    def _boot2(self) -> list[Boot]:
        return [self.scenario.boot()]

    def _boot3(self) -> list[Boot]:
        self.scenario.publish(self.v3, "3.0.0")
        return [self.scenario.boot([INSTALL])]

    def _boot4(self) -> list[Boot]:
        return [self.scenario.boot()]

    def _boot5(self) -> list[Boot]:
        return [self.scenario.boot([INSTALL])]

    def _boot6(self) -> list[Boot]:
        self.v4 = build_release(4, cache=self.cache)
        self.scenario.publish(self.v4, "4.0.0")
        return [self.scenario.boot([INSTALL_NO_REBOOT, REBOOT])]

    def _boot7(self) -> list[Boot]:
        return [self.scenario.boot()]


def kernel_only_release(version: str, out: Path, *, kernel_from: Path) -> Path:
    """A release that can never reach user space: the kernel and no working init.

    `/boot/vmlinuz` is copied (with debugfs, no mount) from a real release; `/sbin/init`
    is a shell script in an image without a shell, so the kernel panics ("No working
    init found") - a broken release in the most basic way, 20 MiB instead of 240 so
    that installing it costs seconds. It carries `IMAGE_VERSION=<version>`.
    """
    stage = out.with_name(out.name + ".stage")
    (stage / "boot").mkdir(parents=True)
    (stage / "sbin").mkdir()
    (stage / "etc").mkdir()
    subprocess.run(
        ["debugfs", "-R", f"dump /boot/vmlinuz {stage / 'boot/vmlinuz'}", str(kernel_from)],
        check=True, capture_output=True,
    )  # fmt: skip
    init = stage / "sbin/init"
    init.write_text(f'#!/bin/sh\necho "E2E: broken init version={version}"\nexit 1\n')
    init.chmod(0o755)
    (stage / "etc/os-release").write_text(f"ID=ab-updater-e2e\nIMAGE_VERSION={version}\n")
    with out.open("wb") as f:
        f.truncate(20 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "root_a", "-m", "0", "-E", "root_owner=0:0",
         "-d", str(stage), str(out)], check=True,
    )  # fmt: skip
    return out


def run_panic(workdir: Path, *, cache: Path | None, say: Callable[[str], None]) -> Scenario:
    """Scenario c: v1 installs a release that panics; GRUB falls back; the agent records it."""
    v1 = build_release(1, cache=cache)
    broken = kernel_only_release("2.0.0", workdir / "broken-2.0.0.ext4", kernel_from=v1)
    node = Scenario(workdir, v1, cache=cache, name="c", say=say)
    node.publish(broken, "2.0.0")
    node.boot([INSTALL])  # commit v1, install the broken release into B, reboot
    node.boot()  # GRUB boots B once: the kernel panics, nothing of the agent runs
    node.boot()  # GRUB skips B (tried, never committed) and boots A; health-check
    say(f"[c] {per_boot_summary(node.boots)}")
    return node


@dataclass
class PowerCuts:
    node: Scenario
    seed: int
    points_mib: list[int]
    cut_after: list[int]  # bytes the agent had reported written when QEMU was killed


def run_power_cuts(
    workdir: Path, *, cache: Path | None, say: Callable[[str], None], seed: int, cuts: int = 2
) -> PowerCuts:
    """Scenario d: kill QEMU at seeded random points of the install, then retry."""
    rng = random.Random(seed)
    v2 = build_release(2, cache=cache)
    total_mib = v2.stat().st_size >> 20
    # One cut per equal share of 5-90 % of the image, at a random point inside it.
    share = 0.85 / cuts
    points = [round(rng.uniform(0.05 + i * share, 0.05 + (i + 1) * share) * total_mib)
              for i in range(cuts)]  # fmt: skip
    say(f"[d] seed {seed} (AB_E2E_SEED={seed} repeats it): power cuts after {points} MiB "
        f"of {total_mib} MiB")  # fmt: skip
    node = Scenario(workdir, build_release(1, cache=cache), cache=cache, name="d", say=say)
    node.publish(v2, "2.0.0")
    cut_after: list[int] = []
    for mib in points:
        seen: list[int] = []
        node.boot([INSTALL], kill_when=_progress_at_least(mib << 20, seen))
        cut_after.append(seen[-1] if seen else -1)
    node.boot([INSTALL])  # the retry, after the last cut
    say(f"[d] {per_boot_summary(node.boots)}")
    return PowerCuts(node, seed, points, cut_after)


def _progress_at_least(limit: int, seen: list[int]) -> Callable[[str], bool]:
    """A `kill_when`: true on the first progress line reporting >= `limit` bytes."""

    def when(line: str) -> bool:
        if not line.startswith("{") or '"progress"' not in line:
            return False
        try:
            done = int(json.loads(line)["done"])
        except (json.JSONDecodeError, KeyError, ValueError):
            return False
        seen.append(done)
        return done >= limit

    return when


@dataclass
class GptPrio:
    node: Scenario
    chosen: list[str | None]  # what the host's gptprio chooser picked before each boot
    bits_before: dict[str, dict[str, int]]  # after provisioning, before any boot


def run_gptprio(workdir: Path, *, cache: Path | None, say: Callable[[str], None]) -> GptPrio:
    """Scenario e: v1 -> v2 on a node whose agent drives `gptprio` (bits read by cgpt)."""
    config = gptprio_config()
    v1 = build_release(1, cache=cache, config=config)
    v2 = build_release(2, cache=cache, config=config)
    node = Scenario(workdir, v1, cache=cache, name="e", say=say, gptprio=True)
    # Provisioning, as partition-layouts/gptprio-ab.toml declares the bits.
    node.set_gpt("A", priority=1, tries=0, successful=True)
    node.set_gpt("B", priority=0, tries=0, successful=False)
    before = {slot: node.cgpt(slot) for slot in GPT_INDEX}
    node.publish(v2, "2.0.0")
    chosen = [node.gptprio_choose()]
    node.boot([INSTALL])  # A: install v2 into B (the agent sets B's bits), reboot
    chosen.append(node.gptprio_choose())
    node.boot()  # B: health check commits (successful=1)
    chosen.append(node.gptprio_choose())
    say(f"[e] {per_boot_summary(node.boots)}")
    return GptPrio(node, chosen, before)


class Runner:
    """Runs scenarios in background threads, `workers` QEMUs at a time.

    The e2e session starts the selected scenarios early (tests/e2e/conftest.py) so that
    their boots overlap with each other and with the boot tests: one TCG guest uses one
    host core. Each test then waits for its own scenario and asserts on what it
    returned; a scenario's exception is re-raised in its test. Messages are kept per
    scenario and printed by the test, not interleaved on the terminal.
    """

    def __init__(self, workdir: Path, cache: Path | None, *, workers: int = 2) -> None:
        self.workdir = workdir
        self.cache = cache
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scenario")
        self.futures: dict[str, Future[Any]] = {}
        self.logs: dict[str, list[str]] = {}
        self.printed: set[str] = set()

    def submit(self, name: str, job: Callable[[Path, Callable[[str], None]], Any]) -> None:
        """Start scenario `name` (once): `job(workdir, say)` runs in a worker thread."""
        if name in self.futures:
            return
        log = self.logs.setdefault(name, [])
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        self.futures[name] = self.pool.submit(job, workdir, log.append)

    def result(self, name: str, job: Callable[[Path, Callable[[str], None]], Any]) -> Any:
        """Scenario `name`'s result (submitting it now if the session did not); its log
        is printed for the test's output."""
        self.submit(name, job)
        try:
            return self.futures[name].result()
        finally:
            if name not in self.printed:
                self.printed.add(name)
                print("\n".join(self.logs[name]))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


Say = Callable[[str], None]
Job = Callable[[Path, Say], Any]
# The power cuts' seed: $AB_E2E_SEED, else new each session (the test prints it).
SEED = int(os.environ.get("AB_E2E_SEED") or time.time_ns() % 100_000)
SCENARIO_OF_TEST = {
    "a": "ab", "b": "ab", "c": "c", "d": "d", "e": "e",
    "f": "sd", "g": "sdpanic", "h": "sd",  # systemd-boot (tools/node/sdboot_scenarios.py)
    "i": "ab",
}  # fmt: skip
AB_BOOTS = {"a": 3, "b": 5, "i": 7}  # how far each test of the a/b node needs the chain


def job(name: str, cache: Path | None, *, ab_boots: int = 5) -> Job:
    """The runnable scenario `name` (ab, c, d, e, sd, sdpanic) for `Runner.submit`."""
    from tools.node import sdboot_scenarios  # it builds on this module

    def ab(workdir: Path, say: Say) -> HappyThenFailed:
        chain = HappyThenFailed(workdir, cache=cache, say=say)
        chain.run_until(ab_boots)
        say(f"[a/b] {per_boot_summary(chain.boots)}")
        return chain

    jobs: dict[str, Job] = {
        "ab": ab,
        "c": lambda workdir, say: run_panic(workdir, cache=cache, say=say),
        "d": lambda workdir, say: run_power_cuts(workdir, cache=cache, say=say, seed=SEED),
        "e": lambda workdir, say: run_gptprio(workdir, cache=cache, say=say),
        "sd": lambda workdir, say: sdboot_scenarios.run_update_and_rollback(
            workdir, cache=cache, say=say
        ),
        "sdpanic": lambda workdir, say: sdboot_scenarios.run_panic(workdir, cache=cache, say=say),
    }
    return jobs[name]


def start_selected(runner: Runner, test_names: Sequence[str]) -> None:
    """Submit the scenarios behind the selected `test_<letter>_...` tests, longest first."""
    letters = {n.split("_")[1] for n in test_names if n.startswith("test_")}
    names = {SCENARIO_OF_TEST[x] for x in letters if x in SCENARIO_OF_TEST}
    ab_boots = max((AB_BOOTS[x] for x in letters if x in AB_BOOTS), default=3)
    for name in ("ab", "d", "sd", "e", "c", "sdpanic"):
        if name in names:
            runner.submit(name, job(name, runner.cache, ab_boots=ab_boots))
