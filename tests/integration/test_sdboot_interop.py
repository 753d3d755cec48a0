"""The systemd-boot backend against the real `bootctl` (Debian's systemd-boot package).

The ESP is a tmpfs mounted for the test (bootctl insists on the root of a filesystem;
`SYSTEMD_RELAX_ESP_CHECKS=1` lets it accept one that is not FAT), holding Type #1
entries and real UKIs built with objcopy from systemd's stub (`linuxx64.efi.stub`) -
what bootctl, systemd-boot and our PE reader all parse. `bootctl --no-variables list`
then says which entries exist, their ids and counters, their order and which one is
the default: exactly what the backend must agree with.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool, run_tool
from updater.boot import bls
from updater.boot.base import BootContext, SlotState
from updater.boot.sdboot import SdBootBootloader
from updater.disk.pe import parse_os_release, read_sections

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
UKIS = {"A": "EFI/Linux/ab-A.efi", "B": "EFI/Linux/ab-B.efi"}


@pytest.fixture
def esp(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "esp"
    root.mkdir()
    run_tool("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", root)
    try:
        for sub in ("loader/entries", "EFI/Linux"):
            (root / sub).mkdir(parents=True)
        yield root
    finally:
        run_tool("umount", root)


def uki(out: Path, version: str, image_id: str = "ab-updater") -> Path:
    """A real (if tiny) UKI: systemd's stub with .osrel, .cmdline and a .linux blob."""
    stage = out.parent / f".stage-{out.name}"
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "osrel").write_text(
        f'ID=ab-updater\nIMAGE_ID={image_id}\nIMAGE_VERSION={version}\nPRETTY_NAME="ab {version}"\n'
    )
    (stage / "cmdline").write_text("console=ttyS0\n")
    (stage / "linux").write_bytes(os.urandom(4096))
    argv: list[str | Path] = ["objcopy"]
    for section, vma in ((".osrel", 0x20000), (".cmdline", 0x30000), (".linux", 0x2000000)):
        argv += ["--add-section", f"{section}={stage / section[1:]}",
                 "--change-section-vma", f"{section}={vma:#x}"]  # fmt: skip
    run_tool(*argv, STUB, out)
    for f in stage.iterdir():
        f.unlink()
    stage.rmdir()
    return out


