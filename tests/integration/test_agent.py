"""The agent end to end on the host: a repository made by the signing tools, served by a
real HTTP server on 127.0.0.1, a sparse disk laid out by `updater layout apply`, the
bootloader state read back with the real `grub-editenv` and `cgpt`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.agentnode import BIN, LAYOUTS, MiB, Node, node, sha
from tests.conftest import run_tool
from tests.signing_helpers import ImageSpec, add_release, publish
from updater.disk.gpt import read_gpt

__all__ = ["node"]


def test_install_commit_and_status(node: Node) -> None:
    status = node.ok("status")
    assert status["booted_slot"] == "A" and status["primary_slot"] == "A"
    assert status["slots"]["A"]["version"] == "1.0.0"

    check = node.ok("check")
    assert check["update_available"] and check["version"] == "2.0.0"

    result = node.ok("install")
    assert result["version"] == "2.0.0" and result["slot"] == "B" and result["rebooting"]
    env = node.env()
    assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "0")
    assert node.slot_sha("B", 3 * MiB + 2 * 4096) == sha(node.images["2.0.0"])
    assert node.reboots.read_text().split() == ["pre_reboot", "reboot"]
    status = node.ok("status")
    assert status["pending"]["slot"] == "B" and status["pending"]["version"] == "2.0.0"

    # GRUB boots B with one try; the health check passes and commits it.
    node.grub_boots("B")
    assert node.ok("status", booted="B")["slots"]["B"]["state"] == "trying"
    outcome = node.ok("health-check", booted="B")
    assert outcome["action"] == "committed"
    env = node.env()
    assert (env["ORDER"], env["B_OK"], env["B_TRY"]) == ("B A", "1", "0")
    status = node.ok("status", booted="B")
    assert status["pending"] is None
    assert status["slots"]["B"] == {
        "state": "good",
        "version": "2.0.0",
        "booted": True,
        "partitions": {"root": "root_b"},
    }
    # Nothing newer: a second install does nothing and writes nothing.
    assert node.ok("install", booted="B")["installed"] is False


def test_failed_health_check_rolls_back_and_is_not_retried(node: Node) -> None:
    node.ok("install")
    node.grub_boots("B")
    (node.root / "unhealthy").touch()
    done = node.run("health-check", booted="B")
    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout)["action"] == "rolled-back"
    env = node.env()
    assert (env["ORDER"], env["A_OK"], env["A_TRY"], env["B_OK"]) == ("A B", "1", "0", "0")
    # Back on A: the failed version is remembered and a plain install skips it.
    status = node.ok("status", booted="A")
    assert status["failed_versions"] == ["2.0.0"] and status["slots"]["B"]["state"] == "bad"
    assert node.ok("install", booted="A")["installed"] is False
    # ... but an explicit --version is a deliberate retry.
    assert node.ok("install", "--version", "2.0.0", "--no-reboot")["slot"] == "B"


def test_a_failed_slot_is_one_error_line_and_the_outcome_in_json(node: Node) -> None:
    node.ok("install")
    node.grub_boots("B")
    (node.root / "unhealthy").touch()
    done = node.run("health-check", booted="B")
    assert done.returncode == 5, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["action"], doc["slot"], doc["version"]) == ("rolled-back", "B", "2.0.0")
    assert doc["rebooting"] is True and doc["kind"] == "SlotFailed" and doc["exit_code"] == 5
    assert doc["error"].startswith("rolled-back: slot B. health checks failed in slot B")
    errors = [line for line in done.stderr.splitlines() if line.startswith("updater: error: ")]
    assert errors == [f"updater: error: {doc['error']}"], done.stderr
    # All of it was done before the error: B invalid, A primary, and the reboot.
    env = node.env()
    assert (env["ORDER"], env["A_OK"], env["B_OK"]) == ("A B", "1", "0")
    assert node.reboots.read_text().split() == ["pre_reboot", "reboot"] * 2


def test_no_fallback_commits_the_booted_slot_and_says_so(node: Node) -> None:
    # A booted but never committed (GRUB's try), B empty: a failed check cannot go back.
    node.grub_boots("A")
    (node.root / "unhealthy").touch()
    done = node.run("health-check", booted="A")
    assert done.returncode == 5, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["action"], doc["slot"], doc["version"]) == ("no-fallback", "A", "1.0.0")
    assert doc["rebooting"] is False and "slot B is not good; staying on A" in doc["detail"]
    env = node.env()
    assert (env["ORDER"], env["A_OK"], env["A_TRY"], env["B_OK"]) == ("A B", "1", "0", "0")
    status = node.ok("status")
    assert status["slots"]["A"]["state"] == "good" and status["failed_versions"] == []
    assert status["last_error"].startswith("health checks failed: ")
    assert not node.reboots.exists()


def test_bootloader_fell_back_without_the_agent(node: Node) -> None:
    node.ok("install")
    # GRUB tried B (B_TRY=1), B never reached user space, GRUB fell back to A.
    node.grub_boots("B")
    node.grub_boots("A")
    done = node.run("health-check", booted="A")
    assert done.returncode == 5
    assert json.loads(done.stdout)["action"] == "fell-back"
    env = node.env()
    assert env["B_OK"] == "0" and env["A_TRY"] == "0" and env["A_OK"] == "1"
    assert node.ok("status")["failed_versions"] == ["2.0.0"]


def test_health_check_before_reboot_changes_nothing(node: Node) -> None:
    node.ok("install", "--no-reboot")
    before = node.grubenv.read_bytes()
    assert node.ok("health-check")["action"] == "waiting-for-reboot"
    assert node.grubenv.read_bytes() == before


def test_tampered_image_is_refused_and_primary_unchanged(node: Node) -> None:
    target = next(p for p in node.repo.rglob("*.root.img.zst"))
    node.server.tamper("/" + str(target.relative_to(node.repo)), offset=100)
    done = node.run("install")
    assert done.returncode == 3, done.stderr
    assert "sha" in done.stderr or "hash" in done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    env = node.env()
    assert env["ORDER"] == "A B" and env["B_OK"] == "0"  # inactive invalidated, A primary
    assert not node.reboots.exists()


def test_connection_cut_mid_image_resumes(node: Node) -> None:
    target = next(p for p in node.repo.rglob("*.root.img.zst"))
    url_path = "/" + str(target.relative_to(node.repo))
    node.server.cut(url_path, after=target.stat().st_size // 2)
    node.ok("install", "--no-reboot")
    logged = node.server.requests_for(url_path)
    assert any(r.range for r in logged), (url_path, node.server.requests)
    assert node.slot_sha("B", 3 * MiB + 2 * 4096) == sha(node.images["2.0.0"])


def test_other_hardware_and_downgrade_are_refused(node: Node) -> None:
    add_release(node.repo, [ImageSpec(node.images["1.0.0"], "3.0.0", hardware=("arm64-efi",))])
    publish(node.repo)
    assert node.ok("check")["version"] == "2.0.0"  # 3.0.0 is for other hardware
    done = node.run("install", "--version", "3.0.0")
    assert done.returncode == 3 and "not available for hardware x86_64-efi" in done.stderr
    node.ok("install")
    node.grub_boots("B")
    node.ok("health-check", booted="B")
    add_release(node.repo, [ImageSpec(node.images["1.0.0"], "1.5.0")])
    publish(node.repo)
    done = node.run("install", "--version", "1.5.0", booted="B")
    assert done.returncode == 3 and "downgrade" in done.stderr
    assert node.env()["ORDER"] == "B A"


def test_gptprio_backend(tmp_path: Path, node: Node) -> None:
    node.bootloader = "gptprio"
    subprocess.run(
        [BIN / "updater", "layout", "apply", LAYOUTS / "gptprio-ab.toml", node.disk, "--force"],
        check=True,
        capture_output=True,
    )
    node.ok("install")

    def cgpt(slot_index: int, flag: str) -> int:
        return int(run_tool("cgpt", "show", "-i", str(slot_index), flag, node.disk).stdout)

    gpt = read_gpt(node.disk)
    a, b = gpt.find("root_a").number, gpt.find("root_b").number
    assert (cgpt(b, "-P"), cgpt(b, "-T"), cgpt(b, "-S")) == (2, 1, 0)
    assert (cgpt(a, "-P"), cgpt(a, "-S")) == (1, 1)
    # The firmware boots B and spends its try; the health check commits it.
    run_tool("cgpt", "add", "-i", str(b), "-T", "0", node.disk)
    assert node.ok("health-check", booted="B")["action"] == "committed"
    assert cgpt(b, "-S") == 1


def test_bad_config_is_one_line(node: Node) -> None:
    node.write_config("A")
    node.config.write_text(node.config.read_text().replace('root = "root_b"', 'root = "root_x"'))
    done = subprocess.run(
        [BIN / "updater", "--config", node.config, "status"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "root_x" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_endless_image_response_is_refused(node: Node) -> None:
    target = next(p for p in node.repo.rglob("*.root.img.zst"))
    node.server.endless("/" + str(target.relative_to(node.repo)))
    done = node.run("install")
    assert done.returncode == 3, done.stderr
    assert "length" in done.stderr or "exceed" in done.stderr
    env = node.env()
    assert env["ORDER"] == "A B" and env["B_OK"] == "0" and env["A_OK"] == "1"
    assert node.holds("A", "1.0.0")


def test_replayed_old_timestamp_is_refused(node: Node) -> None:
    old = (node.repo / "metadata" / "timestamp.json").read_bytes()
    publish(node.repo)  # timestamp v2
    assert node.ok("check")["version"] == "2.0.0"  # the node now trusts timestamp v2
    (node.repo / "metadata" / "timestamp.json").write_bytes(old)
    before = node.grubenv.read_bytes()
    done = node.run("install")
    assert done.returncode == 3, done.stderr
    assert "timestamp" in done.stderr
    assert node.grubenv.read_bytes() == before  # refused before touching the bootloader


def test_json_progress_and_daemon_once(node: Node) -> None:
    done = node.run("install", "--no-reboot")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == 3 * MiB + 2 * 4096
    assert events[-1]["event"] == "result" and events[-1]["version"] == "2.0.0"

    # The daemon finds nothing newer than what is pending, and exits after one round.
    node.grub_boots("B")
    node.ok("health-check", booted="B")
    add_release(node.repo, [ImageSpec(node.images["1.0.0"], "2.1.0")])
    publish(node.repo)
    daemon = node.run("daemon", "--once", booted="B")
    assert daemon.returncode == 0, daemon.stderr
    assert "installed 2.1.0 into slot A" in daemon.stderr
    env = node.env()
    assert (env["ORDER"], env["A_OK"], env["A_TRY"]) == ("A B", "1", "0")
    assert node.holds("A", "1.0.0")  # 2.1.0 carries the 1.0.0 image bytes


def test_explicit_retry_of_a_failed_version_reuses_the_slot_and_clears_the_failure(
    node: Node,
) -> None:
    node.ok("install")
    node.grub_boots("B")
    (node.root / "unhealthy").touch()
    assert node.run("health-check", booted="B").returncode == 5
    (node.root / "unhealthy").unlink()
    requests_before = len(node.server.requests)
    retry = node.ok("install", "--version", "2.0.0", booted="A")
    assert retry["reused"] and retry["slot"] == "B"  # read back and verified, not fetched
    assert not any(r.path.endswith(".img.zst") for r in node.server.requests[requests_before:])
    node.grub_boots("B")
    assert node.ok("health-check", booted="B")["action"] == "committed"
    assert node.ok("status", booted="B")["failed_versions"] == []


def test_json_after_the_command_means_the_same(node: Node) -> None:
    node.write_config("A")
    done = subprocess.run(
        [BIN / "updater", "--config", node.config, "status", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == node.ok("status")
