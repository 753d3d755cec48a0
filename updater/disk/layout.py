"""Declarative partition layouts (partition-layouts/*.toml) and writing them to a disk.

A layout is a TOML file with `[[partition]]` tables (format: docs/layouts.md). Loading
it (`load_layout`) checks everything that does not depend on the disk; planning it for
a disk size (`plan_layout`, pure) checks that it fits and returns a `GptDisk`;
`apply_layout` does the I/O.

Invariants: partitions start on 1 MiB boundaries; every error is a `LayoutError`
naming the layout file and the field; the target is not modified unless the whole
plan is valid and the target is neither holding a partition table (unless `force`) nor
in use (mounted, or held open exclusively) whatever the flags; a new image file is
built crash-safely (`fsutil.replacing`), at the file its path names.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DeviceError, GPTError, LayoutError
from core.fsutil import replacing
from core.textparse import read_toml
from updater.disk.gpt import (
    GptDisk,
    Partition,
    build_tables,
    device_geometry,
    new_gpt,
    open_disk,
    write_tables,
)

ALIGN = 1024 * 1024
_BLKRRPART = 0x125F

# UAPI "Discoverable Partitions Specification" type GUIDs (plus a few common others).
TYPE_ALIASES: dict[str, uuid.UUID] = {
    name: uuid.UUID(guid)
    for name, guid in {
        "esp": "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
        "xbootldr": "bc13c2ff-59e6-4262-a352-b275fd6f7172",
        "swap": "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f",
        "home": "933ac7e1-2eb4-4f13-b844-0e14e2aef915",
        "srv": "3b8f8425-20e0-4f3b-907f-1a25a76f98e8",
        "var": "4d21b016-b534-45c2-a9fb-5c16e091fd2d",
        "tmp": "7ec6f557-3bc5-4aca-b293-16ef5df639d1",
        "linux-generic": "0fc63daf-8483-4772-8e79-3d69d8477de4",
        "root-x86-64": "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
        "root-arm64": "b921b045-1df0-41c3-af44-4c6f280d3fae",
        "root-x86": "44479540-f297-41b2-9af7-d131d5f0458a",
        "root-arm": "69dad710-2ce4-4e3c-b16c-21a1d49abed3",
        "root-riscv64": "72ec70a6-cf74-40e6-bd49-4bda08e8f224",
        "usr-x86-64": "8484680c-9521-48c6-9c11-b0720656f69e",
        "usr-arm64": "b0e01050-ee5f-4390-949a-9101b17104e9",
        "usr-riscv64": "beaec34b-8442-439b-a40b-984381ed097d",
        "root-verity-x86-64": "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5",
        "root-verity-arm64": "df3300ce-d69f-4c92-978c-9bfb0f38d820",
        "usr-verity-x86-64": "77ff5f63-e7b6-4633-acf4-1565b864c0e6",
        "usr-verity-arm64": "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e",
        "bios-boot": "21686148-6449-6e6f-744e-656564454649",
    }.items()
}
ALIAS_OF = {guid: name for name, guid in TYPE_ALIASES.items()}

_SIZE = re.compile(r"([1-9][0-9]*)\s*([KMGT])(?:i?B)?", re.IGNORECASE | re.ASCII)
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_LAYOUT_KEYS = {"name", "description", "disk_guid"}
# The largest file (or block device) Linux can have: off_t is a signed 64-bit count.
MAX_SIZE = (1 << 63) - 1
_OVER_LIMIT = f"over the limit of {MAX_SIZE} bytes (8 EiB), the largest a file or disk can be"
MAX_LAYOUT_BYTES = 1 << 20  # a layout is a few hundred bytes; refuse reading more
_KNOWN_KEYS = {"name", "type", "size", "uuid", "attributes", "priority", "tries", "successful"}


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    type_guid: uuid.UUID
    size: int | None  # bytes; None means "rest"
    unique_guid: uuid.UUID | None
    attributes: int


@dataclass(frozen=True)
class Layout:
    source: str
    partitions: tuple[PartitionSpec, ...]
    disk_guid: uuid.UUID | None = None


def parse_size(text: str) -> int:
    """'512M' / '2G' / '64MiB' -> bytes (binary units); ValueError (one line) if malformed
    or over `MAX_SIZE`, the largest a file or disk can be."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad size {text[:40]!r} (want e.g. 512M, 2G or rest)")
    digits = m.group(1)
    # Bounded before int(): a 5000-digit count is too large, not a conversion error.
    size = int(digits) * _UNITS[m.group(2).upper()] if len(digits) <= 19 else MAX_SIZE + 1
    if size > MAX_SIZE:
        raise ValueError(f"size {text.strip()[:24]!r} is {_OVER_LIMIT}")
    return size


