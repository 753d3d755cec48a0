"""updater.disk.gpt without external tools: the data model, CRCs, damage, and properties
over random bytes, truncations and bit flips (real tools: tests/integration/)."""

from __future__ import annotations

import dataclasses
import tempfile
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import GPTError, UpdaterError
from updater.disk import gpt

ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
SECTORS = 256  # a 128 KiB image: small enough to flip every bit of interest quickly


def _part(number: int, first: int, last: int, name: str = "p", attrs: int = 0) -> gpt.Partition:
    return gpt.Partition(number, ESP, uuid.uuid4(), first, last, attrs, name)


def _image(path: Path, sectors: int = SECTORS) -> gpt.GptDisk:
    disk = gpt.new_gpt(
        sectors, partitions=[_part(1, 40, 99, "root_a"), _part(2, 100, 159, "root_b", 1 << 56)]
    )
    path.write_bytes(bytes(sectors * 512))
    gpt.write_gpt(path, disk)
    return disk


def test_boot_attribute_bits() -> None:
    p = _part(1, 40, 99, attrs=(1 << 60) | 1)
    q = p.with_boot_attrs(priority=15, tries=3, successful=True)
    assert (q.priority, q.tries, q.successful) == (15, 3, True)
    assert q.attributes == (1 << 60) | 1 | (15 << 48) | (3 << 52) | (1 << 56)
    r = q.with_boot_attrs(priority=0, successful=False)
    assert (r.priority, r.tries, r.successful) == (0, 3, False)
    assert p.size_bytes(512) == 60 * 512
    for bad in ({"priority": 16}, {"tries": -1}):
        with pytest.raises(GPTError, match="not in 0-15"):
            p.with_boot_attrs(**bad)  # type: ignore[arg-type]


def test_write_then_read_is_identical(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    disk = _image(path)
    back = gpt.read_gpt(path)
    assert back.damaged == []
    assert back.partitions == disk.partitions
    assert back.disk_guid == disk.disk_guid
    assert (back.first_usable_lba, back.last_usable_lba) == (34, SECTORS - 34)
    assert back.backup_lba == SECTORS - 1
    # and the CRCs are the real ones, checked independently of the reader
    raw = path.read_bytes()
    header = bytearray(raw[512:604])
    crc = int.from_bytes(header[16:20], "little")
    header[16:20] = bytes(4)
    assert zlib.crc32(bytes(header)) == crc
    assert zlib.crc32(raw[1024 : 1024 + 128 * 128]) == int.from_bytes(raw[600:604], "little")


def test_find_and_replace(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _image(path)
    disk = gpt.read_gpt(path)
    b = disk.find("root_b")
    assert b.number == 2 and b.successful
    changed = disk.replace(b.with_boot_attrs(priority=2, tries=1, successful=False))
    gpt.write_gpt(path, changed)
    again = gpt.read_gpt(path).find("root_b")
    assert (again.priority, again.tries, again.successful) == (2, 1, False)
    assert gpt.read_gpt(path).find("root_a") == disk.find("root_a")
    with pytest.raises(GPTError, match=r"d\.img: no partition named 'nope'"):
        disk.find("nope")
    dup = disk.replace(dataclasses.replace(b, number=3, first_lba=160, last_lba=170, name="root_a"))
    with pytest.raises(GPTError, match="2 partitions named 'root_a'"):
        dup.find("root_a")


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([_part(1, 40, 99), _part(2, 99, 120)], "overlap"),
        ([_part(1, 10, 99)], "outside the usable range"),
        ([_part(1, 40, SECTORS - 10)], "outside the usable range"),
        ([_part(129, 40, 50)], "entry number"),
    ],
)
def test_invalid_tables_are_refused(parts: list[gpt.Partition], message: str) -> None:
    with pytest.raises(GPTError, match=message):
        gpt.new_gpt(SECTORS, partitions=parts)


