"""The on-disk GPT structures, declared once as construct Structs.

Protective MBR, GPT header (92 bytes, revision 1.0) and the 128-byte partition entry,
with adapters for the mixed-endian GUID encoding and the 36-unit UTF-16LE name.
Invariants: the adapters are exact inverses (parse -> build is byte-exact, lone
surrogates in names survive); the magic values are `Const`s, so a structure that is
not one fails to parse. CRCs are not here: `updater.disk.gpt` computes them over the
built bytes.
"""

from __future__ import annotations

import uuid

from construct import Adapter, Bytes, Const, Int8ul, Int32ul, Int64ul, Struct

from core.errors import GPTError

SIGNATURE = b"EFI PART"
REVISION_1_0 = 0x00010000
HEADER_SIZE = 92
ENTRY_SIZE = 128
DEFAULT_ENTRIES = 128
MAX_ENTRY_ARRAY = 1024 * 1024  # bound on what we read from an untrusted disk
NAME_BYTES = 72  # 36 UTF-16LE code units


class GuidAdapter(Adapter):  # type: ignore[misc]
    """16 mixed-endian bytes <-> uuid.UUID (the on-disk GUID encoding)."""

    def _decode(self, obj: bytes, context: object, path: str) -> uuid.UUID:
        return uuid.UUID(bytes_le=obj)

    def _encode(self, obj: uuid.UUID, context: object, path: str) -> bytes:
        return obj.bytes_le


class NameAdapter(Adapter):  # type: ignore[misc]
    """72 bytes of NUL-padded UTF-16LE <-> str (lone surrogates survive a round trip)."""

    def _decode(self, obj: bytes, context: object, path: str) -> str:
        units = [obj[i : i + 2] for i in range(0, len(obj), 2)]
        end = units.index(b"\0\0") if b"\0\0" in units else len(units)
        return b"".join(units[:end]).decode("utf-16-le", "surrogatepass")

    def _encode(self, obj: str, context: object, path: str) -> bytes:
        raw = obj.encode("utf-16-le", "surrogatepass")
        if len(raw) > NAME_BYTES:
            raise GPTError(f"partition name {obj!r} is longer than 36 UTF-16 code units")
        return raw.ljust(NAME_BYTES, b"\0")


Guid = GuidAdapter(Bytes(16))

MbrRecord = Struct(
    "status" / Int8ul,
    "chs_first" / Bytes(3),
    "os_type" / Int8ul,
    "chs_last" / Bytes(3),
    "first_lba" / Int32ul,
    "sectors" / Int32ul,
)

ProtectiveMbr = Struct(
    "boot_code" / Bytes(440),
    "disk_signature" / Int32ul,
    "reserved" / Bytes(2),
    "records" / MbrRecord[4],
    "signature" / Const(b"\x55\xaa"),
)

GptHeader = Struct(
    "signature" / Const(SIGNATURE),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Guid,
    "entries_lba" / Int64ul,
    "num_entries" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc32" / Int32ul,
)

GptEntry = Struct(
    "type_guid" / Guid,
    "unique_guid" / Guid,
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,
    "attributes" / Int64ul,
    "name" / NameAdapter(Bytes(NAME_BYTES)),
)
