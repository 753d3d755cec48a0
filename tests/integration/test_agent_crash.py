"""Power cut at every step: the agent process dies abruptly (`os._exit`, no cleanup, via
the `UPDATER_FAILPOINT` fault injection) at each step of install, activation, commit and
rollback; the node must still boot a slot holding a complete, verified image, and
re-running the same command must converge to the state an uninterrupted run reaches.
"""

from __future__ import annotations

import json

import pytest

from tests.agentnode import Node, node
from tests.signing_helpers import ImageSpec, add_release, publish
from updater.agent import FAILPOINT_ENV, FAILPOINT_EXIT

__all__ = ["node"]

INSTALL_STEPS = ["invalidated", "written:root", "recorded", "activated", "pending", "pre-reboot"]


def bootable_slot_is_complete(node: Node) -> None:
    """The slot the bootloader boots next holds the version the journal says it holds."""
    env = node.env()
    order = env["ORDER"].split()
    primary = next(s for s in order if env[f"{s}_OK"] == "1" and env[f"{s}_TRY"] == "0")
    expected = "1.0.0" if primary == "A" else "2.0.0"
    assert node.holds(primary, expected), f"slot {primary} does not hold {expected}"


@pytest.mark.parametrize("step", INSTALL_STEPS)
def test_install_killed_at_each_step_converges(node: Node, step: str) -> None:
    done = node.run("install", env={FAILPOINT_ENV: step})
    assert done.returncode == FAILPOINT_EXIT, done.stderr
    bootable_slot_is_complete(node)
    if step in ("invalidated", "written:root"):
        # Nothing verified is on record for B: it cannot be activated by hand either.
        refused = node.run("activate", "B")
        assert refused.returncode == 3 and "holds no verified image" in refused.stderr

    again = node.ok("install")
    # Killed before the journal recorded the slot's version: written again; after it:
    # B is read back and verified, not downloaded again, then activated.
    assert again["version"] == "2.0.0" and again["slot"] == "B"
    assert again["reused"] == (step not in ("invalidated", "written:root"))
    env = node.env()
    assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "0")
    assert node.holds("B", "2.0.0") and node.holds("A", "1.0.0")
    assert node.ok("status")["pending"]["slot"] == "B"


@pytest.mark.parametrize("step", ["checked", "committed"])
def test_commit_killed_at_each_step_converges(node: Node, step: str) -> None:
    node.ok("install")
    node.grub_boots("B")
    done = node.run("health-check", booted="B", env={FAILPOINT_ENV: step})
    assert done.returncode == FAILPOINT_EXIT
    assert node.ok("health-check", booted="B")["action"] == "committed"
    env = node.env()
    assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "0")
    assert node.ok("status", booted="B")["pending"] is None


@pytest.mark.parametrize("step", ["checked", "rollback-marked", "pre-reboot"])
def test_rollback_killed_at_each_step_converges(node: Node, step: str) -> None:
    node.ok("install")
    node.grub_boots("B")
    (node.root / "unhealthy").touch()
    done = node.run("health-check", booted="B", env={FAILPOINT_ENV: step})
    assert done.returncode == FAILPOINT_EXIT
    if step == "rollback-marked":
        # B is already invalid: the next boot is A, whose health check sees the fallback.
        bootable_slot_is_complete(node)
        node.grub_boots("A")
        outcome = node.run("health-check", booted="A")
        assert json.loads(outcome.stdout)["action"] == "fell-back"
    elif step == "checked":
        outcome = node.run("health-check", booted="B")
        assert json.loads(outcome.stdout)["action"] == "rolled-back"
    env = node.env()
    assert env["ORDER"].split()[0] == "A" or env["B_OK"] == "0"
    assert (env["A_OK"], env["B_OK"]) == ("1", "0")
    bootable_slot_is_complete(node)
    assert node.ok("status", booted="A")["failed_versions"] == ["2.0.0"]


def test_overwriting_a_slot_forgets_what_it_held_before_the_first_byte(node: Node) -> None:
    assert node.ok("install", "--no-activate")["slot"] == "B"  # B verified to hold 2.0.0
    add_release(node.repo, [ImageSpec(node.images["1.0.0"], "2.1.0")])
    publish(node.repo)
    done = node.run("install", env={FAILPOINT_ENV: "written:root"})
    assert done.returncode == FAILPOINT_EXIT, done.stderr
    # B now holds 2.1.0 written but never recorded: neither 2.0.0 nor 2.1.0 may be activated.
    refused = node.run("activate", "B")
    assert refused.returncode == 3 and "holds no verified image" in refused.stderr
    assert node.env()["B_OK"] == "0"
    assert node.ok("install")["version"] == "2.1.0"
    assert node.holds("B", "1.0.0")  # 2.1.0 carries the 1.0.0 image bytes
