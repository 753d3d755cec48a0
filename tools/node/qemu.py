"""Boot an e2e node in QEMU (TCG, q35, OVMF) and read what happened from its console.

The node disk is NVMe (the kernel's driver is built in, so no initrd is needed), the
UPDATES disk virtio-blk (read-only). QEMU runs with -no-reboot: a guest reboot,
poweroff or panic ends the process, so one `boot()` is exactly one boot; `boot_until`
starts the node again while it rebooted or panicked, like a power cycle would.

Invariants: the outcome (`exit_reason`) comes only from what the console shows and
from QEMU's exit - `E2E:` markers printed by the guest's init, the kernel's panic
line - never from the test's expectations; every boot has a hard timeout after which
QEMU is killed; the full console text is kept in a log file next to the disk.
`kill_when` is a power cut: QEMU is killed (SIGKILL, no guest shutdown) as soon as
a console line satisfies it, and the boot ends with `exit_reason == "killed"`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from tools.node.disk import OVMF_CODE, Node

ExitReason = Literal["poweroff", "reboot", "panic", "timeout", "reset", "error", "killed"]
MARKER = re.compile(r"^E2E: (.*?)\s*$", re.MULTILINE)
PANIC = "Kernel panic - not syncing"
DEFAULT_TIMEOUT = 180.0


@dataclass(frozen=True)
class BootResult:
    serial_log: str
    markers: tuple[str, ...]
    seconds: float
    exit_reason: ExitReason
    qemu_returncode: int | None
    log_path: Path
    commands: tuple[tuple[str, int], ...] = field(default=())
    killed_at: str | None = None  # the console line that triggered `kill_when`
    # (seconds since QEMU started, line) for every console line, as the host read it.
    timeline: tuple[tuple[float, str], ...] = field(default=())

    def fields(self, marker: str) -> dict[str, str]:
        """`key=value` words of the first marker starting with `marker`, e.g. booted."""
        for line in self.markers:
            word, _, rest = line.partition(" ")
            if word == marker:
                return dict(w.split("=", 1) for w in rest.split() if "=" in w)
        return {}

    @property
    def booted(self) -> dict[str, str]:
        """slot, version and root device of the booted system ({} if none booted)."""
        return self.fields("booted")

    def exit_status(self, command: str) -> int | None:
        """Exit status of a command init ran (first run), None if it never finished."""
        for cmd, status in self.commands:
            if cmd == command:
                return status
        return None


def _node_drive(node: Node, write_log: Path | None) -> list[str]:
    """The node disk's block backend: the raw file, or the file behind QEMU's
    `blklogwrites` driver, which appends every write, flush and discard the guest issues
    (with the written data, in dm-log-writes format) to `write_log` - the ground truth
    of what the disk saw, in order (tools/powercut reads and replays it)."""
    if write_log is None:
        return ["-drive", f"if=none,id=node,format=raw,file={node.disk}"]
    return [
        "-blockdev", f"driver=file,node-name=node-file,filename={node.disk}",
        "-blockdev", f"driver=file,node-name=node-log,filename={write_log}",
        "-blockdev", "driver=blklogwrites,node-name=node,file=node-file,log=node-log,"
        "log-append=off,log-sector-size=512",
    ]  # fmt: skip


def _qemu_argv(
    node: Node, updates_disk: Path | None, memory_mib: int, write_log: Path | None = None
) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 is not installed; run `make test`")
    argv = [
        qemu,
        "-machine", "q35,accel=tcg", "-smp", "1", "-m", str(memory_mib),
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-net", "none", "-no-reboot",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={node.ovmf_vars}",
        *_node_drive(node, write_log),
        "-device", "nvme,drive=node,serial=e2e-node",
    ]  # fmt: skip
    if updates_disk is not None:
        argv += [
            "-drive", f"if=none,id=updates,format=raw,readonly=on,file={updates_disk}",
            "-device", "virtio-blk-pci,drive=updates",
        ]  # fmt: skip
    return argv


def _pump(
    stream: IO[bytes],
    log: IO[bytes],
    chunks: list[bytes],
    panic: threading.Event,
    kill: Callable[[str], bool] | None,
    killed: list[str],
    proc: subprocess.Popen[bytes],
    timeline: list[tuple[float, str]],
    start: float,
) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        chunks.append(line)
        timeline.append((time.monotonic() - start, line.decode(errors="replace").rstrip("\r\n")))
        if PANIC.encode() in line:
            panic.set()
        if kill is not None and not killed:
            text = line.decode(errors="replace").rstrip("\r\n")
            if kill(text):
                killed.append(text)
                proc.kill()  # the power cut: no flush, no shutdown, mid-write


def boot(
    node: Node,
    *,
    updates_disk: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mib: int = 512,
    kill_when: Callable[[str], bool] | None = None,
    write_log: Path | None = None,
) -> BootResult:
    """Power the node on once; return when QEMU exits (or is killed at `timeout`, or
    when a console line satisfies `kill_when`: a power cut at that moment).

    `write_log`: record every write, flush and discard the guest issues to the node
    disk in this file (created empty; QEMU's blklogwrites driver, dm-log-writes format).
    """
    number = len(list(node.workdir.glob("serial-*.log"))) + 1
    log_path = node.workdir / f"serial-{number}.log"
    if write_log is not None:
        write_log.unlink(missing_ok=True)
        write_log.touch()
    argv = _qemu_argv(node, updates_disk, memory_mib, write_log)
    chunks: list[bytes] = []
    panic = threading.Event()
    killed: list[str] = []
    timeline: list[tuple[float, str]] = []
    start = time.monotonic()
    with log_path.open("wb") as log, (node.workdir / f"qemu-{number}.stderr").open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        pump = threading.Thread(
            target=_pump,
            args=(proc.stdout, log, chunks, panic, kill_when, killed, proc, timeline, start),
        )
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        pump.join()
    seconds = time.monotonic() - start
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    markers = tuple(MARKER.findall(text))
    reason = _exit_reason(markers, panic.is_set(), timed_out, proc.returncode)
    if killed:
        reason = "killed"
    return BootResult(
        serial_log=text,
        markers=markers,
        seconds=seconds,
        exit_reason=reason,
        qemu_returncode=None if timed_out else proc.returncode,
        log_path=log_path,
        commands=_commands(markers),
        killed_at=killed[0] if killed else None,
        timeline=tuple(timeline),
    )


def _exit_reason(
    markers: tuple[str, ...], panicked: bool, timed_out: bool, returncode: int
) -> ExitReason:
    if panicked:
        return "panic"
    if timed_out:
        return "timeout"
    if returncode != 0:
        return "error"
    last = markers[-1].split(" ", 1)[0] if markers else ""
    if last in ("reboot", "poweroff"):
        return "reboot" if last == "reboot" else "poweroff"
    return "reset"  # the machine reset itself without our init asking (e.g. GRUB)


def _commands(markers: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    done = []
    for line in markers:
        m = re.fullmatch(r"exit=(\d+) (.*)", line)
        if m:
            done.append((m.group(2), int(m.group(1))))
    return tuple(done)


def boot_until(
    node: Node,
    *,
    updates_disk: Path | None = None,
    max_boots: int = 4,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[BootResult]:
    """Boot again after each reboot, reset or panic, until poweroff, timeout or `max_boots`."""
    results: list[BootResult] = []
    while len(results) < max_boots:
        result = boot(node, updates_disk=updates_disk, timeout=timeout)
        results.append(result)
        if result.exit_reason not in ("reboot", "panic", "reset"):
            break
    return results
