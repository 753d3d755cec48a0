"""Seed inputs for the fuzz targets, made by the real producers of each format.

`python -m tests.fuzz.seeds [DIR]` writes `DIR/<target>/seed-*` (default: the corpus,
`tests/fuzz/corpus/`): GPTs written by `sgdisk` (and one by `updater layout apply`),
grubenv blocks by `grub-editenv`, the shipped partition layouts, the documented
configs, targets and customs from a repository signed by the signing library with the
example keys, a manifest written by `update-mirror sync`, and journals saved by the
agent's own `save_journal`. Run once to start a corpus; the campaign keeps what it adds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import mirror
from tests.conftest import require_tool
from tests.fuzz.targets import TARGETS
from tests.httpserver import HTTPTestServer
from tools.examplerepo import ROOT_JSON, ImageSpec, add_release, make_repo, publish
from tools.node.release import CONFIG as node_config
from tools.node.release import HARDWARE, NODE_DISK
from updater.disk.gpt import protective_mbr, read_gpt, write_gpt
from updater.state import JOURNAL_NAME, Journal, save_journal

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def _run(*argv: str | Path) -> None:
    args = [str(a) for a in argv]
    args[0] = require_tool(args[0])
    subprocess.run(args, check=True, capture_output=True)


def gpt_seeds(work: Path) -> dict[str, bytes]:
    """Small disks: 4-entry tables (1-sector arrays) keep inputs a few KiB."""
    out: dict[str, bytes] = {}

    def disk(name: str, sectors: int, *args: str, grow: int = 0, cut: int = 0) -> None:
        img = work / f"{name}.img"
        with img.open("wb") as f:
            f.truncate(sectors * 512)
        _run("sgdisk", *args, img)
        if cut:
            # sgdisk needs room for 128 entries before it shrinks the table; the same
            # table on a disk of `cut` sectors is written by write_gpt, checked by sgdisk.
            table = read_gpt(img)
            small = dataclasses.replace(
                table,
                total_sectors=cut,
                last_usable_lba=cut - 4,
                backup_lba=0,
                backup_entries_lba=0,
                mbr=protective_mbr(cut),
            )
            img.unlink()
            with img.open("wb") as f:
                f.truncate(cut * 512)
            write_gpt(img, small)
            _run("sgdisk", "-v", img)
        if grow:  # an image grown after partitioning: the backup is not at the end
            with img.open("r+b") as f:
                f.truncate(img.stat().st_size + grow * 512)
        data = img.read_bytes()
        out[name] = b"\0" + data  # flag byte 0: CRCs as written
        out[f"{name}-fixcrc"] = b"\3" + data

    four = ["--resize-table=4", "-a", "1"]
    ab = ["-n", "1:0:+1K", "-c", "1:esp", "-t", "1:ef00"]
    ab += ["-n", "2:0:+2K", "-c", "2:root_a", "-n", "3:0:+2K", "-c", "3:root_b"]
    ab += ["-A", "2:set:48", "-A", "2:set:56", "-A", "3:set:49", "-A", "3:set:52"]
    disk("sgdisk-4entries", 80, *four, *ab, cut=24)
    disk("sgdisk-4entries-grown", 80, *four, *ab, cut=24, grow=8)
    disk("sgdisk-empty", 80, *four, cut=8)
    # The standard 128-entry table on the smallest disk sgdisk accepts for it.
    disk("sgdisk-128entries", 72, "-a", "1", "-n", "1:0:+1K", "-c", "1:root_a")
    return out


def grubenv_seeds(work: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    env = work / "grubenv"
    _run("grub-editenv", env, "create")
    out["created"] = env.read_bytes()
    _run("grub-editenv", env, "set", "ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0")
    out["ab-committed"] = env.read_bytes()
    _run("grub-editenv", env, "set", "ORDER=B A", "B_OK=1", "B_TRY=1")
    out["ab-trying"] = env.read_bytes()
    _run("grub-editenv", env, "set", "note=back\\slash\nnew line", "empty=")
    out["escaped"] = env.read_bytes()
    return out


def layout_seeds() -> dict[str, bytes]:
    layouts = sorted((REPO / "partition-layouts").glob("*.toml"))
    return {p.stem: p.read_bytes() for p in layouts}


def config_seeds() -> dict[str, bytes]:
    """The TOML examples of docs/configuration.md (the first is a complete config), and
    the config of the e2e QEMU node."""
    text = (REPO / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    out = {f"docs-{i}": block.encode() for i, block in enumerate(blocks)}
    out["e2e-node"] = node_config.format(hardware=HARDWARE, disk=NODE_DISK).encode()
    full = blocks[0]
    out["gptprio"] = re.sub(
        r'bootloader\s*=\s*"grub".*\ngrubenv[^\n]*', 'bootloader = "gptprio"', full
    ).encode()
    return out


def repository_seeds(work: Path) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, bytes]]:
    """Targets, customs and a mirror manifest of one repository signed with the example
    keys: two releases, two roles, three compressions."""
    images = []
    for name, size in (("root", 3000), ("boot", 1000)):
        path = work / f"{name}.img"
        path.write_bytes(bytes(range(256)) * (size // 256))
        images.append((name, path))
    specs = [ImageSpec(p, "1.0.0", role=r, compression="zstd") for r, p in images]
    repo = make_repo(work / "repo", specs)
    more = [
        ImageSpec(p, "1.1.0-rc.1", role=r, compression=c, hardware=("x86_64-efi", "arm64-efi"))
        for (r, p), c in zip(images, ("xz", "none"), strict=True)
    ]
    add_release(repo, more)
    publish(repo)
    latest = max(
        (repo / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0])
    )
    signed = json.loads(latest.read_bytes())["signed"]
    targets = {"signed-targets": json.dumps(signed["targets"], indent=1).encode()}
    customs = {
        f"custom-{i}": json.dumps(t["custom"]).encode()
        for i, t in enumerate(signed["targets"].values())
    }
    with HTTPTestServer(repo) as server:
        mdir = work / "mirror"
        mirror.sync(
            f"{server.url}/metadata",
            f"{server.url}/targets",
            mdir,
            ROOT_JSON,
            backoff=0.0,
            allow_example_keys=True,
        )
    manifests = {p.stem: p.read_bytes() for p in sorted((mdir / "manifests").glob("*.json"))}
    return targets, customs, manifests


def journal_seeds(work: Path) -> dict[str, bytes]:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    j = Journal().with_installed("A", "1.0.0", now).with_check(None, now)
    states = {
        "installed": j,
        "pending": j.with_installed("B", "1.1.0", now).with_pending("B", "1.1.0", now),
        "failed": j.with_failed("1.1.0", "health check http://x failed", now).with_check(
            "network down", now
        ),
    }
    out: dict[str, bytes] = {}
    for name, state in states.items():
        d = work / f"journal-{name}"
        save_journal(d, state)
        out[name] = (d / JOURNAL_NAME).read_bytes()
    out["damaged-with-backup"] = out["pending"][:40] + b"\0" + out["installed"]
    out["missing-with-backup"] = b"\0" + out["failed"]
    return out


def main(argv: list[str]) -> None:
    dest = Path(argv[1]) if len(argv) > 1 else HERE / "corpus"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        targets, customs, manifests = repository_seeds(work)
        seeds = {
            "gpt": gpt_seeds(work),
            "grubenv": grubenv_seeds(work),
            "layout": layout_seeds(),
            "config": config_seeds(),
            "release_custom": customs,
            "release_targets": targets,
            "manifest": manifests,
            "journal": journal_seeds(work),
        }
    assert set(seeds) == set(TARGETS)
    for target, files in seeds.items():
        (dest / target).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (dest / target / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(files)} seeds")


if __name__ == "__main__":
    main(sys.argv)
