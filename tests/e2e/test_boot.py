"""A node boots: OVMF -> the project's GRUB script -> slot A's kernel -> init -> agent.

Everything asserted is read from the serial console of a real boot or from the
grubenv GRUB and the agent left on the ESP (copied out with mcopy, read with
grub-editenv), never from what the builder was asked to do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tools.node import Node, boot, build_release, make_node, make_updates_disk

pytestmark = pytest.mark.e2e

IMPORT_CHECK = (
    'python3 -c "import updater, tuf, construct, cryptography, zstandard; '
    "print('E2E-IMPORTS', updater.__file__, tuf.__version__)\""
)


def _slot_a_device(node: Node) -> str:
    number = list(node.partitions()).index("root_a") + 1
    return f"/dev/nvme0n1p{number}"


def test_v1_boots_from_slot_a_and_the_agent_commits_it(node: Node, tmp_path: Path) -> None:
    commands = (IMPORT_CHECK, "updater --json status")
    updates = make_updates_disk(None, tmp_path / "updates.img", commands=commands)
    result = boot(node, updates_disk=updates, timeout=240)
    print(f"boot took {result.seconds:.1f}s; console: {result.log_path}")
    log = result.serial_log

    assert "ab-updater: booting slot A (ORDER=A B)" in log  # GRUB's own decision
    assert result.booted == {
        "slot": "A", "version": "1.0.0", "root": _slot_a_device(node),
        "uptime": result.booted.get("uptime", "?"),
    }  # fmt: skip
    cmdline = result.fields("cmdline")
    assert cmdline["root"] == "PARTLABEL=root_a"
    assert cmdline["updater.slot"] == "A"
    # What GRUB wrote before starting the kernel: one try of slot A, not yet committed.
    assert result.fields("grubenv")["A_TRY"] == "1"

    assert result.exit_status(IMPORT_CHECK) == 0, log
    assert "E2E-IMPORTS /usr/lib/ab-updater/updater/__init__.py" in log
    assert result.exit_status("updater health-check") == 0, log
    assert "E2E: health-check pass version=1.0.0" in log  # the release's own check ran
    assert result.exit_reason == "poweroff"

    # The agent, after its commit, sees the image's version and slot A as good.
    assert result.exit_status("updater --json status") == 0, log
    (line,) = [x for x in log.splitlines() if x.startswith('{"booted_slot"')]
    status = json.loads(line)
    assert (status["booted_slot"], status["primary_slot"]) == ("A", "A")
    assert status["slots"]["A"]["state"] == "good"
    assert status["slots"]["A"]["version"] == "1.0.0"

    # The agent's commit, as GRUB will read it on the next boot.
    env = node.read_grubenv()
    assert (env["ORDER"], env["A_OK"], env["A_TRY"], env["B_OK"]) == ("A B", "1", "0", "0")


def test_boot_without_a_commit_leaves_grubs_try_and_the_next_boot_skips_the_slot(
    tmp_path: Path, e2e_cache: Path
) -> None:
    uncommitted = build_release(1, cache=e2e_cache, boot_commands=())
    node = make_node(tmp_path / "node", uncommitted, cache=e2e_cache)

    first = boot(node, timeout=240)
    assert first.booted["slot"] == "A", first.serial_log
    assert first.exit_reason == "poweroff"
    assert node.read_grubenv()["A_TRY"] == "1"

    # Slot A was tried and never committed, slot B is invalid: GRUB boots nothing,
    # re-arms slots with _OK=1 and resets the machine (the script's documented path).
    second = boot(node, timeout=120)
    assert "ab-updater: skipping slot A (OK=1 TRY=1)" in second.serial_log
    assert "ab-updater: NO BOOTABLE SLOT" in second.serial_log
    assert second.booted == {}
    assert second.exit_reason == "reset"
    assert node.read_grubenv()["A_TRY"] == "0"


def test_a_release_built_to_panic_panics_and_the_runner_says_so(
    tmp_path: Path, e2e_cache: Path
) -> None:
    start = time.monotonic()
    broken = build_release(1, cache=e2e_cache, panic=True)
    print(f"panic release built in {time.monotonic() - start:.1f}s")
    node = make_node(tmp_path / "node", broken, cache=e2e_cache)
    result = boot(node, timeout=240)
    assert "E2E: broken init version=1.0.0" in result.serial_log
    assert "Kernel panic - not syncing" in result.serial_log
    assert result.exit_reason == "panic"
    assert result.booted == {}
    assert node.read_grubenv()["A_TRY"] == "1"
