"""updater.disk.layout: loading, validating and planning partition layouts (no I/O on
disks; writing them to disks is in tests/integration/)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from updater.disk.layout import (
    TYPE_ALIASES,
    load_layout,
    parse_size,
    plan_layout,
)
from updater.errors import LayoutError

LAYOUTS = Path(__file__).resolve().parents[2] / "partition-layouts"
GIB = 1 << 30
MIB = 1 << 20


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "layout.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 * MIB), ("2G", 2 * GIB), ("64MiB", 64 * MIB), ("4k", 4096), ("1T", 1 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0M", "12", "1.5G", "-1M", "5X", "M", "rest"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad size"):
        parse_size(text)


def test_shipped_layouts_fit_one_gib() -> None:
    for name in ("grub-efi-ab", "gptprio-ab"):
        disk = plan_layout(load_layout(LAYOUTS / f"{name}.toml"), GIB)
        assert [p.name for p in disk.partitions] == ["esp", "root_a", "root_b", "data"]
        assert all(p.first_lba % 2048 == 0 for p in disk.partitions)
        assert disk.find("root_a").size_bytes(512) == 384 * MIB
        assert disk.find("root_a").type_guid == TYPE_ALIASES["root-x86-64"]
        assert disk.find("data").last_lba <= disk.last_usable_lba


def test_gptprio_layout_boot_bits() -> None:
    disk = plan_layout(load_layout(LAYOUTS / "gptprio-ab.toml"), GIB)
    a, b = disk.find("root_a"), disk.find("root_b")
    assert (a.priority, a.tries, a.successful) == (1, 0, True)
    assert (b.priority, b.tries, b.successful) == (0, 0, False)


def test_fixed_guids_raw_attributes_and_type_guid(tmp_path: Path) -> None:
    disk_guid, part_guid, odd_type = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    path = _write(
        tmp_path,
        f"""
[layout]
disk_guid = "{disk_guid}"
[[partition]]
name = "x"
type = "{odd_type}"
size = "1M"
uuid = "{part_guid}"
attributes = 0x1000000000000001
tries = 3
""",
    )
    disk = plan_layout(load_layout(path), 8 * MIB)
    (p,) = disk.partitions
    assert disk.disk_guid == disk_guid
    assert (p.unique_guid, p.type_guid) == (part_guid, odd_type)
    assert p.attributes == 0x1000000000000001 | (3 << 52)
    assert (p.first_lba, p.last_lba) == (2048, 4095)


PART = '[[partition]]\nname = "{name}"\ntype = "{type}"\nsize = "{size}"\n'


def _parts(*rows: tuple[str, str, str]) -> str:
    return "".join(PART.format(name=n, type=t, size=s) for n, t, s in rows)


BAD = {
    "unknown alias": (_parts(("a", "root-sparc", "1M")), "partition 1 ('a').type: unknown type"),
    "duplicate name": (
        _parts(("a", "esp", "1M"), ("a", "esp", "1M")),
        "partition 2 ('a').name: duplicate name 'a'",
    ),
    "missing field": ('[[partition]]\nname = "a"\ntype = "esp"\n', "partition 1.size: missing"),
    "rest not last": (
        _parts(("a", "esp", "rest"), ("b", "esp", "1M")),
        "partition 1 ('a').size: \"rest\" is only allowed for the last",
    ),
    "bad size": (_parts(("a", "esp", "12 bananas")), "partition 1 ('a').size: bad size"),
    "too big": (_parts(("a", "esp", "2G")), "partition 1 ('a').size: does not fit the target"),
    "second too big": (
        _parts(("a", "esp", "30M"), ("b", "var", "30M")),
        "partition 2 ('b').size: does not fit the target",
    ),
    "no partitions": ('[layout]\ndescription = "x"\n', "partition: missing"),
    "unknown field": (
        _parts(("a", "esp", "1M")) + 'colour = "red"\n',
        "partition 1 ('a').colour: unknown field",
    ),
    "bad priority": (
        _parts(("a", "esp", "1M")) + "priority = 16\n",
        "partition 1 ('a').priority: must be an integer 0-15",
    ),
    "bad uuid": (
        _parts(("a", "esp", "1M")) + 'uuid = "nope"\n',
        "partition 1 ('a').uuid: not a GUID",
    ),
    "long name": (_parts(("n" * 37, "esp", "1M")), ".name: must be a non-empty string"),
    "not toml": ("[[partition]\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layouts_name_file_and_field(tmp_path: Path, case: str) -> None:
    text, message = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(LayoutError) as err:
        plan_layout(load_layout(path), 48 * MIB)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
