"""updater.disk.gpt trusts no geometry from disk: CRC-valid tables (built by the module's
own `build_tables`, so both CRCs are right) whose entries or usable range would let a
write reach the MBR, a header or an entry array are refused on read, with one line
naming the disk and the entry; what is not a disk is refused before it is read.

Properties: over CRC-valid tables of arbitrary geometry (and bit flips of them),
`read_gpt` raises only GPTError/DeviceError, and every table it accepts passes an
independent check written here (not `GptDisk.validate`)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import stat
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core.errors import DeviceError, GPTError
from tests.bounded import fifo, within
from updater.disk import gpt

ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
SECTORS = 256  # usable 34-222; primary entries 2-33, backup entries 223-254, header 255


def _base() -> gpt.GptDisk:
    a = gpt.Partition(1, ESP, uuid.uuid4(), 40, 99, 0, "root_a")
    b = gpt.Partition(2, ESP, uuid.uuid4(), 100, 159, 0, "root_b")
    return gpt.new_gpt(SECTORS, partitions=[a, b])


def _plant(path: Path, disk: gpt.GptDisk, sectors: int = SECTORS) -> None:
    """Write `disk` with the module's builder, bypassing `validate` (a hostile table),
    then grow or cut the file to `sectors`."""
    with path.open("wb") as f:
        f.truncate(disk.total_sectors * 512)
    fd = os.open(path, os.O_RDWR)
    try:
        gpt.write_tables(fd, path, gpt.build_tables(disk))
        os.ftruncate(fd, sectors * 512)
    finally:
        os.close(fd)


def _with_b(disk: gpt.GptDisk, **changes: object) -> gpt.GptDisk:
    b = dataclasses.replace(disk.find("root_b"), **changes)  # type: ignore[arg-type]
    return dataclasses.replace(disk, partitions=[disk.find("root_a"), b])


BASE = _base()
A_GUID = BASE.find("root_a").unique_guid
HOSTILE: dict[str, tuple[gpt.GptDisk, str]] = {
    "entry over the MBR and primary GPT": (
        _with_b(BASE, first_lba=0, last_lba=39),
        "partition 2 ('root_b') sectors 0-39 are outside the usable range 34-222",
    ),
    "entry past the last usable sector": (
        _with_b(BASE, last_lba=240),
        "partition 2 ('root_b') sectors 100-240 are outside the usable range 34-222",
    ),
    "entry past the end of the disk": (
        _with_b(BASE, first_lba=200, last_lba=10**12),
        "partition 2 ('root_b') sectors 200-1000000000000 are outside the usable range",
    ),
    "entry whose first sector is after its last": (
        _with_b(BASE, first_lba=150, last_lba=120),
        "partition 2 ('root_b') ends at sector 120, before its first sector 150",
    ),
    "overlapping entries": (
        _with_b(BASE, first_lba=90),
        "partitions 1 ('root_a', sectors 40-99) and 2 ('root_b', sectors 90-159) overlap",
    ),
    "duplicate unique GUIDs": (
        _with_b(BASE, unique_guid=A_GUID),
        f"partitions 1 ('root_a') and 2 ('root_b') have the same unique GUID {A_GUID}",
    ),
    "usable range over the primary entry array": (
        dataclasses.replace(BASE, first_usable_lba=10),
        "usable range 10-222 overlaps the primary entry array (LBA 2-33)",
    ),
    "usable range from LBA 0": (
        dataclasses.replace(BASE, first_usable_lba=0),
        "usable range 0-222 overlaps the protective MBR (LBA 0-0)",
    ),
    "usable range over the backup entry array": (
        dataclasses.replace(BASE, last_usable_lba=240),
        "usable range 34-240 overlaps the backup entry array (LBA 223-254)",
    ),
    "backup entry array inside the usable range": (
        dataclasses.replace(BASE, backup_entries_lba=180),
        "usable range 34-222 overlaps the backup entry array (LBA 180-211)",
    ),
    "primary entry array inside the usable range": (
        dataclasses.replace(BASE, entries_lba=170),
        "usable range 34-222 overlaps the primary entry array (LBA 170-201)",
    ),
    "usable range ending before it starts": (
        dataclasses.replace(BASE, first_usable_lba=200, last_usable_lba=150, partitions=[]),
        "usable range 200-150 is",  # "invalid" on read (a damaged copy), "empty" to write
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_crc_valid_hostile_table_is_refused_on_read(tmp_path: Path, case: str) -> None:
    disk, message = HOSTILE[case]
    path = tmp_path / "d.img"
    _plant(path, disk)
    with pytest.raises(GPTError) as err:
        gpt.read_gpt(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text, text
    assert "\n" not in text


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_table_is_refused_for_writing_too(tmp_path: Path, case: str) -> None:
    disk, message = HOSTILE[case]
    path = tmp_path / "d.img"
    with path.open("wb") as f:
        f.truncate(SECTORS * 512)
    with pytest.raises(GPTError) as err:
        gpt.write_gpt(path, disk)
    assert message in str(err.value)
    assert path.read_bytes() == bytes(SECTORS * 512)


def test_hostile_backup_behind_a_damaged_primary_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _plant(path, HOSTILE["entry over the MBR and primary GPT"][0])
    with path.open("r+b") as f:
        f.seek(512)
        f.write(b"NOT PART")  # the reader falls back to the (equally hostile) backup
    with pytest.raises(GPTError, match=r"partition 2 \('root_b'\) sectors 0-39 are outside"):
        gpt.read_gpt(path)


def test_grown_and_truncated_images_still_read(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    _plant(path, BASE)
    with path.open("r+b") as f:
        f.truncate(4 * SECTORS * 512)  # grown: the backup is no longer at the end
    grown = gpt.read_gpt(path)
    assert (grown.partitions, grown.backup_lba) == (BASE.partitions, SECTORS - 1)
    with path.open("r+b") as f:
        f.truncate((SECTORS - 8) * 512)  # cut: no backup at all, primary still good
    cut = gpt.read_gpt(path)
    assert cut.partitions == BASE.partitions
    assert cut.damaged and cut.damaged[0].startswith("backup GPT:")


def test_a_layout_style_table_with_empty_entries_between_reads(tmp_path: Path) -> None:
    # Numbers need not be dense nor in disk order (sgdisk -n 5:... exists).
    path = tmp_path / "d.img"
    a, b = BASE.find("root_a"), BASE.find("root_b")
    disk = dataclasses.replace(
        BASE, partitions=[dataclasses.replace(b, number=1), dataclasses.replace(a, number=7)]
    )
    _plant(path, disk)
    assert [p.name for p in gpt.read_gpt(path).partitions] == ["root_b", "root_a"]


# --- what is not a disk --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device"])
@pytest.mark.parametrize("operation", ["read", "write"])
def test_only_a_block_device_or_a_regular_file_is_a_disk(
    tmp_path: Path, kind: str, operation: str
) -> None:
    path = {"directory": tmp_path, "character device": Path("/dev/null")}.get(
        kind, tmp_path / "fifo"
    )
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)

    def call() -> None:
        if operation == "read":
            gpt.read_gpt(path)
        else:
            gpt.write_gpt(path, BASE)

    with contextlib.ExitStack() as stack:
        if kind == "FIFO":
            stack.enter_context(fifo(path))
        with pytest.raises(DeviceError) as err:
            within(call)
    assert str(err.value) == (
        f"cannot open {path}: not a disk: a {kind} (a disk is a block device or an image file)"
    )


# --- properties ------------------------------------------------------------------------

GUIDS = [uuid.UUID(int=n) for n in (1, 2, 3)] + [uuid.uuid4() for _ in range(4)]
TYPES = [ESP, ESP, uuid.UUID(int=0), uuid.UUID(int=7)]
LBA = st.one_of(st.integers(0, SECTORS + 8), st.sampled_from([2**32 - 1, 2**63, 2**64 - 1]))


@st.composite
def _tables(draw: st.DrawFn) -> tuple[gpt.GptDisk, int]:
    """Any table the builder can encode, with CRCs right, on a disk of some size."""
    num_entries = draw(st.sampled_from([4, 16, 128]))
    parts = []
    for number in draw(st.sets(st.integers(1, num_entries), max_size=5)):
        if draw(st.booleans()):  # near the usable range: often sane, often overlapping
            first = draw(st.integers(30, 226))
            last = first + draw(st.integers(-2, 40))
        else:
            first, last = draw(LBA), draw(LBA)
        parts.append(
            gpt.Partition(
                number,
                draw(st.sampled_from(TYPES)),
                draw(st.sampled_from(GUIDS)),
                first,
                last,
                draw(st.integers(0, 2**64 - 1)),
                draw(st.sampled_from(["root_a", "root_b", "x", ""])),
            )
        )
    if draw(st.integers(0, 3)):  # mostly a sane geometry, or one field off by a little
        near = st.sampled_from([0, 0, 0, -1, 1, -20, 20])
        geometry = [34 + draw(near), 222 + draw(near), 2 + max(draw(near), 0), 223 + draw(near)]
    else:
        geometry = [draw(LBA), draw(LBA), draw(st.integers(2, SECTORS - 1)), draw(LBA)]
    first_usable, last_usable, entries, backup_entries = geometry
    disk = dataclasses.replace(
        gpt.new_gpt(SECTORS),
        num_entries=num_entries,
        first_usable_lba=first_usable,
        last_usable_lba=last_usable,
        entries_lba=entries,
        backup_entries_lba=min(backup_entries, SECTORS - 2),
        partitions=sorted(parts, key=lambda p: p.number),
    )
    size = draw(st.sampled_from([SECTORS, SECTORS + 64, SECTORS - 8]))
    return disk, size


def _independently_sane(disk: gpt.GptDisk) -> None:
    """What every accepted table must satisfy, checked without `validate`."""
    first, last = disk.first_usable_lba, disk.last_usable_lba
    assert 0 < first <= last < disk.total_sectors
    array = -(-disk.num_entries * disk.entry_size // disk.sector_size)
    regions = [(0, 0), (1, 1), (disk.entries_lba, disk.entries_lba + array - 1)]
    if not any(d.startswith("backup GPT") for d in disk.damaged):
        regions += [
            (disk.backup_lba, disk.backup_lba),
            (disk.backup_entries_lba, disk.backup_entries_lba + array - 1),
        ]
    for lo, hi in regions:
        assert hi < first or lo > last, f"usable {first}-{last} covers LBA {lo}-{hi}"
    spans = sorted((p.first_lba, p.last_lba) for p in disk.partitions)
    for lo, hi in spans:
        assert first <= lo <= hi <= last
    for (_, hi), (lo, _) in itertools.pairwise(spans):
        assert hi < lo, "overlapping partitions accepted"
    guids = [p.unique_guid for p in disk.partitions]
    assert len(set(guids)) == len(guids), "duplicate unique GUIDs accepted"


def _read(data_disk: gpt.GptDisk, size: int, flip: int | None) -> gpt.GptDisk | None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.img"
        try:
            _plant(path, data_disk, size)
        except (GPTError, DeviceError):
            return None  # not even encodable (e.g. a region past 2^64 bytes)
        if flip is not None:
            with path.open("r+b") as f:
                f.seek(flip // 8)
                byte = f.read(1)
                f.seek(flip // 8)
                f.write(bytes([(byte or b"\0")[0] ^ (1 << (flip % 8))]))
        try:
            return gpt.read_gpt(path)
        except (GPTError, DeviceError) as err:
            assert "\n" not in str(err) and str(err)
            return None


HOSTILE_EXAMPLES = 400
PROPERTY = settings(
    max_examples=HOSTILE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@PROPERTY
@given(_tables(), st.none() | st.integers(0, 40 * 512 * 8))
def test_any_accepted_table_is_sane(table: tuple[gpt.GptDisk, int], flip: int | None) -> None:
    disk, size = table
    accepted = _read(disk, size, flip)
    event("accepted" if accepted is not None else "refused")
    if accepted is not None:
        _independently_sane(accepted)
