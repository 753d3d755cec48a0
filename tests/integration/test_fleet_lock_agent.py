"""The reboot lock through the agent's console script, against a real 3-member etcd
cluster: taken before the switch, held across the reboot, given back after the commit;
a full group waits, a cluster that is down means no reboot, a node killed mid-reboot
keeps its slot until its health check, a rolled-back node gives it back only once its
old slot passes its checks, and an operator can release a node that never came back.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentnode import BIN, LAYOUTS, Node, node
from tests.etcdcluster import EtcdCluster
from updater.boot.grub import initial_grubenv
from updater.disk.grubenv import write_grubenv

__all__ = ["node"]  # the fixture


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path, members=3) as running:
        yield running


def coordinate(node: Node, cluster: EtcdCluster, name: str, *, limit: int = 1) -> Node:
    endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
    node.extra = (
        f'[coordination]\nbackend = "etcd"\nendpoints = [{endpoints}]\n'
        f'group = "workers"\nmax_concurrent = {limit}\nnode_id = "{name}"\ntimeout = 3\n'
    )
    return node


def sibling(first: Node, root: Path) -> Node:
    """A second node of the same fleet: its own disk, grubenv and state; same repository."""
    root.mkdir()
    disk = root / "disk.img"
    subprocess.run(
        [BIN / "updater", "layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk, "--size", "1G"],
        check=True,
        capture_output=True,
    )
    grubenv = root / "grubenv"
    write_grubenv(grubenv, initial_grubenv("A"))
    (root / "os-release").write_text('NAME="node"\nIMAGE_VERSION="1.0.0"\n')
    made = Node(root, disk, grubenv, first.server, first.repo, images=dict(first.images))
    made.write_slot("A", first.images["1.0.0"])
    return made


def holders(node: Node) -> list[str]:
    return list(node.ok("reboot-lock", "status")["holders"])


def test_one_slot_two_nodes_the_second_waits_for_the_first_commit(
    node: Node, cluster: EtcdCluster, tmp_path: Path
) -> None:
    first = coordinate(node, cluster, "n1")
    second = coordinate(sibling(node, tmp_path / "n2"), cluster, "n2")

    result = first.ok("install")
    assert result["activated"] is True and result["rebooting"] is True
    assert holders(first) == ["n1"]
    assert first.ok("status")["lock_held"] == "workers"

    # The group is full: the second node writes its slot but does not switch.
    waiting = second.ok("install")
    assert waiting["installed"] is True and waiting["activated"] is False
    assert waiting["waiting"]["reason"] == "lock"
    assert "1 of 1" in waiting["waiting"]["detail"]
    assert second.env()["ORDER"].startswith("A")
    assert not second.reboots.exists()
    assert second.ok("check")["waiting"]["reason"] == "lock"
    # Still full at the next cycle: it asks, and does not read its written slot back.
    again = second.run("install")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["waiting"]["reason"] == "lock"
    assert "already holds verified" not in again.stderr

    # The first comes back up in B and commits: the slot is given back...
    first.grub_boots("B")
    outcome = first.ok("health-check", booted="B")
    assert outcome["action"] == "committed"
    assert holders(first) == []
    status = first.ok("status", booted="B")
    assert status["lock_held"] is None
    assert status["last_commit"]["version"] == "2.0.0"
    # ...and the second node goes on.
    result = second.ok("install")
    assert result["activated"] is True and result["reused"] is True
    assert holders(second) == ["n2"]


def test_no_reboot_without_the_lock_when_etcd_is_down(node: Node, cluster: EtcdCluster) -> None:
    coordinate(node, cluster, "n1")
    cluster.stop()
    result = node.ok("install")
    assert result["activated"] is False and result["rebooting"] is False
    assert result["waiting"]["reason"] == "lock"
    assert "etcd" in result["waiting"]["detail"]
    assert node.env()["ORDER"].startswith("A")
    assert not node.reboots.exists()
    assert node.ok("status")["waiting"].startswith("lock: ")


def test_a_member_down_does_not_stop_the_rollout(node: Node, cluster: EtcdCluster) -> None:
    coordinate(node, cluster, "n1")
    cluster.kill("m0")  # the first endpoint the node is given
    result = node.ok("install")
    assert result["activated"] is True
    assert holders(node) == ["n1"]


def test_killed_mid_reboot_the_slot_stays_held_until_its_health_check(
    node: Node, cluster: EtcdCluster, tmp_path: Path
) -> None:
    coordinate(node, cluster, "n1")
    killed = node.run("install", env={"UPDATER_FAILPOINT": "pre-reboot"})
    assert killed.returncode == 137
    assert holders(node) == ["n1"]  # held across the (cut) reboot
    other = coordinate(sibling(node, tmp_path / "n2"), cluster, "n2")
    assert other.ok("install")["waiting"]["reason"] == "lock"

    node.grub_boots("B")
    assert node.ok("health-check", booted="B")["action"] == "committed"
    assert holders(node) == []


def test_killed_after_taking_the_lock_before_the_switch(node: Node, cluster: EtcdCluster) -> None:
    coordinate(node, cluster, "n1")
    killed = node.run("install", env={"UPDATER_FAILPOINT": "locked"})
    assert killed.returncode == 137
    assert holders(node) == ["n1"]
    # It never switched: the boot after the crash runs the old, committed slot, whose
    # checks pass - the slot is given back.
    assert node.ok("health-check")["action"] == "nothing"
    assert holders(node) == []


def test_a_rolled_back_node_keeps_its_slot_until_its_old_slot_is_healthy(
    node: Node, cluster: EtcdCluster
) -> None:
    coordinate(node, cluster, "n1")
    node.ok("install")
    node.grub_boots("B")
    (node.root / "unhealthy").touch()
    failed = node.run("health-check", booted="B")
    assert failed.returncode == 5  # rolled back, rebooting into A
    assert holders(node) == ["n1"]
    # Back in A, still sick: the slot stays held - the rollout of its group stops here.
    assert node.ok("health-check")["action"] == "nothing"
    assert holders(node) == ["n1"]
    # Healthy again: given back.
    (node.root / "unhealthy").unlink()
    node.ok("health-check")
    assert holders(node) == []


def test_an_operator_releases_a_node_that_never_came_back(
    node: Node, cluster: EtcdCluster, tmp_path: Path
) -> None:
    coordinate(node, cluster, "n1")
    node.ok("install")
    assert holders(node) == ["n1"]
    other = coordinate(sibling(node, tmp_path / "n2"), cluster, "n2")
    assert other.ok("install")["waiting"]["reason"] == "lock"
    done = other.ok("reboot-lock", "release", "n1")
    assert done["released"] is True
    assert other.ok("install")["activated"] is True
    assert holders(other) == ["n2"]
    assert other.ok("reboot-lock", "release", "n1")["released"] is False


def test_reboot_lock_without_coordination_is_one_line(node: Node) -> None:
    done = node.run("reboot-lock", "status")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "[coordination]" in done.stderr


def test_an_etcd_member_reboots_only_if_the_cluster_keeps_quorum(
    node: Node, cluster: EtcdCluster
) -> None:
    coordinate(node, cluster, "n1")
    node.extra += 'etcd_member = "m1"\n'
    cluster.kill("m2")  # m0 and m1 remain: without m1, m0 alone is no quorum of 3
    result = node.ok("install")
    assert result["activated"] is False
    assert result["waiting"]["reason"] == "quorum"
    assert holders(node) == []  # the lock is not taken while it waits
    cluster.restart("m2")
    cluster.wait_healthy("m0", "m1", "m2")
    result = node.ok("install")
    assert result["activated"] is True
    assert holders(node) == ["n1"]


def test_the_slot_is_given_back_in_the_group_it_was_taken_in(
    node: Node, cluster: EtcdCluster
) -> None:
    coordinate(node, cluster, "n1")
    node.ok("install")
    assert holders(node) == ["n1"]
    # The operator moves the node to another group while it reboots.
    node.extra = node.extra.replace('group = "workers"', 'group = "gpu"')
    node.grub_boots("B")
    assert node.ok("health-check", booted="B")["action"] == "committed"
    node.extra = node.extra.replace('group = "gpu"', 'group = "workers"')
    assert holders(node) == []  # workers: given back where it was held
    assert node.ok("status", booted="B")["lock_held"] is None


def test_killed_between_the_record_and_the_request_gives_back_nothing_harmful(
    node: Node, cluster: EtcdCluster, tmp_path: Path
) -> None:
    coordinate(node, cluster, "n1")
    killed = node.run("install", env={"UPDATER_FAILPOINT": "lock-intent"})
    assert killed.returncode == 137
    assert node.ok("status")["lock_held"] == "workers"  # written ahead of the request
    assert holders(node) == []
    other = coordinate(sibling(node, tmp_path / "n2"), cluster, "n2")
    assert other.ok("install")["activated"] is True  # n1 took nothing
    assert node.ok("health-check")["action"] == "nothing"
    assert node.ok("status")["lock_held"] is None
    assert holders(node) == ["n2"]  # n1's "release" did not touch n2's slot