def test_name_longer_than_36_units_is_refused(tmp_path: Path) -> None:
    disk = gpt.new_gpt(SECTORS)
    with pytest.raises(GPTError, match="longer than 36"):
        gpt.build_tables(disk.replace(_part(1, 40, 50, "x" * 37)))


@pytest.mark.parametrize(
    ("region", "offset", "expect"),
    [
        ("primary header", 512 + 40, "primary GPT: header CRC32 mismatch"),
        ("primary entries", 1024 + 5, "primary GPT: entry array CRC32 mismatch"),
        ("backup header", (SECTORS - 1) * 512 + 3, "backup GPT: no 'EFI PART'"),
        ("backup entries", (SECTORS - 33) * 512 + 200, "backup GPT: entry array CRC32"),
    ],
)
def test_one_damaged_copy_is_reported_and_repaired(
    tmp_path: Path, region: str, offset: int, expect: str
) -> None:
    path = tmp_path / "d.img"
    disk = _image(path)
    good = path.read_bytes()
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(bytes([good[offset] ^ 0x10]))
    damaged = gpt.read_gpt(path)
    assert len(damaged.damaged) == 1 and damaged.damaged[0].startswith(expect), damaged.damaged
    assert damaged.partitions == disk.partitions
    assert gpt.repair_gpt(path) == damaged.damaged
    assert path.read_bytes() == good
    assert gpt.repair_gpt(path) == []


def _set_header_field(path: Path, lba: int, at: int, value: int, size: int = 8) -> None:
    """Change a field of the header at `lba` and re-seal its CRC32 (CRC-valid but
    wrong: only the cross-checks between the copies can find it)."""
    with path.open("r+b") as f:
        f.seek(lba * 512)
        header = bytearray(f.read(92))
        header[at : at + size] = value.to_bytes(size, "little")
        header[16:20] = bytes(4)
        header[16:20] = zlib.crc32(header).to_bytes(4, "little")
        f.seek(lba * 512)
        f.write(header)


@pytest.mark.parametrize(
    ("lba", "value", "expect"),
    [
        # The backup's AlternateLBA must name the primary (found by the gpt fuzz target:
        # a backup naming LBA 0x0300000000000001 read as undamaged and never repaired).
        (SECTORS - 1, 3 << 56 | 1, "backup GPT: header at LBA 255 says the primary is at"),
        (SECTORS - 1, 0, "backup GPT: header at LBA 255 says the primary is at LBA 0"),
        # The primary's AlternateLBA must name where the backup is (sgdisk -v: "main GPT
        # header's alternate LBA pointer ... doesn't match").
        (1, SECTORS - 2, "primary GPT: says the backup is at LBA 254, it is at LBA 255"),
    ],
)
def test_alternate_lba_pointers_that_disagree_are_damage_and_repaired(
    tmp_path: Path, lba: int, value: int, expect: str
) -> None:
    path = tmp_path / "d.img"
    disk = _image(path)
    good = path.read_bytes()
    _set_header_field(path, lba, 32, value)  # AlternateLBA
    damaged = gpt.read_gpt(path)
    assert [d[: len(expect)] for d in damaged.damaged] == [expect], damaged.damaged
    assert damaged.partitions == disk.partitions
    assert gpt.repair_gpt(path) == damaged.damaged
    assert path.read_bytes() == good


@pytest.mark.parametrize(("at", "value", "size"), [(20, 0xF0 << 24, 4), (8, 0x00010001, 4)])
def test_header_fields_kept_byte_for_byte_must_agree_between_the_copies(
    tmp_path: Path, at: int, value: int, size: int
) -> None:
    # Reserved, revision: a rebuild writes both copies from one; a backup that differs
    # is damage to repair, not a table that silently changes on the next write (found
    # by the gpt fuzz target; input kept in tests/fuzz/crashes/gpt/).
    path = tmp_path / "d.img"
    disk = _image(path)
    good = path.read_bytes()
    _set_header_field(path, SECTORS - 1, at, value, size)
    expect = "backup GPT: does not match the primary"
    damaged = gpt.read_gpt(path)
    assert [d[: len(expect)] for d in damaged.damaged] == [expect], damaged.damaged
    assert damaged.partitions == disk.partitions
    assert gpt.repair_gpt(path) == damaged.damaged
    assert path.read_bytes() == good