def bootctl_list(esp: Path) -> list[dict[str, str]]:
    """`bootctl list`'s entries in its order: their fields, `default` if so marked."""
    require_tool("bootctl")
    env = {**os.environ, "SYSTEMD_RELAX_ESP_CHECKS": "1", "SYSTEMD_PAGER": ""}
    out = subprocess.run(
        ["bootctl", f"--esp-path={esp}", "--no-variables", "--no-pager", "list"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout  # fmt: skip
    entries = []
    for block in out.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.strip().partition(": ")
            if sep:
                fields[key] = value.strip()
        if "id" in fields:
            fields["default"] = "yes" if "(default)" in fields.get("title", "") else "no"
            entries.append(fields)
    return entries


def backend(esp: Path) -> SdBootBootloader:
    return SdBootBootloader(BootContext(Path("/dev/null"), None, esp=esp, slot_entries=UKIS))


def test_our_pe_reader_reads_the_osrel_objcopy_wrote(tmp_path: Path) -> None:
    path = uki(tmp_path / "x.efi", "2.0.0")
    osrel = read_sections(path, [".osrel", ".cmdline"])
    assert parse_os_release(osrel[".osrel"])["IMAGE_VERSION"] == "2.0.0"
    assert osrel[".cmdline"] == b"console=ttyS0\n"


def test_bootctl_sees_our_update_with_the_right_counters_and_default(esp: Path) -> None:
    uki(esp / UKIS["A"], "1.0.0")
    (esp / "loader/loader.conf").write_text("timeout 0\ndefault ab-a.efi\n")
    boot = backend(esp)

    boot.write(boot.load().invalidate("B"))
    uki(esp / "EFI/Linux/ab-B+0-0.efi", "2.0.0")  # where the agent writes a new entry
    listed = bootctl_list(esp)
    assert [(e["id"], e["default"], e.get("tries")) for e in listed] == [
        ("ab-A.efi", "yes", None),
        ("ab-B.efi", "no", "0 left; 0 done"),
    ]

    state = boot.write(boot.load().try_next("B"))
    assert state.primary() == "B"
    listed = bootctl_list(esp)
    assert [(e["id"], e["default"], e.get("tries")) for e in listed] == [
        ("ab-B.efi", "yes", "1 left; 0 done"),
        ("ab-A.efi", "no", None),
    ]
    assert listed[0]["source"].endswith("/EFI/Linux/ab-B+1-0.efi")

    # systemd-boot boots it once and renames it; a cut now: bootctl falls back to A.
    os.rename(esp / "EFI/Linux/ab-B+1-0.efi", esp / "EFI/Linux/ab-B+0-1.efi")
    listed = bootctl_list(esp)
    assert [(e["id"], e["default"]) for e in listed] == [("ab-A.efi", "yes"), ("ab-B.efi", "no")]
    assert boot.load().primary() == "A"

    # ... or the health check commits it: systemd-bless-boot good's name.
    state = boot.write(boot.load().commit("B"))
    assert state.state("B") is SlotState.GOOD
    listed = bootctl_list(esp)
    assert [(e["id"], e["default"], e.get("tries")) for e in listed] == [
        ("ab-B.efi", "yes", None),
        ("ab-A.efi", "no", None),
    ]
    assert listed[0]["source"].endswith("/EFI/Linux/ab-B.efi")

    # A failed health check later: B bad (systemd-bless-boot bad), A the default.
    boot.write(boot.load().fall_back("B"))
    listed = bootctl_list(esp)
    assert [(e["id"], e["default"], e.get("tries")) for e in listed] == [
        ("ab-A.efi", "yes", None),
        ("ab-B.efi", "no", "0 left; 0 done"),
    ]


KERNEL_INSTALL_NAMES = [
    # kernel-install: <entry-token>-<kernel version>[+<tries>].conf / .efi
    "4a5bd7e62e7b4b2e9f0c0d6a0c2b1f3e-6.1.0-13-amd64+3.conf",
    "4a5bd7e62e7b4b2e9f0c0d6a0c2b1f3e-6.1.0-12-amd64.conf",
    "debian-6.1.0-18-amd64+2-1.conf",
    "debian-6.1.0-17-amd64+0-3.conf",
    "fedora-6.5.6-300.fc39.x86_64+1-2.conf",
]
# bootctl skips file names with a character outside [A-Za-z0-9+-_.] (systemd-boot does
# not: `mkosi_2.1~rc1.efi` would be listed by one and not the other), so none has one.
UKI_NAMES = [
    "debian-6.1.0-20+3.efi",
    "debian-6.1.0-19+0-2.efi",
    "mkosi_2.1-rc1.efi",
    "ParticleOS_7.efi",
]


def _type1(esp: Path, name: str, version: str, sort_key: str | None) -> None:
    (esp / "vmlinuz").write_bytes(b"k")
    lines = [f"title {name}", f"version {version}", "linux /vmlinuz"]
    if sort_key is not None:
        lines.append(f"sort-key {sort_key}")
    (esp / "loader/entries" / name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("seed", range(12))
def test_kernel_install_and_uki_names_order_and_default_are_read_as_bootctl_does(
    esp: Path, seed: int
) -> None:
    """Entries named as kernel-install and sysupdate name them, with and without sort
    keys: our names, counters, order and default choice are bootctl's."""
    rng = random.Random(seed)
    for name in rng.sample(KERNEL_INSTALL_NAMES, rng.randint(1, len(KERNEL_INSTALL_NAMES))):
        version = name.split("-", 1)[1].rsplit("+", 1)[0].removesuffix(".conf")
        _type1(esp, name, version, rng.choice([None, "debian", "fedora"]))
    for name in rng.sample(UKI_NAMES, rng.randint(0, len(UKI_NAMES))):
        version = name.split("-", 1)[-1].split("_", 1)[-1].rsplit("+", 1)[0].removesuffix(".efi")
        uki(esp / "EFI/Linux" / name, version, image_id=rng.choice(["debian", "mkosi"]))
    pattern = rng.choice([None, "debian-*", "*6.1.0-12*", "fedora*", "nothing"])
    (esp / "loader/loader.conf").write_text(f"default {pattern}\n" if pattern else "timeout 3\n")

    state = backend(esp).load()  # neither of its slot entries exists: all are "others"
    ours = bls.ordered(state.others)
    listed = bootctl_list(esp)
    assert [e["id"] for e in listed] == [e.name.blessed().name for e in ours], (
        [e["id"] for e in listed],
        [e.name.name for e in ours],
        [(e.sort_key, e.version) for e in ours],
    )
    for entry, shown in zip(ours, listed, strict=True):
        assert shown["source"].endswith("/" + entry.name.name)
        if entry.name.left is None:
            assert "tries" not in shown
        else:
            assert shown["tries"].startswith(f"{entry.name.left} left")
            if "-" in entry.name.name.rsplit("+", 1)[1]:
                assert shown["tries"] == f"{entry.name.left} left; {entry.name.done} done"
    chosen = bls.select(ours, pattern)
    assert chosen is not None
    defaults = [e["id"] for e in listed if e["default"] == "yes"]
    assert defaults == [chosen.name.blessed().name]
