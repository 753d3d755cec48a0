"""The sections of a PE/COFF image (a UKI): just enough to read its `.osrel`.

systemd-boot sorts Type #2 entries (Unified Kernel Images in `EFI/Linux/`) by the
os-release text the UKI carries in its `.osrel` section, so knowing what it will boot
means reading that section. Declared once with construct: the DOS header's `MZ` and
`e_lfanew`, the `PE\\0\\0` signature, the COFF file header, and the 40-byte section
headers that follow the optional header.

Invariants: every read is bounded (the headers within the first `MAX_HEADERS` bytes, a
section's content at most `limit` bytes and inside the file); anything that is not a
well-formed PE image is a `PEError` naming the file and what is wrong, never a
construct or struct exception; a section's content is its `VirtualSize` bytes at
`PointerToRawData` (as systemd's pe.c reads it), capped by `SizeOfRawData`.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from construct import Array, Bytes, Const, ConstructError, Int16ul, Int32ul, Padding, Struct

from core.errors import FormatError
from core.fsutil import open_regular

MAX_HEADERS = 64 * 1024  # the section table of any real image is in its first few KiB
MAX_SECTIONS = 96  # the PE format's own limit

DosHeader = Struct("magic" / Const(b"MZ"), Padding(0x3A), "lfanew" / Int32ul)
CoffHeader = Struct(
    "signature" / Const(b"PE\0\0"),
    "machine" / Int16ul,
    "sections" / Int16ul,
    "timestamp" / Int32ul,
    "symbols_at" / Int32ul,
    "symbols" / Int32ul,
    "optional_size" / Int16ul,
    "characteristics" / Int16ul,
)
SectionHeader = Struct(
    "name" / Bytes(8),
    "virtual_size" / Int32ul,
    "virtual_address" / Int32ul,
    "raw_size" / Int32ul,
    "raw_at" / Int32ul,
    Padding(16),  # relocations, line numbers, their counts, characteristics
)


class PEError(FormatError):
    """A file is not a PE image, or its section table lies outside it."""


def read_sections(path: Path, names: Collection[str], limit: int = 64 * 1024) -> dict[str, bytes]:
    """The content of the sections called `names` that `path` has (each at most
    `limit` bytes; a larger one is a PEError)."""
    try:
        # A regular file only: a FIFO put where a UKI should be would block the open.
        f = open_regular(path)
    except OSError as err:
        raise PEError(f"{path}: cannot open: {err.strerror}") from err
    fd = f.fileno()
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, MAX_HEADERS, 0)
        found: dict[str, bytes] = {}
        for name, at, length in _table(path, head, names):
            if at + length > size:
                raise PEError(f"{path}: section {name} ends past the end of the file")
            if length > limit:
                raise PEError(f"{path}: section {name} has {length} bytes (limit {limit})")
            found[name] = os.pread(fd, length, at)
        return found
    except OSError as err:
        raise PEError(f"{path}: cannot read: {err.strerror}") from err
    finally:
        f.close()


def _table(path: Path, head: bytes, names: Collection[str]) -> list[tuple[str, int, int]]:
    try:
        lfanew = DosHeader.parse(head).lfanew
        coff = CoffHeader.parse(head[lfanew:])
    except ConstructError as err:
        raise PEError(f"{path}: not a PE image ({str(err).splitlines()[0]})") from err
    if coff.sections > MAX_SECTIONS:
        raise PEError(f"{path}: {coff.sections} sections (at most {MAX_SECTIONS})")
    start = lfanew + CoffHeader.sizeof() + coff.optional_size
    table = head[start : start + coff.sections * SectionHeader.sizeof()]
    if len(table) < coff.sections * SectionHeader.sizeof():
        raise PEError(f"{path}: the section table is not within the first {MAX_HEADERS} bytes")
    result = []
    for header in Array(coff.sections, SectionHeader).parse(table):
        name = header.name.rstrip(b"\0").decode("ascii", "replace")
        if name in names:
            result.append((name, header.raw_at, min(header.virtual_size, header.raw_size)))
    return result


def parse_os_release(text: bytes) -> dict[str, str]:
    """KEY=VALUE lines of an os-release text, quotes removed (comments and junk skipped)."""
    values: dict[str, str] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values
