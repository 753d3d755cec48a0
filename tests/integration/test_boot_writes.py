"""Every agent step writes the bootloader metadata at most once: counted by the kernel.

A node (tests/agentnode.py: a sparse disk, a real repository over HTTP, the console
script) goes through every step - install, activate, rollback, mark-good, mark-bad and
each outcome of the health check - once with the `grub` backend and once with
`gptprio`. Linux inotify counts what really happened to the files:

* grub: IN_MOVED_TO of the grubenv's name in its directory is one atomic replacement
  of the grubenv (an in-place write would be an IN_CLOSE_WRITE of it: counted too);
* gptprio: IN_CLOSE_WRITE of the disk image is one write_gpt (one open for writing,
  backup then primary table); install also opens the disk once per image it writes
  (its result's `images`), which is subtracted.

Before the bootloader state became a value (a1f9770) the same steps wrote: install 2
(grub, even when nothing changed) / 1 (gptprio), activate of the booted slot 2,
rollback 2, a failed health check 3, fell-back 2, and 1 for the rest; now each step
writes once, and not at all when it changes nothing (install's invalidation of a slot
that is already invalid, a health check that finds nothing to do).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.fsutil import atomic_write
from tests.agentnode import BIN, LAYOUTS, Node, node
from tests.conftest import run_tool
from tests.inotify import IN_CLOSE_NOWRITE, IN_CLOSE_WRITE, IN_MOVED_TO, IN_OPEN, Event, Watch
from tests.signing_helpers import ImageSpec, add_release, publish
from updater.disk.gpt import read_gpt

__all__ = ["node"]


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]
    booted: str
    exit_code: int = 0
    tried: tuple[str, ...] = ()  # slots the bootloader started since the last step
    unhealthy: bool = False  # the health check fails
    new_release: bool = False  # 2.1.0 is published before this step


# One walk through every step; `tried` is what GRUB or the firmware did at boot.
STEPS = [
    Step("health-check: nothing", ("health-check",), "A"),
    Step("install (B already invalid)", ("install", "--no-reboot"), "A"),
    Step("health-check: waiting-for-reboot", ("health-check",), "A"),
    Step("activate the booted slot", ("activate", "A"), "A"),
    Step("activate", ("activate", "B"), "A"),
    Step("health-check: rolled-back", ("health-check",), "B", 5, ("B",), unhealthy=True),
    Step("install: reused", ("install", "--version", "2.0.0", "--no-reboot"), "A"),
    Step("health-check: fell-back", ("health-check",), "A", 5, ("B", "A")),
    Step("activate again", ("activate", "B"), "A"),
    Step("health-check: committed", ("health-check",), "B", 0, ("B",)),
    Step("rollback", ("rollback",), "B"),
    Step("mark-good", ("mark-good",), "B", 0, ("B",)),
    Step("install (A was good)", ("install", "--no-reboot"), "B", new_release=True),
    Step("mark-bad", ("mark-bad", "A"), "B"),
    Step("health-check: no-fallback", ("health-check",), "B", 5, ("B",), unhealthy=True),
]

ONE = {step.name: 1 for step in STEPS}
EXPECTED = {
    "grub": {
        **ONE,
        "health-check: nothing": 0,
        "health-check: waiting-for-reboot": 0,
        "install (A was good)": 2,  # invalidate before the image, boot it next after
    },
    "gptprio": {
        **ONE,
        "health-check: nothing": 0,
        "health-check: waiting-for-reboot": 0,
        "install (A was good)": 2,
    },
}


def _tried(node: Node) -> Callable[[str], None]:
    """What the bootloader does when it starts `slot` (test_grub_qemu for GRUB)."""
    if node.bootloader == "grub":
        return node.grub_boots
    numbers = {s: read_gpt(node.disk).find(f"root_{s.lower()}").number for s in "AB"}

    def spend_the_try(slot: str) -> None:
        run_tool("cgpt", "add", "-i", str(numbers[slot]), "-T", "0", "-S", "0", node.disk)

    return spend_the_try


# Every open and close too: the kernel merges two identical events in a row into one
# (tests/inotify.py).
WATCHED = IN_MOVED_TO | IN_CLOSE_WRITE | IN_OPEN | IN_CLOSE_NOWRITE


def _count(events: list[Event], grubenv: Path, disk: Path) -> tuple[int, int]:
    """(writes of the grubenv, closes of the disk after writing). A replacement is the
    IN_MOVED_TO of the name, then the IN_CLOSE_WRITE of the temp file, renamed by then,
    under that name: one write. Any other IN_CLOSE_WRITE of it is an in-place write."""
    env_writes = disk_writes = 0
    replaced = False
    for event in events:
        if event.name and event.path == grubenv:  # the directory's watch
            if event.mask & IN_MOVED_TO:
                env_writes += 1
                replaced = True
            elif event.mask & IN_CLOSE_WRITE:
                env_writes += 0 if replaced else 1
                replaced = False
            elif event.mask & IN_OPEN:
                replaced = False
        elif not event.name and event.path == disk:  # the disk file's own watch
            disk_writes += bool(event.mask & IN_CLOSE_WRITE)
    return env_writes, disk_writes


def _journal_loads(events: list[Event], journal: Path) -> int:
    """How often the journal was read to be decided on: opens of journal.json, less the
    one read of each save (`save_journal` checks the journal it keeps as the backup)."""
    opened = sum(1 for e in events if e.path == journal and e.mask & IN_OPEN)
    saved = sum(1 for e in events if e.path == journal and e.mask & IN_MOVED_TO)
    return opened - saved


def walk(node: Node) -> tuple[dict[str, int], dict[str, int]]:
    """Run STEPS on `node`: the bootloader metadata writes of each step, as the kernel
    saw them, and how often each step loaded the journal."""
    tried = _tried(node)
    counts: dict[str, int] = {}
    loads: dict[str, int] = {}
    state = node.root / "state"
    node.ok("mark-good")  # A is good already: this only writes a first journal
    with Watch() as watch:
        watch.add(node.grubenv.parent, WATCHED)
        watch.add(node.disk, WATCHED)
        watch.add(state, WATCHED)
        for step in STEPS:
            if step.new_release:
                add_release(node.repo, [ImageSpec(node.images["1.0.0"], "2.1.0")])
                publish(node.repo)
            for slot in step.tried:
                tried(slot)
            (node.root / "unhealthy").unlink(missing_ok=True)
            if step.unhealthy:
                (node.root / "unhealthy").touch()
            watch.drain()  # what the test itself did, not the step
            done = node.run(*step.args, booted=step.booted)
            assert done.returncode == step.exit_code, (step.name, done.stderr)
            images = 0
            if step.args[0] == "install":
                result = json.loads(done.stdout.strip().splitlines()[-1])
                assert result["installed"], (step.name, result)
                images = len(result["images"])  # one open of the disk per image written
            events = watch.drain()
            loads[step.name] = _journal_loads(events, state / "journal.json")
            grubenv, disk = _count(events, node.grubenv, node.disk)
            if node.bootloader == "grub":
                counts[step.name] = grubenv
            else:
                assert grubenv == 0, f"{step.name}: gptprio wrote the grubenv"
                counts[step.name] = disk - images
    return counts, loads


@pytest.mark.parametrize("bootloader", ["grub", "gptprio"])
def test_every_step_writes_the_bootloader_metadata_once(node: Node, bootloader: str) -> None:
    if bootloader == "gptprio":
        node.bootloader = "gptprio"
        run_tool(
            BIN / "updater", "layout", "apply", LAYOUTS / "gptprio-ab.toml", node.disk, "--force"
        )
    counts, loads = walk(node)
    assert counts == EXPECTED[bootloader], "\n".join(f"{n}: {c}" for n, c in counts.items())
    # Each step loaded the journal once: decided on one value, not re-read.
    assert loads == {step.name: 1 for step in STEPS}, loads


def test_the_counter_sees_a_replacement_and_a_write(tmp_path: Path) -> None:
    """The instrument itself: an atomic replacement (core.fsutil) is one write, so is
    an in-place write; reads are none; a write of the disk is one close after writing."""
    grubenv, disk = tmp_path / "grubenv", tmp_path / "disk.img"
    grubenv.write_bytes(b"old")
    disk.write_bytes(bytes(512))
    with Watch() as watch:
        watch.add(tmp_path, WATCHED)
        watch.add(disk, WATCHED)
        watch.drain()
        atomic_write(grubenv, b"new")
        assert _count(watch.drain(), grubenv, disk) == (1, 0)
        atomic_write(grubenv, b"newer")
        with grubenv.open("r+b") as f:
            f.write(b"N")
        grubenv.read_bytes()
        assert _count(watch.drain(), grubenv, disk) == (2, 0)
        for _ in range(2):  # two reads in a row: two opens, not merged into one
            grubenv.read_bytes()
        assert len([e for e in watch.drain() if e.path == grubenv and e.mask & IN_OPEN]) == 2
        for _ in range(2):  # two in a row: not merged into one event
            with disk.open("r+b") as f:
                f.write(b"x")
        disk.read_bytes()
        assert _count(watch.drain(), grubenv, disk) == (0, 2)
