"""updater.disk.blockdev on disk image files laid out by the real sgdisk, and the pure
booted-slot detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, DeviceError, GPTError, UpdateFailed
from tests.conftest import run_tool
from updater.disk.blockdev import (
    detect_booted_slot,
    find_slot_partitions,
    is_block_device,
    root_device_number,
)
from updater.disk.gpt import read_gpt
from updater.slots import PartitionTarget

SLOTS = {"A": {"root": "root_a", "boot": "boot_a"}, "B": {"root": "root_b", "boot": "boot_b"}}
GUID_ROOT_A = "0f0e0d0c-0b0a-4908-8706-050403020100"


def lay_out(disk: Path) -> None:
    run_tool(
        "sgdisk",
        "-n1:2048:+1M",
        "-c1:esp",
        "-n2:0:+4M",
        "-c2:boot_a",
        "-n3:0:+8M",
        "-c3:root_a",
        f"-u3:{GUID_ROOT_A}",
        "-n4:0:+4M",
        "-c4:boot_b",
        "-n5:0:+8M",
        "-c5:root_b",
        disk,
    )


def sgdisk_range(disk: Path, number: int) -> tuple[int, int]:
    """(first, last) sector of a partition, as sgdisk itself reports it."""
    out = run_tool("sgdisk", "-i", str(number), disk).stdout
    first = int(out.split("First sector: ")[1].split()[0])
    last = int(out.split("Last sector: ")[1].split()[0])
    return first, last


def test_image_file_targets_are_byte_ranges_of_the_gpt(sparse_disk: Path) -> None:
    lay_out(sparse_disk)
    assert not is_block_device(sparse_disk)
    labels = [p.name for p in read_gpt(sparse_disk).partitions]
    assert labels == ["esp", "boot_a", "root_a", "boot_b", "root_b"]
    targets = find_slot_partitions(sparse_disk, SLOTS)
    assert sorted(targets) == ["A", "B"] and sorted(targets["A"]) == ["boot", "root"]
    for slot, number, role in (
        ("A", 2, "boot"),
        ("A", 3, "root"),
        ("B", 4, "boot"),
        ("B", 5, "root"),
    ):
        first, last = sgdisk_range(sparse_disk, number)
        target = targets[slot][role]
        assert target.path == sparse_disk
        assert (target.offset, target.size) == (first * 512, (last - first + 1) * 512)
        assert target.label == SLOTS[slot][role] and target.slot == slot
    assert targets["A"]["root"].partuuid == GUID_ROOT_A


def test_a_missing_label_names_slot_role_and_disk(sparse_disk: Path) -> None:
    lay_out(sparse_disk)
    slots = {"A": {"root": "root_a"}, "B": {"root": "root_x"}}
    with pytest.raises(
        ConfigError,
        match=r"\[slots.B\] root = 'root_x': no single partition "
        r"named root_x on .*disk.img",
    ):
        find_slot_partitions(sparse_disk, slots)


def test_not_a_disk_is_a_clear_error(tmp_path: Path, sparse_disk: Path) -> None:
    with pytest.raises(GPTError, match=r"disk\.img: no valid GPT"):
        find_slot_partitions(sparse_disk, SLOTS)  # no GPT at all
    with pytest.raises(DeviceError, match=r"cannot open .*nothing\.img"):
        find_slot_partitions(tmp_path / "nothing.img", SLOTS)


def targets() -> dict[str, dict[str, PartitionTarget]]:
    def t(slot: str, label: str, uuid: str, node: str) -> PartitionTarget:
        return PartitionTarget(slot, "root", label, Path(node), 0, 1 << 20, uuid)

    return {
        "A": {"root": t("A", "root_a", "aaaaaaaa-0000-4000-8000-000000000001", "/dev/vda3")},
        "B": {"root": t("B", "root_b", "bbbbbbbb-0000-4000-8000-000000000002", "/dev/vda5")},
    }


MOUNTINFO = """22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 253:5 / / rw,relatime - ext4 /dev/vda5 rw
28 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
"""


def test_override_wins() -> None:
    assert detect_booted_slot("updater.slot=A", MOUNTINFO, targets(), "B") == "B"


def test_kernel_argument_wins_over_root() -> None:
    cmdline = "BOOT_IMAGE=/vmlinuz root=PARTLABEL=root_a ro updater.slot=B quiet\n"
    assert detect_booted_slot(cmdline, MOUNTINFO, targets()) == "B"
    with pytest.raises(UpdateFailed, match=r"updater\.slot='C' is not one of A, B"):
        detect_booted_slot("updater.slot=C", MOUNTINFO, targets())


@pytest.mark.parametrize(
    ("root", "slot"),
    [
        ("root=PARTLABEL=root_a", "A"),
        ("root=PARTLABEL=root_b", "B"),
        ("root=PARTUUID=BBBBBBBB-0000-4000-8000-000000000002", "B"),
        ('root="PARTUUID=aaaaaaaa-0000-4000-8000-000000000001"', "A"),
        ("root=/dev/vda3", "A"),
        ("root=PARTLABEL=root_b root=PARTLABEL=root_a", "A"),  # last one counts
    ],
)
def test_root_argument(root: str, slot: str) -> None:
    assert detect_booted_slot(f"ro {root} quiet", "", targets()) == slot


def test_empty_root_values_match_nothing() -> None:
    no_guid = {
        "A": {"root": PartitionTarget("A", "root", "root_a", Path("/d"), 512, 512)},
        "B": {"root": PartitionTarget("B", "root", "root_b", Path("/d"), 1024, 512)},
    }
    for root in ("root=PARTUUID=", "root=PARTLABEL="):
        with pytest.raises(UpdateFailed, match="cannot tell which slot is booted"):
            detect_booted_slot(root, "", no_guid)


def test_mounted_root_device() -> None:
    numbers = {Path("/dev/vda3"): "253:3", Path("/dev/vda5"): "253:5"}
    assert root_device_number(MOUNTINFO) == "253:5"
    assert (
        detect_booted_slot("root=/dev/dm-0 ro", MOUNTINFO, targets(), device_numbers=numbers) == "B"
    )


def test_no_evidence_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(UpdateFailed) as info:
        detect_booted_slot(
            "root=/dev/sda1 ro", MOUNTINFO, targets(), device_numbers={Path("/dev/vda3"): "253:3"}
        )
    message = str(info.value)
    assert "cannot tell which slot is booted" in message
    assert "root=/dev/sda1 names no slot partition" in message and "253:5" in message
    assert 'booted_slot = "A" or "B"' in message
    with pytest.raises(ConfigError, match=r"booted_slot 'X'"):
        detect_booted_slot("", "", targets(), "X")
