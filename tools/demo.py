"""`make demo`: lay out an A/B disk image with the real `updater` console script and show
that an independent tool (sgdisk) reads the same partitions. Runs in a few seconds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
UPDATER = Path(sys.executable).parent / "updater"
LAYOUT = ROOT / "partition-layouts" / "grub-efi-ab.toml"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*argv: str | Path) -> str:
    shown = " ".join(str(a).replace(str(ROOT) + "/", "") for a in argv)
    print(f"$ {shown}", flush=True)
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"demo: `{shown}` failed with exit code {out.returncode}")
    return out.stdout


def sgdisk_partitions(listing: str) -> list[tuple[int, int, int, str]]:
    """(number, first, last, name) rows of `sgdisk -p` output."""
    rows = []
    for line in listing.splitlines():
        m = re.match(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+ \S+\s+\S+\s+(.*)$", line)
        if m:
            rows.append((int(m[1]), int(m[2]), int(m[3]), m[4].strip()))
    return rows


def main() -> int:
    sgdisk = shutil.which("sgdisk") or "/usr/sbin/sgdisk"
    OUT.mkdir(exist_ok=True)
    disk = OUT / "disk.img"
    disk.unlink(missing_ok=True)

    say("1. Write the A/B layout (ESP, root_a, root_b, data) to a new 1 GiB sparse image")
    run(UPDATER, "layout", "apply", LAYOUT, disk, "--size", "1G")
    print(f"   {disk.stat().st_size} bytes long, {disk.stat().st_blocks * 512} bytes on disk")

    say("2. Read it back with our own GPT parser")
    run(UPDATER, "layout", "show", disk)
    quiet = subprocess.run([UPDATER, "--json", "layout", "show", disk], capture_output=True,
                           text=True, check=True)
    ours = json.loads(quiet.stdout)

    say("3. Ask an independent tool, sgdisk, to verify the disk and list it")
    run(sgdisk, "-v", disk)
    theirs = sgdisk_partitions(run(sgdisk, "-p", disk))

    say("4. Compare")
    mine = [(p["number"], p["first_lba"], p["last_lba"], p["name"]) for p in ours]
    for row in mine:
        verdict = "same" if row in theirs else "DIFFERENT"
        print(f"   partition {row[0]} {row[3]:<8} sectors {row[1]}-{row[2]}: {verdict} in sgdisk")
    if mine != theirs:
        print("demo: sgdisk and updater disagree", file=sys.stderr)
        return 1
    print("   updater and sgdisk agree on every partition; the image is in demo-out/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
