"""Interop of updater.disk.gpt/layout with the real tools, both directions: sgdisk,
sfdisk and cgpt write what we read, and read what we write; plus a real loop device."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import DeviceError, UpdaterError
from tests.conftest import run_tool
from updater.disk import gpt
from updater.disk.layout import TYPE_ALIASES, apply_layout, load_layout

LAYOUTS = Path(__file__).resolve().parents[2] / "partition-layouts"
GIB = 1 << 30


def _sgdisk_clean(path: Path) -> None:
    out = run_tool("sgdisk", "-v", path, check=False)
    assert "No problems found" in out.stdout, out.stdout + out.stderr
    assert "Caution" not in out.stdout and "Warning" not in out.stdout, out.stdout


def _metadata(path: Path) -> bytes:
    """The first and last MiB of a disk: where both GPT copies live (cheaper than 1 GiB)."""
    with path.open("rb") as f:
        head = f.read(1 << 20)
        f.seek(-(1 << 20), os.SEEK_END)
        return head + f.read()


def _sfdisk(path: Path) -> list[dict[str, object]]:
    table = json.loads(run_tool("sfdisk", "--json", path).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    parts: list[dict[str, object]] = table["partitions"]
    return parts


@pytest.mark.parametrize(
    ("name", "esp_mib"), [("grub-efi-ab", 64), ("gptprio-ab", 64), ("systemd-boot-ab", 128)]
)
def test_applied_layout_passes_sgdisk_and_sfdisk_agrees(
    tmp_path: Path, name: str, esp_mib: int
) -> None:
    path = tmp_path / "disk.img"
    disk, _ = apply_layout(load_layout(LAYOUTS / f"{name}.toml"), path, size=GIB)
    _sgdisk_clean(path)
    theirs = _sfdisk(path)
    assert [p["name"] for p in theirs] == ["esp", "root_a", "root_b", "data"]
    for ours, t in zip(disk.partitions, theirs, strict=True):
        assert t["name"] == ours.name
        assert str(t["type"]).lower() == str(ours.type_guid)
        assert str(t["uuid"]).lower() == str(ours.unique_guid)
        assert t["start"] == ours.first_lba
        assert t["size"] == ours.last_lba - ours.first_lba + 1
        assert ours.first_lba % 2048 == 0  # 1 MiB alignment
    assert disk.find("esp").size_bytes(512) == esp_mib << 20


def test_sgdisk_made_disk_is_read_exactly_and_rebuilt_byte_for_byte(
    sparse_disk: Path,
) -> None:
    guids = [uuid.uuid4() for _ in range(4)]
    disk_guid = uuid.uuid4()
    run_tool(
        "sgdisk",
        "-U",
        str(disk_guid),
        "-n",
        "1:2048:+8M",
        "-t",
        "1:ef00",
        "-c",
        "1:EFI system",
        "-u",
        f"1:{guids[0]}",
        "-n",
        "2:0:+16M",
        "-t",
        "2:8304",
        "-c",
        "2:root_a",
        "-u",
        f"2:{guids[1]}",
        "-A",
        "2:set:48",
        "-A",
        "2:set:50",
        "-A",
        "2:set:56",
        "-n",
        "3:0:+16M",
        "-t",
        "3:8304",
        "-c",
        "3:root_b ü",
        "-u",
        f"3:{guids[2]}",
        "-A",
        "3:set:53",
        "-A",
        "3:set:0",
        "-n",
        "5:0:0",
        "-t",
        "5:8300",
        "-c",
        "5:data",
        "-u",
        f"5:{guids[3]}",
        sparse_disk,
    )
    disk = gpt.read_gpt(sparse_disk)
    assert disk.damaged == []
    assert disk.disk_guid == disk_guid
    assert [p.number for p in disk.partitions] == [1, 2, 3, 5]
    assert [p.name for p in disk.partitions] == ["EFI system", "root_a", "root_b ü", "data"]
    assert [p.unique_guid for p in disk.partitions] == guids
    a, b = disk.find("root_a"), disk.find("root_b ü")
    assert (a.priority, a.tries, a.successful) == (5, 0, True)
    assert (b.priority, b.tries, b.successful, b.attributes & 1) == (0, 2, False, 1)
    assert disk.find("EFI system").type_guid == TYPE_ALIASES["esp"]
    assert a.type_guid == TYPE_ALIASES["root-x86-64"]
    # the same numbers through sfdisk
    for ours, t in zip(disk.partitions, _sfdisk(sparse_disk), strict=True):
        assert (t["start"], t["name"]) == (ours.first_lba, ours.name)
    raw = sparse_disk.read_bytes()
    for region, (offset, data) in gpt.build_tables(disk).items():
        assert raw[offset : offset + len(data)] == data, f"{region} differs after parse->build"


def test_cgpt_attributes_are_read_exactly(sparse_disk: Path) -> None:
    run_tool(
        "sgdisk", "-n", "1:0:+8M", "-c", "1:root_a", "-n", "2:0:+8M", "-c", "2:root_b", sparse_disk
    )
    run_tool("cgpt", "add", "-i", "1", "-P", "7", "-T", "0", "-S", "1", sparse_disk)
    run_tool("cgpt", "add", "-i", "2", "-P", "15", "-T", "9", "-S", "0", sparse_disk)
    disk = gpt.read_gpt(sparse_disk)
    assert disk.damaged == []
    a, b = disk.find("root_a"), disk.find("root_b")
    assert (a.priority, a.tries, a.successful) == (7, 0, True)
    assert (b.priority, b.tries, b.successful) == (15, 9, False)


def _cgpt_bits(path: Path, number: int) -> tuple[int, int, int]:
    def one(flag: str) -> int:
        return int(run_tool("cgpt", "show", "-i", str(number), flag, path).stdout.strip())

    return one("-P"), one("-T"), one("-S")


def test_attributes_we_write_are_read_exactly_by_cgpt(sparse_disk: Path) -> None:
    run_tool(
        "sgdisk", "-n", "1:0:+8M", "-c", "1:root_a", "-n", "2:0:+8M", "-c", "2:root_b", sparse_disk
    )
    disk = gpt.read_gpt(sparse_disk)
    for prio, tries, ok in ((2, 1, False), (0, 0, False), (15, 15, True), (1, 0, True)):
        disk = disk.replace(
            disk.find("root_b").with_boot_attrs(priority=prio, tries=tries, successful=ok)
        )
        gpt.write_gpt(sparse_disk, disk)
        assert _cgpt_bits(sparse_disk, 2) == (prio, tries, int(ok))
        assert _cgpt_bits(sparse_disk, 1) == (0, 0, 0)
        _sgdisk_clean(sparse_disk)


@pytest.mark.parametrize(
    "where", ["primary header", "primary entries", "backup header", "backup entries"]
)
def test_damage_found_and_repaired_to_sgdisk_clean(tmp_path: Path, where: str) -> None:
    path = tmp_path / "disk.img"
    disk, _ = apply_layout(load_layout(LAYOUTS / "grub-efi-ab.toml"), path, size=GIB)
    good = _metadata(path)
    offset = gpt.build_tables(disk)[where][0] + 17
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xa5\x5a")
    seen = gpt.read_gpt(path)
    assert [d.split(":")[0] for d in seen.damaged] == [f"{where.split()[0]} GPT"]
    assert seen.partitions == disk.partitions
    complaint = run_tool("sgdisk", "-v", path, check=False).stdout
    assert "Caution" in complaint or "No problems found" not in complaint, complaint
    assert gpt.repair_gpt(path) == seen.damaged
    _sgdisk_clean(path)
    assert _metadata(path) == good


def test_type_aliases_are_the_real_guids() -> None:
    known = run_tool("sfdisk", "--label", "gpt", "-T").stdout.lower()
    for alias, guid in TYPE_ALIASES.items():
        assert str(guid) in known, f"{alias}: {guid} is not a GPT type sfdisk knows"


@pytest.mark.root
def test_apply_and_show_on_a_real_loop_device(sparse_disk: Path) -> None:
    assert os.geteuid() == 0, "loop devices need root"
    with sparse_disk.open("r+b") as f:
        f.truncate(GIB)
    dev = Path(run_tool("losetup", "--find", "--show", "--partscan", sparse_disk).stdout.strip())
    try:
        disk, notes = apply_layout(load_layout(LAYOUTS / "gptprio-ab.toml"), dev)
        assert notes == []  # BLKRRPART worked
        back = gpt.read_gpt(dev)
        assert back.sector_size == 512 and back.total_sectors == GIB // 512
        assert back.partitions == disk.partitions
        assert back.damaged == []
        # (This kernel may lack CONFIG_EFI_PARTITION, so no loopNpM nodes are asserted.)
        with pytest.raises(UpdaterError, match="already holds a GPT"):
            apply_layout(load_layout(LAYOUTS / "gptprio-ab.toml"), dev)
        # Another opener holding the device exclusively (as a mount or dm would) wins,
        # even with --force.
        holder = os.open(dev, os.O_RDONLY | os.O_EXCL)
        try:
            with pytest.raises(DeviceError, match="in use"):
                apply_layout(load_layout(LAYOUTS / "gptprio-ab.toml"), dev, force=True)
        finally:
            os.close(holder)
        apply_layout(load_layout(LAYOUTS / "grub-efi-ab.toml"), dev, force=True)
        assert [p.name for p in gpt.read_gpt(dev).partitions] == ["esp", "root_a", "root_b", "data"]
    finally:
        run_tool("losetup", "--detach", dev)
    _sgdisk_clean(sparse_disk)


def test_uncommon_entry_count_is_kept_and_edits_stay_sgdisk_clean(sparse_disk: Path) -> None:
    run_tool(
        "sgdisk",
        "--resize-table=256",
        "-n",
        "1:0:+8M",
        "-c",
        "1:root_a",
        "-n",
        "2:0:+8M",
        "-c",
        "2:root_b",
        sparse_disk,
    )
    disk = gpt.read_gpt(sparse_disk)
    assert (disk.num_entries, disk.first_usable_lba, disk.damaged) == (256, 66, [])
    raw = _metadata(sparse_disk)
    rebuilt = gpt.build_tables(disk)
    assert raw[: 66 * 512] == b"".join(
        rebuilt[k][1] for k in ("mbr", "primary header", "primary entries")
    )
    gpt.write_gpt(sparse_disk, disk.replace(disk.find("root_a").with_boot_attrs(tries=4)))
    _sgdisk_clean(sparse_disk)
    # (cgpt refuses tables of other than 128 entries, even sgdisk's; ask sfdisk.)
    assert _sfdisk(sparse_disk)[0]["attrs"] == "GUID:54"  # tries=4: bit 52+2
    assert "Partition table holds up to 256 entries" in run_tool("sgdisk", "-p", sparse_disk).stdout


def _sfdisk_made(path: Path) -> None:
    subprocess.run(
        [run_tool("sfdisk", "--version").args[0], "-q", str(path)],
        input="label: gpt\nsize=8M, name=root_a\nsize=8M, name=root_b\nname=data\n",
        text=True,
        check=True,
        capture_output=True,
    )


def _cgpt_made(path: Path) -> None:
    run_tool("cgpt", "create", path)
    run_tool("cgpt", "boot", "-p", path)  # the protective MBR
    run_tool("cgpt", "add", "-b", "2048", "-s", "16384", "-t", "data", "-l", "root_a", path)
    run_tool("cgpt", "add", "-b", "18432", "-s", "16384", "-t", "data", "-l", "root_b", path)
    run_tool("cgpt", "add", "-i", "1", "-P", "2", "-T", "1", "-S", "0", path)


@pytest.mark.parametrize("make", [_sfdisk_made, _cgpt_made], ids=["sfdisk", "cgpt"])
def test_tables_made_by_sfdisk_and_cgpt_pass_the_checks_also_grown(
    sparse_disk: Path, make: Callable[[Path], None]
) -> None:
    make(sparse_disk)
    disk = gpt.read_gpt(sparse_disk)  # every read validates the geometry
    assert disk.damaged == []
    assert [p.name for p in disk.partitions][:2] == ["root_a", "root_b"]
    theirs = _sfdisk(sparse_disk)
    assert [t["start"] for t in theirs] == [p.first_lba for p in disk.partitions]
    assert len({p.unique_guid for p in disk.partitions}) == len(disk.partitions)
    with sparse_disk.open("r+b") as f:
        f.truncate(2 * 64 << 20)  # grown image: the backup now sits in the middle
    grown = gpt.read_gpt(sparse_disk)
    assert grown.partitions == disk.partitions
    assert grown.backup_lba == disk.backup_lba < grown.total_sectors - 1
    assert gpt.repair_gpt(sparse_disk) == []  # both copies valid where they are
    _sgdisk_clean_or_only_moved_backup(sparse_disk)


def _sgdisk_clean_or_only_moved_backup(path: Path) -> None:
    out = run_tool("sgdisk", "-v", path, check=False).stdout
    assert "No problems found" in out or "secondary header's self-pointer" in out, out
