"""The simulated fleet on disk: a signed repository, and N nodes that each have their own
state directory, small sparse disk, grubenv, machine id and os-release.

    fleet = build_fleet(work, nodes=50, groups=1, image_bytes=1 << 20)
    publish_update(fleet, "0.1@2026-12-03T02:00:00Z,0.5@...,1@...")

Everything is made by the project's own code: the disks by `updater.disk.layout`
(`layout.toml` here, the GRUB A/B layout scaled down), the grubenv by
`updater.boot.grub.initial_grubenv` + `write_grubenv` (as tests/agentnode.py does), the
repository by the signing library (`tools.examplerepo`) and the update by the
`sign-release` console script (`add --waves`, `publish`), with the INSECURE example keys.
A node is factory-flashed with release 1.0.0 in slot A (what a node image builder does)
and booted from A; the update is 2.0.0.

Invariants: a node's files are only ever written whole (`core.fsutil.atomic_write`);
machine ids are distinct and derived from the seed, so a run can be repeated; nothing
here decides what an agent would do - that is the agent's code (`tools.fleetsim.worker`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from core.fsutil import atomic_write
from tools.examplerepo import (
    ROOT_JSON,
    SNAPSHOT_KEY,
    TARGETS_KEY,
    TIMESTAMP_KEY,
    ImageSpec,
    make_repo,
)
from updater.boot.grub import initial_grubenv
from updater.disk.gpt import read_gpt
from updater.disk.grubenv import write_grubenv
from updater.disk.layout import apply_layout, load_layout

LAYOUT = Path(__file__).with_name("layout.toml")
DISK_BYTES = 12 << 20
HARDWARE = "x86_64-efi"
OLD, NEW = "1.0.0", "2.0.0"
SLOT_LABELS = {"A": "root_a", "B": "root_b"}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class NodeSpec:
    """Where one node lives and which reboot group it is in."""

    name: str
    dir: Path
    group: str

    @property
    def disk(self) -> Path:
        return self.dir / "disk.img"

    @property
    def grubenv(self) -> Path:
        return self.dir / "grubenv"

    @property
    def machine_id(self) -> Path:
        return self.dir / "machine-id"

    @property
    def os_release(self) -> Path:
        return self.dir / "os-release"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def booted_file(self) -> Path:
        """The slot the simulated firmware last booted (written by the simulated boot)."""
        return self.dir / "booted"

    @property
    def metrics(self) -> Path:
        return self.dir / "updater.prom"

    def booted(self) -> str:
        return self.booted_file.read_text().strip()

    def set_booted(self, slot: str) -> None:
        atomic_write(self.booted_file, f"{slot}\n".encode())

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "dir": str(self.dir), "group": self.group}

    @classmethod
    def from_json(cls, obj: dict[str, str]) -> NodeSpec:
        return cls(obj["name"], Path(obj["dir"]), obj["group"])


@dataclass(frozen=True)
class FleetFiles:
    """The fleet as built: the repository, the images of both releases, the nodes."""

    work: Path
    repo: Path
    images: dict[str, Path]  # version -> raw image
    digests: dict[str, str]  # raw sha256 -> version (what a slot holding it boots)
    nodes: tuple[NodeSpec, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "work": str(self.work),
            "repo": str(self.repo),
            "images": {v: str(p) for v, p in self.images.items()},
            "digests": self.digests,
            "nodes": [n.to_json() for n in self.nodes],
        }


def make_image(path: Path, size: int, seed: int) -> Path:
    """A deterministic image: half random (incompressible), half a repeated pattern,
    so the zstd target is about half the raw size."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        left, n = size, 0
        while left > 0:
            block = rng.randbytes(4096) if n % 2 else bytes([n % 251]) * 4096
            f.write(block[:left])
            left -= min(left, 4096)
            n += 1
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_node(spec: NodeSpec, image: Path, rng: random.Random) -> None:
    """One node: the disk laid out by the project's layout code, 1.0.0 flashed into
    slot A, a fresh grubenv (A good), a machine id, os-release, booted from A."""
    spec.dir.mkdir(parents=True)
    apply_layout(load_layout(LAYOUT), spec.disk, size=DISK_BYTES)
    gpt = read_gpt(spec.disk)
    part = gpt.find(SLOT_LABELS["A"])
    with spec.disk.open("r+b") as f:
        f.seek(part.first_lba * gpt.sector_size)
        f.write(image.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    write_grubenv(spec.grubenv, initial_grubenv("A"))
    atomic_write(spec.machine_id, f"{rng.getrandbits(128):032x}\n".encode())
    atomic_write(spec.os_release, f'NAME="fleetsim"\nIMAGE_VERSION="{OLD}"\n'.encode())
    spec.state_dir.mkdir(mode=0o700)
    spec.set_booted("A")


def build_fleet(
    work: Path, *, nodes: int, groups: int = 1, image_bytes: int = 1 << 20, seed: int = 0
) -> FleetFiles:
    """The repository holding 1.0.0 (no rollout plan) and `nodes` nodes running it, in
    `groups` reboot groups (node i in group g<i mod groups>)."""
    work.mkdir(parents=True, exist_ok=True)
    images = {
        OLD: make_image(work / f"v{OLD}.img", image_bytes, seed=seed * 2 + 1),
        NEW: make_image(work / f"v{NEW}.img", image_bytes, seed=seed * 2 + 2),
    }
    repo = make_repo(work / "repo", [ImageSpec(images[OLD], OLD)])
    rng = random.Random(seed)
    specs = []
    width = len(str(nodes - 1))
    for i in range(nodes):
        spec = NodeSpec(f"n{i:0{width}d}", work / "nodes" / f"n{i:0{width}d}", f"g{i % groups}")
        build_node(spec, images[OLD], rng)
        specs.append(spec)
    files = FleetFiles(work, repo, images, {_sha(p): v for v, p in images.items()}, tuple(specs))
    atomic_write(work / "fleet.json", json.dumps(files.to_json(), indent=1).encode())
    return files


def publish_update(fleet: FleetFiles, waves: str) -> dict[str, object]:
    """Sign 2.0.0 into the repository with the rollout plan `waves` and publish it, with
    the `sign-release` console script (`add --waves`, then `publish`)."""
    env = {**os.environ, "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1"}
    added = _sign_release(
        env,
        "add", fleet.repo, fleet.images[NEW], "--version", NEW, "--hardware", HARDWARE,
        "--waves", waves, "--sign-with", TARGETS_KEY,
    )  # fmt: skip
    published = _sign_release(
        env,
        "publish", fleet.repo, "--snapshot-key", SNAPSHOT_KEY, "--timestamp-key", TIMESTAMP_KEY,
    )  # fmt: skip
    return {"added": added, "published": published}


def _sign_release(env: dict[str, str], *args: str | Path) -> object:
    done = subprocess.run(
        [str(BIN / "sign-release"), "--json", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sign-release {args[0]} failed: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def config_text(
    spec: NodeSpec,
    booted: str,
    *,
    server: str,
    etcd: tuple[str, ...],
    max_concurrent: int,
) -> str:
    """The node's /etc/updater/config.toml: the repository on nginx, the GRUB backend on
    the node's own disk and grubenv, the reboot lock of its group on etcd, metrics.
    Hooks are `true`: the simulated reboot is the simulation's, after the hook ran."""
    endpoints = ", ".join(json.dumps(e) for e in etcd)
    return f"""
[repository]
metadata_url = "{server}/metadata"
targets_url = "{server}/targets"
trusted_root = "{ROOT_JSON}"
allow_example_keys = true  # a simulation: the repository is signed with keys-example/
[device]
hardware = "{HARDWARE}"
disk = "{spec.disk}"
bootloader = "grub"
grubenv = "{spec.grubenv}"
booted_slot = "{booted}"
state_dir = "{spec.state_dir}"
os_release = "{spec.os_release}"
machine_id = "{spec.machine_id}"
[slots.A]
root = "{SLOT_LABELS["A"]}"
[slots.B]
root = "{SLOT_LABELS["B"]}"
[health]
deadline = 5.0
interval = 0.1
[hooks]
pre_reboot = ["true"]
reboot = ["true"]
[coordination]
backend = "etcd"
endpoints = [{endpoints}]
group = "{spec.group}"
max_concurrent = {max_concurrent}
[metrics]
path = "{spec.metrics}"
"""