def resolve_type(text: str) -> uuid.UUID:
    """A type alias or GUID -> the type GUID; ValueError for anything else, including the
    all-zero GUID, which marks an unused entry."""
    if text.lower() in TYPE_ALIASES:
        return TYPE_ALIASES[text.lower()]
    try:
        guid = uuid.UUID(text)
    except ValueError:
        raise ValueError(
            f"unknown type {text[:40]!r} (a GUID or one of: {', '.join(sorted(TYPE_ALIASES))})"
        ) from None
    if guid.int == 0:
        raise ValueError("the empty type GUID marks an unused entry, not a partition")
    return guid


def load_layout(path: Path) -> Layout:
    """Read and check a layout file (everything that does not depend on the disk)."""
    try:
        doc = read_toml(path, MAX_LAYOUT_BYTES, "layout")
    except ValueError as e:  # cannot read, not UTF-8, not TOML
        raise LayoutError(f"{path}: {e}") from e
    return layout_from_dict(doc, str(path))


def layout_from_dict(doc: dict[str, Any], source: str) -> Layout:
    """Check a parsed layout document; `source` names it in every error."""

    def fail(where: str, why: str) -> LayoutError:
        return LayoutError(f"{source}: {where}: {why}")

    def string(where: str, value: object) -> str:
        if not isinstance(value, str):
            raise fail(where, f"must be a string, not {_short(value)}")
        return value

    def guid(where: str, value: object) -> uuid.UUID:
        try:
            return uuid.UUID(string(where, value))
        except ValueError:
            raise fail(where, f"not a GUID: {_short(value)}") from None

    head = doc.get("layout", {})
    if not isinstance(head, dict):
        raise fail("layout", "must be a table")
    if unknown := (set(doc) - {"layout", "partition"}) or (set(head) - _LAYOUT_KEYS):
        raise fail(sorted(unknown)[0], "unknown field")
    for key in ("name", "description"):
        if key in head:
            string(f"layout.{key}", head[key])
    disk_guid = guid("layout.disk_guid", head["disk_guid"]) if "disk_guid" in head else None
    items = doc.get("partition")
    if not isinstance(items, list) or not items:
        raise fail("partition", "missing: a layout needs at least one [[partition]]")
    specs: list[PartitionSpec] = []
    for i, item in enumerate(items, 1):
        where = f"partition {i}"
        if not isinstance(item, dict):
            raise fail(where, "must be a table")
        for key in ("name", "type", "size"):
            if key not in item:
                raise fail(f"{where}.{key}", "missing")
        where = f"partition {i} ({_short(item['name'])})"
        if unknown := set(item) - _KNOWN_KEYS:
            raise fail(f"{where}.{sorted(unknown)[0]}", "unknown field")
        if (why := _name_problem(item["name"])) is not None:
            raise fail(f"{where}.name", why)
        name: str = item["name"]
        if any(s.name == name for s in specs):
            raise fail(f"{where}.name", f"duplicate name {name!r}")
        try:
            type_guid = resolve_type(string(f"{where}.type", item["type"]))
        except ValueError as e:
            raise fail(f"{where}.type", str(e)) from None
        size: int | None = None
        if string(f"{where}.size", item["size"]) == "rest":
            if i != len(items):
                raise fail(f"{where}.size", '"rest" is only allowed for the last partition')
        else:
            try:
                size = parse_size(item["size"])
            except ValueError as e:
                raise fail(f"{where}.size", str(e)) from None
        unique = guid(f"{where}.uuid", item["uuid"]) if "uuid" in item else None
        # PARTUUIDs tell which slot is booted: two equal ones would name the wrong slot.
        for n, other in enumerate(specs, 1):
            if unique is not None and other.unique_guid == unique:
                raise fail(
                    f"{where}.uuid", f"{unique} is also the uuid of partition {n} ({other.name!r})"
                )
        specs.append(PartitionSpec(name, type_guid, size, unique, _attributes(item, where, fail)))
    return Layout(source, tuple(specs), disk_guid)


