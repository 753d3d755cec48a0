"""A simulated node for agent tests: a sparse disk laid out by `updater layout apply`,
a grubenv, a repository made by the signing tools served by a real HTTP server on
127.0.0.1, and the agent run through its console script with a generated config.

Only what GRUB does at boot is simulated (`grub_boots`: `<slot>_TRY=1`, which
tests/integration/test_grub_qemu.py proves the shipped script does).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_tool
from tests.httpserver import HTTPTestServer
from tests.signing_helpers import ROOT_JSON, ImageSpec, make_repo
from tests.signing_helpers import write_image as make_image_file
from updater.boot.grub import initial_grubenv
from updater.disk.gpt import read_gpt
from updater.disk.grubenv import write_grubenv

BIN = Path(sys.executable).parent
LAYOUTS = Path(__file__).resolve().parents[1] / "partition-layouts"
MiB = 1 << 20


@dataclass
class Node:
    root: Path
    disk: Path
    grubenv: Path
    server: HTTPTestServer
    repo: Path
    bootloader: str = "grub"
    images: dict[str, Path] = field(default_factory=dict)
    # More config: keys of [device] (`device_extra`), tables after [hooks] (`extra`).
    device_extra: str = ""
    extra: str = ""

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def reboots(self) -> Path:
        return self.root / "reboots.log"

    def write_config(self, booted: str) -> None:
        grubenv = f'grubenv = "{self.grubenv}"\n' if self.bootloader == "grub" else ""
        self.config.write_text(
            f"""
[repository]
metadata_url = "{self.server.url}/metadata"
targets_url = "{self.server.url}/targets"
trusted_root = "{ROOT_JSON}"
retries = 3
allow_example_keys = true  # a test: the repository is signed with keys-example/
[device]
hardware = "x86_64-efi"
disk = "{self.disk}"
bootloader = "{self.bootloader}"
{grubenv}booted_slot = "{booted}"
state_dir = "{self.root / "state"}"
os_release = "{self.root / "os-release"}"
{self.device_extra}
[slots.A]
root = "root_a"
[slots.B]
root = "root_b"
[health]
deadline = 0.5
interval = 0.1
checks = [{{ command = ["sh", "-c", "test ! -e {self.root / "unhealthy"}"] }}]
[hooks]
pre_reboot = ["sh", "-c", "echo pre_reboot >> {self.reboots}"]
reboot = ["sh", "-c", "echo reboot >> {self.reboots}"]
{self.extra}
"""
        )

    def run(
        self, *args: str, booted: str = "A", env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        self.write_config(booted)
        return subprocess.run(
            [str(BIN / "updater"), "--config", str(self.config), "--json", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=120,
        )

    def ok(self, *args: str, booted: str = "A") -> dict[str, Any]:
        done = self.run(*args, booted=booted)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def env(self) -> dict[str, str]:
        out = run_tool("grub-editenv", self.grubenv, "list").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def slot_sha(self, slot: str, length: int) -> str:
        gpt = read_gpt(self.disk)
        part = gpt.find(f"root_{slot.lower()}")
        with self.disk.open("rb") as f:
            f.seek(part.first_lba * gpt.sector_size)
            return hashlib.sha256(f.read(length)).hexdigest()

    def write_slot(self, slot: str, image: Path) -> None:
        """Factory-flash `image` into `slot` (what the node image builder does)."""
        gpt = read_gpt(self.disk)
        part = gpt.find(f"root_{slot.lower()}")
        with self.disk.open("r+b") as f:
            f.seek(part.first_lba * gpt.sector_size)
            f.write(image.read_bytes())

    def holds(self, slot: str, version: str) -> bool:
        image = self.images[version]
        return self.slot_sha(slot, image.stat().st_size) == sha(image)

    def grub_boots(self, slot: str) -> None:
        """What the shipped GRUB script does when it boots `slot` (see test_grub_qemu)."""
        run_tool("grub-editenv", self.grubenv, "set", f"{slot}_TRY=1")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    disk = tmp_path / "disk.img"
    subprocess.run(
        [BIN / "updater", "layout", "apply", LAYOUTS / "grub-efi-ab.toml", disk, "--size", "1G"],
        check=True,
        capture_output=True,
    )
    grubenv = tmp_path / "grubenv"
    write_grubenv(grubenv, initial_grubenv("A"))
    images = {"1.0.0": make_image_file(tmp_path / "v1.0.0.img", 3 * MiB + 4096, seed=1)}
    # Incompressible, so the stored target is large enough to be cut mid-stream.
    images["2.0.0"] = tmp_path / "v2.0.0.img"
    images["2.0.0"].write_bytes(random.Random(2).randbytes(3 * MiB + 2 * 4096))
    repo = make_repo(tmp_path / "www", [ImageSpec(images["2.0.0"], "2.0.0")])
    (tmp_path / "os-release").write_text('NAME="node"\nIMAGE_VERSION="1.0.0"\n')
    with HTTPTestServer(repo) as server:
        made = Node(tmp_path, disk, grubenv, server, repo, images=images)
        made.write_slot("A", images["1.0.0"])
        yield made


def spawn(node: Node, *args: str, log: Path, booted: str = "A") -> subprocess.Popen[str]:
    """Start the agent in the background (for tests of two agents at once): stdout to
    `log`.out, stderr to `log`.err, so a test can poll what it printed so far."""
    node.write_config(booted)
    with log.with_suffix(".out").open("w") as out, log.with_suffix(".err").open("w") as err:
        return subprocess.Popen(
            [str(BIN / "updater"), "--config", str(node.config), "--json", *args],
            stdout=out,
            stderr=err,
            text=True,
        )


def journal_bytes(node: Node) -> bytes:
    """The agent's journal file as it is on disk now."""
    return (node.root / "state" / "journal.json").read_bytes()
