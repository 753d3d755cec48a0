"""The agent's fleet gates through its console script: the signed wave, pause and
withdraw, and the maintenance window (the reboot lock: test_fleet_lock_agent.py).

Real pieces: a repository signed with `sign-release` (add --waves, rollout
--pause/--resume/--withdraw/--waves, publish) served by a real HTTP server, a sparse GPT
disk, a grubenv read back with grub-editenv, the agent as a subprocess.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.agentnode import BIN, MiB, Node, node
from tests.signing_helpers import SNAPSHOT_KEY, TARGETS_KEY, TIMESTAMP_KEY, write_image
from updater.rollout import position

__all__ = ["node"]  # the fixture

MACHINE_ID = "0123456789abcdef0123456789abcdef"
SIGN_ENV = {**os.environ, "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1"}


def sign(*args: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "sign-release"), *map(str, args)],
        capture_output=True,
        text=True,
        env=SIGN_ENV,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def add_release(node: Node, version: str, *, waves: str | None, seed: int) -> Path:
    image = write_image(node.root / f"v{version}.img", 3 * MiB, seed=seed)
    node.images[version] = image
    extra = [] if waves is None else ["--waves", waves]
    sign(
        "add",
        node.repo,
        image,
        "--version",
        version,
        "--hardware",
        "x86_64-efi",
        *extra,
        "--sign-with",
        TARGETS_KEY,
    )
    publish(node)
    return image


def rollout(node: Node, version: str, *change: str) -> None:
    sign("rollout", node.repo, "x86_64-efi", version, *change, "--sign-with", TARGETS_KEY)
    publish(node)


def publish(node: Node) -> None:
    sign("publish", node.repo, "--snapshot-key", SNAPSHOT_KEY, "--timestamp-key", TIMESTAMP_KEY)


def fleet_node(node: Node, *, windows: str = "") -> Node:
    (node.root / "machine-id").write_text(MACHINE_ID + "\n")
    node.device_extra = f'machine_id = "{node.root / "machine-id"}"'
    node.extra = f"[daemon]\nwindows = [{windows}]\n" if windows else ""
    return node


def target_requests(node: Node) -> list[str]:
    return [r.path for r in node.server.requests if r.path.startswith("/targets/")]


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_node_waits_for_its_wave_and_fetches_nothing_before_it(node: Node) -> None:
    fleet_node(node)
    node.ok("install", "--no-reboot")  # 2.0.0 has no plan: installs at once, as before
    node.grub_boots("B")
    node.ok("health-check", booted="B")
    later = datetime.now(UTC) + timedelta(days=3)
    add_release(node, "3.0.0", waves=f"1@{iso(later)}", seed=3)
    before = len(target_requests(node))

    check = node.ok("check", booted="B")
    assert check["update_available"] is True
    assert check["waiting"]["reason"] == "wave"
    assert check["waiting"]["until"] == iso(later)
    result = node.ok("install", booted="B")
    assert result["installed"] is False
    assert result["waiting"]["reason"] == "wave"
    assert "3.0.0" in result["waiting"]["detail"]
    assert len(target_requests(node)) == before  # not a byte of the image
    assert not node.holds("A", "3.0.0")
    status = node.ok("status", booted="B")
    assert status["waiting"].startswith("wave: 3.0.0")

    # The release manager speeds the rollout up: the node goes on.
    rollout(node, "3.0.0", "--waves", "1@now")
    result = node.ok("install", "--no-reboot", booted="B")
    assert result["installed"] is True and result["slot"] == "A"
    assert node.holds("A", "3.0.0")
    assert node.ok("status", booted="B")["waiting"] is None


def test_the_node_position_decides_between_two_waves(node: Node) -> None:
    fleet_node(node)
    where = position(MACHINE_ID, "x86_64-efi", "3.0.0")
    node.ok("install", "--no-reboot")
    node.grub_boots("B")
    node.ok("health-check", booted="B")
    later = iso(datetime.now(UTC) + timedelta(days=2))
    # A first wave just above this node's position has started; the rest waits.
    first = min(where + 0.01, 0.99)
    add_release(node, "3.0.0", waves=f"{first:.4f}@now,1@{later}", seed=3)
    assert node.ok("check", booted="B")["waiting"] is None
    # A first wave just below it: this node is in the second wave, which waits.
    rollout(node, "3.0.0", "--waves", f"{max(where - 0.01, 0.0001):.4f}@now,1@{later}")
    assert node.ok("check", booted="B")["waiting"]["reason"] == "wave"


def test_pause_resume_and_withdraw(node: Node) -> None:
    fleet_node(node)
    node.ok("install", "--no-reboot")
    node.grub_boots("B")
    node.ok("health-check", booted="B")
    add_release(node, "3.0.0", waves="1@now", seed=3)
    rollout(node, "3.0.0", "--pause")
    result = node.ok("install", booted="B")
    assert result["waiting"]["reason"] == "paused" and result["installed"] is False
    rollout(node, "3.0.0", "--resume")
    assert node.ok("check", booted="B")["waiting"] is None

    # Withdrawn: not offered at all; a node running it is told by status.
    rollout(node, "3.0.0", "--withdraw")
    check = node.ok("check", booted="B")
    assert check["update_available"] is False and check["waiting"] is None
    assert node.ok("status", booted="B")["withdrawn"] is None  # it runs 2.0.0
    rollout(node, "2.0.0", "--withdraw")
    node.ok("check", booted="B")  # refresh: the cache now holds the new plan
    assert node.ok("status", booted="B")["withdrawn"] == "2.0.0"
    # ...and it installs the next release as usual.
    add_release(node, "4.0.0", waves=None, seed=4)
    result = node.ok("install", "--no-reboot", booted="B")
    assert result["version"] == "4.0.0"


def test_the_switch_waits_for_a_maintenance_window(node: Node) -> None:
    now = datetime.now(UTC)
    closed = f'"* {(now.hour + 12) % 24:02d}:00-{(now.hour + 13) % 24:02d}:00"'
    fleet_node(node, windows=closed)
    primary = node.env()["ORDER"]
    result = node.ok("install")
    # Downloaded and written at any time; not switched outside the window.
    assert result["installed"] is True and result["activated"] is False
    assert result["waiting"]["reason"] == "window"
    assert node.holds("B", "2.0.0")
    assert node.env()["ORDER"] == primary
    assert not node.reboots.exists()
    fetched = len(target_requests(node))

    # Still closed: nothing fetched again.
    again = node.ok("install")
    assert again["waiting"]["reason"] == "window" and again["installed"] is False
    assert len(target_requests(node)) == fetched

    # The window opens: switched and rebooted, without downloading the image again.
    fleet_node(node, windows='"* 00:00-24:00"')
    result = node.ok("install")
    assert result["activated"] is True and result["rebooting"] is True
    assert result["reused"] is True
    assert len(target_requests(node)) == fetched
    assert node.env()["ORDER"].startswith("B")
    assert node.reboots.read_text().splitlines() == ["pre_reboot", "reboot"]


def test_explicit_version_passes_the_wave_but_not_the_window(node: Node) -> None:
    now = datetime.now(UTC)
    closed = f'"* {(now.hour + 12) % 24:02d}:00-{(now.hour + 13) % 24:02d}:00"'
    fleet_node(node, windows=closed)
    later = iso(now + timedelta(days=3))
    rollout(node, "2.0.0", "--waves", f"1@{later}")
    assert node.ok("install")["waiting"]["reason"] == "wave"
    result = node.ok("install", "--version", "2.0.0")
    assert result["installed"] is True
    assert result["waiting"]["reason"] == "window"
    assert result["activated"] is False


def test_a_bad_machine_id_is_one_line(node: Node) -> None:
    fleet_node(node)
    (node.root / "machine-id").write_text("not-a-machine-id\n")
    add_release(node, "3.0.0", waves="1@now", seed=3)
    done = node.run("install")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "machine-id" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_follow_the_install_and_the_commit(node: Node) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    prom = node.root / "textfile" / "updater.prom"
    prom.parent.mkdir()
    fleet_node(node)
    node.extra += f'[metrics]\npath = "{prom}"\n'

    def samples() -> dict[str, float]:
        text = prom.read_text()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    node.ok("install", "--no-reboot")
    fetched = node.ok("status")["last_install"]["bytes_fetched"]
    seen = samples()
    assert seen["ab_updater_last_install_fetched_bytes"] == fetched > 0
    assert "ab_updater_last_commit_timestamp_seconds" not in seen
    node.grub_boots("B")
    node.ok("health-check", booted="B")
    seen = samples()
    assert seen["ab_updater_last_commit_timestamp_seconds"] > 0
    assert "ab_updater_reboot_lock_held" not in seen  # no coordination configured
    assert not list(prom.parent.glob(".*"))  # no temp file left behind