def _short(value: object) -> str:
    """A value as an error quotes it: its repr, cut so the message stays one short line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _name_problem(name: object) -> str | None:
    """Why `name` cannot be a GPT partition name, or None."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string of at most 36 chars"
    if "\0" in name:
        return "must not contain NUL (the GPT ends a name at the first NUL)"
    try:
        units = len(name.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        return "must be a non-empty string of at most 36 chars (not a lone surrogate)"
    if units > 36:
        return f"must be a non-empty string of at most 36 chars, not {units}"
    return None


def _attributes(item: dict[str, Any], where: str, fail: Callable[[str, str], LayoutError]) -> int:
    """The 64-bit attribute field: `attributes`, then the boot bits that override it."""
    attrs = item.get("attributes", 0)
    if not isinstance(attrs, int) or isinstance(attrs, bool) or not 0 <= attrs < 1 << 64:
        raise fail(f"{where}.attributes", "must be an integer in 0..2^64-1")
    for key, shift in (("priority", 48), ("tries", 52)):
        if key in item:
            v = item[key]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 15:
                raise fail(f"{where}.{key}", f"must be an integer 0-15, not {_short(v)}")
            attrs = (attrs & ~(0xF << shift)) | (v << shift)
    if "successful" in item:
        v = item["successful"]
        if not isinstance(v, bool) and v not in (0, 1):
            raise fail(f"{where}.successful", f"must be true/false, not {_short(v)}")
        attrs = (attrs & ~(1 << 56)) | (int(v) << 56)
    return attrs


def plan_layout(layout: Layout, size_bytes: int, sector_size: int = 512) -> GptDisk:
    """The GPT the layout makes on a disk of `size_bytes` (pure; LayoutError if it
    does not fit)."""
    if size_bytes > MAX_SIZE:
        raise LayoutError(f"{layout.source}: target of {size_bytes} bytes: {_OVER_LIMIT}")
    total = size_bytes // sector_size
    try:
        empty = new_gpt(
            total, sector_size=sector_size, disk_guid=layout.disk_guid, source=layout.source
        )
    except GPTError as e:
        raise LayoutError(f"{layout.source}: target of {size_bytes} bytes: {e}") from e
    align = max(ALIGN // sector_size, 1)
    lba = empty.first_usable_lba
    parts: list[Partition] = []
    for n, spec in enumerate(layout.partitions, 1):
        where = f"{layout.source}: partition {n} ({spec.name!r}).size"
        first = -(-lba // align) * align
        if spec.size is None:
            # End on an alignment boundary too (sgdisk cautions otherwise), if room.
            end = (empty.last_usable_lba + 1) // align * align - 1
            last = end if end >= first else empty.last_usable_lba
        else:
            if spec.size % sector_size:
                raise LayoutError(f"{where}: not a multiple of the {sector_size}-byte sector")
            last = first + spec.size // sector_size - 1
        if first > empty.last_usable_lba or last > empty.last_usable_lba or last < first:
            raise LayoutError(
                f"{where}: does not fit the target ({size_bytes} bytes; "
                f"usable sectors end at {empty.last_usable_lba})"
            )
        parts.append(
            Partition(
                n,
                spec.type_guid,
                spec.unique_guid or uuid.uuid4(),
                first,
                last,
                spec.attributes,
                spec.name,
            )
        )
        lba = last + 1
    return new_gpt(
        total,
        sector_size=sector_size,
        disk_guid=empty.disk_guid,
        partitions=parts,
        source=layout.source,
    )


# --- applying ------------------------------------------------------------------------


def _has_table(head: bytes) -> str | None:
    if len(head) >= 520 and head[512:520] == b"EFI PART":
        return "a GPT"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return "an MBR partition table"
    return None


def _busy_reason(path: Path, rdev: int) -> str | None:
    """Why a block device must not be repartitioned: it or a partition is mounted."""
    devs = {rdev}
    sysdir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    if sysdir.is_dir():
        for child in sysdir.iterdir():
            if (child / "partition").exists():
                major, minor = (child / "dev").read_text().strip().split(":")
                devs.add(os.makedev(int(major), int(minor)))
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            major, minor = fields[2].split(":")
            if os.makedev(int(major), int(minor)) in devs:
                return f"it (or a partition of it) is mounted on {fields[4]}"
    return None


def apply_layout(
    layout: Layout, target: Path, *, size: int | None = None, force: bool = False
) -> tuple[GptDisk, list[str]]:
    """Write the layout's GPT to a block device or image file; returns the table and
    notes (e.g. a failed partition re-read)."""
    notes: list[str] = []
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise DeviceError(f"{target}: {e.strerror}") from e
    if st is None:
        if size is None:
            raise DeviceError(f"{target}: does not exist (give --size to create an image)")
        disk = plan_layout(layout, size)
        _create_image(target, size, disk)
        return disk, notes
    block = stat.S_ISBLK(st.st_mode)
    if not block and not stat.S_ISREG(st.st_mode):
        raise DeviceError(f"{target}: neither a block device nor a regular file")
    if block:
        if size is not None:
            raise DeviceError(f"{target}: --size applies to image files, not block devices")
        if (why := _busy_reason(target, st.st_rdev)) is not None:
            raise DeviceError(f"{target}: refusing to repartition: {why}")
    try:
        # Opened non-blocking and checked again on the descriptor: no FIFO swapped in.
        fd = open_disk(target, os.O_RDWR | (os.O_EXCL if block else 0))
    except OSError as e:
        why = "it is in use" if e.errno == errno.EBUSY else e.strerror
        raise DeviceError(f"{target}: cannot open for writing: {why}") from e
    try:
        ss, dev_size = device_geometry(fd, target)
        if size is not None and size < dev_size:
            raise DeviceError(
                f"{target}: --size {size} is smaller than the file "
                f"({dev_size} bytes); refusing to shrink"
            )
        disk = plan_layout(layout, size or dev_size, ss)
        head = os.pread(fd, 2 * ss, 0)
        if (table := _has_table(head)) is not None and not force:
            raise DeviceError(f"{target}: already holds {table} (use --force to overwrite)")
        if size is not None and size > dev_size:
            os.ftruncate(fd, size)
        write_tables(fd, target, build_tables(disk))
        if block:
            try:
                fcntl.ioctl(fd, _BLKRRPART)
            except OSError as e:
                notes.append(
                    f"{target}: the kernel did not re-read the partition table "
                    f"({e.strerror}); run partprobe or reboot"
                )
    finally:
        os.close(fd)
    return disk, notes


def _create_image(target: Path, size: int, disk: GptDisk) -> None:
    """A new sparse image of `size` bytes holding `disk`'s tables, made crash-safely
    (`fsutil.replacing`: a temporary file, fsync'd, renamed into place)."""
    try:
        with replacing(target, mode=0o644) as image:
            try:
                os.ftruncate(image.fileno(), size)
            except OSError as e:
                raise DeviceError(f"{target}: cannot size image to {size}: {e.strerror}") from e
            write_tables(image.fileno(), target, build_tables(disk))
    except OSError as e:
        raise DeviceError(f"{target}: cannot create image: {e.strerror or e}") from e
