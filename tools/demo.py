"""`make demo`: the main job of ab-updater, narrated, on a virtual node in QEMU.

1. Lay out an A/B disk image with the real `updater` console script and check that an
   independent tool (sgdisk) reads the same partitions (a few seconds).
2. Build (first run: ~3 min, mostly debootstrap; cached in .cache/e2e afterwards) a
   node: OVMF, GRUB with the project's A/B script, release 1.0.0 in slot A; sign
   releases 2.0.0 (healthy) and 3.0.0 (its health check fails) into a TUF repository
   that reaches the node as a second disk (no networking).
3. Boot it five times (scenarios a and b of tests/e2e/test_scenarios.py): update to
   2.0.0, commit, update to 3.0.0, automatic rollback, refusal to retry 3.0.0. After
   each boot say, from the serial console and the grubenv on the disk, which slot
   booted, which version, what the agent decided; end with a summary table.

Invariants: the demo only reports what the console and the disk show (the same
readers as the tests: tools/node/scenarios.py); any boot that does not end as the
story expects stops the demo with a non-zero exit and the console log's path.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.node import default_cache_dir  # noqa: E402
from tools.node.scenarios import Boot, HappyThenFailed  # noqa: E402

OUT = ROOT / "demo-out"
UPDATER = Path(sys.executable).parent / "updater"
LAYOUT = ROOT / "partition-layouts" / "grub-efi-ab.toml"

# What each boot of the story must show: (slot, version, health decision, exit).
EXPECTED = [
    ("A", "1.0.0", "committed", "reboot"),
    ("B", "2.0.0", "committed", "poweroff"),
    ("B", "2.0.0", "committed", "reboot"),
    ("A", "3.0.0", "rolled-back", "reboot"),
    ("B", "2.0.0", "committed", "poweroff"),
]
STORY = [
    "Boot 1: the factory image 1.0.0 in slot A. The agent commits it, finds 2.0.0 on the "
    "UPDATES disk, writes it into slot B, makes B primary with one try and reboots.",
    "Boot 2: GRUB should try slot B once; 2.0.0's health check decides whether it stays.",
    "Boot 3: a plain power-on. Meanwhile 3.0.0 - built with a failing health check - "
    "was published; the agent installs it into slot A and reboots.",
    "Boot 4: GRUB tries slot A (3.0.0); its health check fails.",
    "Boot 5: after the rollback, and a plain `updater install` with 3.0.0 still offered.",
]


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


def layout_step() -> None:
    say("Step 1. The disk layout: write it with `updater layout apply`, read it with sgdisk")
    sgdisk = shutil.which("sgdisk") or "/usr/sbin/sgdisk"
    disk = OUT / "disk.img"
    disk.unlink(missing_ok=True)
    run(UPDATER, "layout", "apply", LAYOUT, disk, "--size", "1G")
    quiet = subprocess.run(
        [UPDATER, "--json", "layout", "show", disk], capture_output=True, text=True, check=True
    )
    ours = [
        (p["number"], p["first_lba"], p["last_lba"], p["name"])
        for p in json.loads(quiet.stdout)["partitions"]
    ]
    theirs = sgdisk_partitions(run(sgdisk, "-p", disk))
    for row in ours:
        verdict = "same" if row in theirs else "DIFFERENT"
        print(f"   partition {row[0]} {row[3]:<8} sectors {row[1]}-{row[2]}: {verdict} in sgdisk")
    if ours != theirs:
        raise SystemExit("demo: sgdisk and updater disagree about the layout")
    print("   updater and sgdisk agree: ESP, root_a (slot A), root_b (slot B), data.")


def explain(boot: Boot) -> list[str]:
    """Plain words for one boot, from its console and the grubenv afterwards."""
    lines = []
    for said in boot.grub_said:
        lines.append(f"GRUB said: {said.removeprefix('ab-updater: ')}")
    if boot.slot:
        lines.append(f"Linux came up from slot {boot.slot}, running version {boot.version}.")
    decided = {
        "committed": "the health check passed, so the agent committed this slot",
        "rolled-back": "the health check FAILED: the agent marked this slot bad, made the "
        "other slot primary again and rebooted",
        "fell-back": "GRUB had already fallen back; the agent recorded the failure",
        "nothing": "the slot was already committed; nothing to do",
    }
    if boot.health:
        lines.append(f"Agent: {decided.get(boot.health, boot.health)}.")
    install = boot.install
    if install is not None and install.get("installed"):
        rate = boot.throughput_mib_s() or 0.0
        mib = boot.progress[-1]["total"] / (1 << 20) if boot.progress else 0.0
        lines.append(
            f"Agent: installed {install['version']} into slot {install['slot']} "
            f"({mib:.0f} MiB, verified by reading it back, {rate:.1f} MiB/s), "
            "made it primary with one try, rebooted."
        )
    elif install is not None:
        failed = ", ".join(boot.journal.get("failed_versions", {})) or "none"
        lines.append(
            f"Agent: `updater install` found nothing to install "
            f"(versions that failed on this node: {failed})."
        )
    env = boot.grubenv
    lines.append(
        f"grubenv afterwards: ORDER={env.get('ORDER')!r} A_OK={env.get('A_OK')} "
        f"A_TRY={env.get('A_TRY')} B_OK={env.get('B_OK')} B_TRY={env.get('B_TRY')}"
    )
    return lines


def node_steps() -> int:
    cache = default_cache_dir()
    say("Step 2. Build the virtual node and the signed releases")
    fresh = not any(cache.glob("debootstrap-*/.complete"))
    if fresh:
        print(
            f"   First run: building the node image into {cache} (debootstrap of a minimal\n"
            "   Debian with python3 and the cloud kernel, then the releases). Expect about\n"
            "   3 minutes, depending on the mirror; later runs reuse the cache."
        )
    else:
        print(f"   Reusing the cached node image in {cache}.")
    start = time.monotonic()
    work = OUT / "node"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    chain = HappyThenFailed(work, cache=cache, say=lambda text: None)
    print(f"   Node and releases ready in {time.monotonic() - start:.0f} s.")

    say("Step 3. Update the node: five boots in QEMU (OVMF, GRUB, the slot's kernel, the agent)")
    print("   Each boot takes 20-55 s: QEMU emulates the CPU (no KVM).")
    for number, (story, expected) in enumerate(zip(STORY, EXPECTED, strict=True), 1):
        print(f"\n-- {story}", flush=True)
        if number == 3:
            print("   (signing 3.0.0 into the repository on the UPDATES disk)", flush=True)
        boot = chain.run_until(number)[-1]
        for line in explain(boot):
            print(f"   {line}")
        print(f"   ({boot.result.seconds:.0f} s; console log: {boot.result.log_path})", flush=True)
        got = (boot.slot, boot.version, boot.health, boot.result.exit_reason)
        if got != expected:
            print(f"demo: boot {number} showed {got}, expected {expected}", file=sys.stderr)
            return 1
    summary(chain)
    return 0


def summary(chain: HappyThenFailed) -> None:
    say("Summary")
    header = ("boot", "GRUB booted", "version", "health check", "agent", "grubenv after", "time")
    rows = [header]
    for boot in chain.boots:
        install = boot.install
        agent = "-"
        if install is not None:
            agent = (
                f"installed {install['version']} -> {install['slot']}"
                if install.get("installed")
                else "nothing to install"
            )
        env = boot.grubenv
        rows.append((
            str(boot.number), f"slot {boot.slot}", boot.version or "-", boot.health or "-", agent,
            f"ORDER=\"{env.get('ORDER', '')}\" A_OK={env.get('A_OK')} B_OK={env.get('B_OK')}",
            f"{boot.result.seconds:.0f} s",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    failed = ", ".join(chain.boots[-1].journal.get("failed_versions", {}))
    total = sum(b.result.seconds for b in chain.boots)
    print(
        f"\n  The node ends on slot B with 2.0.0, committed; the journal's failed versions: "
        f"{failed}, so a plain install skips it.\n  {len(chain.boots)} boots in {total:.0f} s; "
        f"console logs in {chain.scenario.node.workdir}."
    )


def main() -> int:
    OUT.mkdir(exist_ok=True)
    layout_step()
    return node_steps()


if __name__ == "__main__":
    sys.exit(main())