def test_both_copies_damaged_is_an_error_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _image(path)
    with path.open("r+b") as f:
        f.seek(512)
        f.write(b"NOT PART")
        f.seek((SECTORS - 33) * 512 + 7)
        f.write(b"\xff")
    with pytest.raises(GPTError) as err:
        gpt.read_gpt(path)
    text = str(err.value)
    assert str(path) in text and "primary: no 'EFI PART'" in text
    assert "backup: entry array CRC32 mismatch" in text


def test_truncated_disk_uses_primary_and_reports_backup(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    disk = _image(path)
    with path.open("r+b") as f:
        f.truncate((SECTORS - 8) * 512)
    cut = gpt.read_gpt(path)
    assert cut.partitions == disk.partitions
    assert cut.damaged and cut.damaged[0].startswith("backup GPT:")
    with path.open("r+b") as f:
        f.truncate(700)
    with pytest.raises(GPTError, match="too small"):
        gpt.read_gpt(path)


def test_missing_protective_mbr_is_reported_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _image(path)
    good = path.read_bytes()
    with path.open("r+b") as f:
        f.seek(510)
        f.write(b"\0\0")
    assert gpt.read_gpt(path).damaged == ["protective MBR: no 0x55AA signature"]
    gpt.repair_gpt(path)
    assert path.read_bytes() == good


def test_missing_file_is_a_device_error(tmp_path: Path) -> None:
    with pytest.raises(UpdaterError, match="cannot open"):
        gpt.read_gpt(tmp_path / "absent.img")


# --- properties ------------------------------------------------------------------------

_TEMPLATE_DIR = tempfile.TemporaryDirectory()
_TEMPLATE = Path(_TEMPLATE_DIR.name) / "template.img"
_image(_TEMPLATE)
GOOD = _TEMPLATE.read_bytes()
# Byte ranges whose every bit is covered by a header or entry-array CRC32.
COVERED = [
    (512, 512 + 92),
    (1024, 1024 + 128 * 128),
    ((SECTORS - 33) * 512, (SECTORS - 1) * 512),
    ((SECTORS - 1) * 512, (SECTORS - 1) * 512 + 92),
]


def _read_bytes(data: bytes) -> gpt.GptDisk | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.img"
        path.write_bytes(data)
        try:
            return gpt.read_gpt(path)
        except UpdaterError:
            return None  # our own error type: the property holds


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=8192))
def test_random_bytes_only_raise_our_errors(data: bytes) -> None:
    _read_bytes(data)


@FAST
@given(st.integers(min_value=0, max_value=len(GOOD)))
def test_truncations_only_raise_our_errors(length: int) -> None:
    _read_bytes(GOOD[:length])


@FAST
@given(st.integers(min_value=0, max_value=len(GOOD) * 8 - 1))
def test_bit_flips_anywhere_only_raise_our_errors(bit: int) -> None:
    data = bytearray(GOOD)
    data[bit // 8] ^= 1 << (bit % 8)
    _read_bytes(bytes(data))


@FAST
@given(
    st.sampled_from(COVERED).flatmap(
        lambda r: st.integers(min_value=r[0] * 8, max_value=r[1] * 8 - 1)
    )
)
def test_bit_flip_in_crc_covered_area_is_detected(bit: int) -> None:
    data = bytearray(GOOD)
    data[bit // 8] ^= 1 << (bit % 8)
    disk = _read_bytes(bytes(data))
    assert disk is None or disk.damaged, f"flip of bit {bit} went unnoticed"
