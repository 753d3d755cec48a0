"""`updater status` and `updater health-check` run on every look and every boot: they
import no network, TUF or decompression code (issue 10, "Fast start").

Checked through the console script with `python -X importtime`, which lists every
module the process imported - on a real node (tests/agentnode.py), for a health check
that finds nothing to do and for one that runs its (command) checks and commits.
Timing is the benchmark's business (bench/); this test only says what is imported.
"""

from __future__ import annotations

import subprocess
import sys

from tests.agentnode import BIN, Node, node

__all__ = ["node"]

HEAVY = ("requests", "urllib3", "tuf", "securesystemslib", "cryptography", "zstandard", "pyudev")
HEAVY_OURS = ("core.repository", "core.fetcher", "core.decompress", "updater.install")


def imported(node: Node, *args: str, booted: str = "A") -> set[str]:
    node.write_config(booted)
    script = [str(BIN / "updater"), "--config", str(node.config), "--json"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *script, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    names = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "updater.agent" in names or args[0] == "status", sorted(names)
    return names


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY or n in HEAVY_OURS)


def test_status_and_health_check_import_nothing_heavy(node: Node) -> None:
    assert heavy(imported(node, "status")) == []
    assert heavy(imported(node, "health-check")) == []  # nothing to do: A is committed
    node.ok("install", "--no-reboot")
    node.grub_boots("B")
    assert heavy(imported(node, "status", booted="B")) == []
    # B is pending: the command check runs, and B is committed.
    names = imported(node, "health-check", booted="B")
    assert heavy(names) == []
    assert node.ok("status", booted="B")["slots"]["B"]["state"] == "good"
