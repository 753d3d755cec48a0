"""The fuzz targets: one function per parser of untrusted or on-disk bytes.

Each target takes one input (bytes) and feeds it to the project's own reader, the way
the agent, the mirror or the signing tools receive such bytes. A target returns when the
reader accepts the input or refuses it with the error its contract names; anything else
escapes, and that is a defect (for atheris a crash, for `tests/unit/test_fuzz_replay.py`
a failure):

* an exception that is not the reader's documented error (a `KeyError`, `RecursionError`,
  a `ValueError` where the contract names an `UpdaterError` subclass, ...);
* an error message that is not one line;
* `Broken`: an accepted input whose round trip through the project's own writer does not
  give back what was read (a GPT, a grubenv, a release custom, a manifest, a journal).

Nothing here imports atheris: the targets run in plain pytest (the corpus replay) and
under `tests/fuzz/run.py` (the campaign). Inputs are handed to the readers that take a
path through a memfd (`/proc/self/fd/N`, a regular file in memory), so the campaign does
no disk I/O besides the journal's, which lives in a temporary directory.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import ConfigError, GPTError, GrubenvError, LayoutError, UpdaterError
from core.release import FieldError, ReleaseFields, parse_version, releases
from core.textparse import loads_json
from mirror.store import Manifest, MirrorRejected
from updater.boot.grub import GrubState
from updater.config import load_config, parse_config
from updater.disk.gpt import GptDisk, build_tables, read_gpt
from updater.disk.gpt_format import HEADER_SIZE, MAX_ENTRY_ARRAY
from updater.disk.grubenv import build_grubenv, parse_grubenv
from updater.disk.layout import load_layout, plan_layout
from updater.slots import SLOTS
from updater.state import (
    BACKUP_NAME,
    JOURNAL_NAME,
    Journal,
    JournalFormatError,
    load_journal,
    save_journal,
)


class Broken(Exception):
    """An accepted input broke an invariant of its reader (a round trip, a message)."""


def one_line(err: BaseException) -> None:
    """An error meant for a user is one line (the project's rule for every message)."""
    text = str(err)
    if "\n" in text or "\r" in text or not text.strip():
        raise Broken(f"{type(err).__name__} message is not one non-empty line: {text!r}")


# --- scratch files ---------------------------------------------------------------------


class _Scratch:
    """A memfd rewritten for each input, and a temporary directory for the journal."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._dir: Path | None = None

    def file(self, data: bytes, name: str = "input") -> Path:
        """A path whose regular file holds exactly `data`."""
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.memfd_create(f"fuzz-{name}", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return Path(f"/proc/self/fd/{fd}")

    def directory(self) -> Path:
        """An empty directory (emptied for each input)."""
        if self._dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._dir = Path(tempfile.mkdtemp(prefix="fuzz-journal-", dir=base))
            atexit.register(shutil.rmtree, self._dir, True)
        for child in self._dir.iterdir():
            child.unlink()
        return self._dir


_scratch = _Scratch()


class _StrictHandler(logging.Handler):
    """Formats every record (so a bad log call escapes, as a crash) and drops it."""

    def emit(self, record: logging.LogRecord) -> None:
        one_line(ValueError(record.getMessage()))


@contextlib.contextmanager
def strict_logging() -> Iterator[None]:
    """While inside, every warning a reader logs (releases, load_journal) is formatted,
    and must be one line; nothing is printed."""
    root = logging.getLogger()
    handler, level = _StrictHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- GPT ---------------------------------------------------------------------------------


def _u32(image: bytes | bytearray, at: int) -> int:
    return int.from_bytes(image[at : at + 4], "little")


def _fix_crcs(image: bytearray, ss: int, lba: int) -> None:
    """Recompute the entry-array and header CRC32s of the header at `lba`, where they
    can be, so mutations reach the checks behind the CRCs (a fuzzer rarely forges one)."""
    at = lba * ss
    if lba < 1 or at + HEADER_SIZE > len(image) or image[at : at + 8] != b"EFI PART":
        return
    header_size = min(max(_u32(image, at + 12), HEADER_SIZE), ss)
    entries_lba = int.from_bytes(image[at + 72 : at + 80], "little")
    length = _u32(image, at + 80) * _u32(image, at + 84)
    start = entries_lba * ss
    if length <= MAX_ENTRY_ARRAY and start + length <= len(image):
        crc = zlib.crc32(image[start : start + length])
        image[at + 88 : at + 92] = crc.to_bytes(4, "little")
    image[at + 16 : at + 20] = bytes(4)
    crc = zlib.crc32(image[at : at + header_size])
    image[at + 16 : at + 20] = crc.to_bytes(4, "little")


def gpt(data: bytes) -> None:
    """`read_gpt` of a disk image. Input: one flag byte, then the image. Flags: 1 fix
    the primary copy's CRCs, 2 the backup's (at the last LBA), 4 read with 4096-byte
    sectors. Only `GPTError`; an undamaged table builds back to the bytes it was read
    from, and any table read that may be written builds a disk that reads back as the
    same table."""
    if not data:
        return
    flags, image = data[0], bytearray(data[1:])
    ss = 4096 if flags & 4 else 512
    total = len(image) // ss
    if flags & 1:
        _fix_crcs(image, ss, 1)
    if flags & 2:
        _fix_crcs(image, ss, total - 1)
    try:
        disk = read_gpt(_scratch.file(bytes(image)), sector_size=ss)
    except GPTError as err:
        one_line(err)
        return
    try:
        # A table read from a disk cut short (no room for its backup) reads, but is
        # refused for writing; everything else must build back.
        disk.validate()
    except GPTError as err:
        one_line(err)
        return
    tables = build_tables(disk)
    if not disk.damaged:
        for name, (offset, built) in tables.items():
            end = offset + _kept(name, disk, len(built))
            if bytes(image[offset:end]) != built[: end - offset]:
                raise Broken(f"{name} at byte {offset} does not build back as it was read")
        return  # the same bytes read back as the same table
    rebuilt = bytearray(total * ss)
    for offset, built in tables.values():
        rebuilt[offset : offset + len(built)] = built
    again = read_gpt(_scratch.file(bytes(rebuilt), "rebuilt"), sector_size=ss)
    if _table(again) != _table(disk) or again.damaged:
        raise Broken(f"the table read does not read back the same: {again.damaged}")


def _kept(name: str, disk: GptDisk, built: int) -> int:
    """How many bytes of a built table are the ones read: all of the MBR and the primary
    header sector; the CRC-covered bytes of an entry array (the rest of its last sector
    is no table's) and of the backup header (the rest of its sector, reserved and zero
    by the UEFI specification, is written as the primary's)."""
    if "entries" in name:
        return disk.num_entries * disk.entry_size
    if name == "backup header":
        return disk.header_size
    return built


def _table(disk: GptDisk) -> GptDisk:
    return replace(disk, source="", damaged=[], mbr=b"", raw_entries=())


# --- grubenv -------------------------------------------------------------------------------


def grubenv(data: bytes) -> None:
    """`parse_grubenv` of a block, then the grub backend's reading of its variables and
    each transition written back. Only `GrubenvError`; what parses builds back (when it
    fits) to a block that parses to the same variables."""
    try:
        env = parse_grubenv(data, "fuzz")
    except GrubenvError as err:
        one_line(err)
        return
    _rebuild(env)
    state = GrubState.of(env)
    state.primary()
    for slot in SLOTS:
        state.state(slot)
        for step in (state.try_next, state.commit, state.invalidate, state.fall_back):
            _rebuild(step(slot).env)


def _rebuild(env: Mapping[str, str]) -> None:
    try:
        block = build_grubenv(env)
    except GrubenvError as err:  # does not fit the 1024 bytes: refused, nothing written
        one_line(err)
        return
    if parse_grubenv(block, "rebuilt") != dict(env):
        raise Broken("a built grubenv does not parse back to its variables")


# --- layouts and the config ----------------------------------------------------------------

_PLAN_SIZES = ((1 << 20, 512), (64 << 20, 512), (8 << 30, 4096), ((1 << 40) + 3584, 512))


def layout(data: bytes) -> None:
    """`load_layout` of a layout file, then `plan_layout` for a few disks. Only
    `LayoutError`; a plan builds its tables."""
    try:
        spec = load_layout(_scratch.file(data))
    except LayoutError as err:
        one_line(err)
        return
    for size, ss in _PLAN_SIZES:
        try:
            disk = plan_layout(spec, size, ss)
        except LayoutError as err:
            one_line(err)
            continue
        build_tables(disk)


def config(data: bytes) -> None:
    """`load_config` of a config file. Only `ConfigError`; `parse_config` of the same
    text (UTF-8) agrees with it."""
    path = _scratch.file(data)
    try:
        loaded: object = load_config(path)
    except ConfigError as err:
        one_line(err)
        loaded = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        parsed: object = parse_config(text, path)
    except ConfigError as err:
        one_line(err)
        parsed = None
    if parsed != loaded:
        raise Broken("load_config and parse_config disagree on the same text")


# --- release metadata ---------------------------------------------------------------------


def _json(data: bytes) -> Any:
    """The JSON value of `data`, or `_NOT_JSON` (not what these targets are about)."""
    try:
        return loads_json(data)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()


def release_custom(data: bytes) -> None:
    """`ReleaseFields.from_custom` of a target's `custom` (JSON). Only `FieldError` (its
    documented ValueError); accepted fields round-trip through `to_custom`."""
    custom = _json(data)
    if custom is _NOT_JSON:
        return
    try:
        fields = ReleaseFields.from_custom(custom)
    except FieldError as err:
        one_line(err)
        if not err.field:
            raise Broken(f"FieldError names no field: {err}") from err
        return
    if ReleaseFields.from_custom(fields.to_custom()) != fields:
        raise Broken("from_custom(to_custom()) is not the same release fields")
    for hardware in fields.hardware:
        fields.target_path(hardware)


_EXPIRES = "2030-01-01T00:00:00Z"


def release_targets(data: bytes) -> None:
    """`core.release.releases` over the `targets` of a targets metadata (JSON: target
    path -> TargetFile), as python-tuf parses them. `releases` never raises;
    `ReleaseFields.from_target` raises only `FieldError`."""
    from tuf.api.metadata import Targets  # type: ignore[attr-defined]

    targets = _json(data)
    if not isinstance(targets, dict):
        return
    signed = {"_type": "targets", "spec_version": "1.0.31", "version": 1}
    try:
        parsed = Targets.from_dict({**signed, "expires": _EXPIRES, "targets": targets}).targets
    except Exception:  # python-tuf's refusal (ngclient: DeserializationError), not ours
        return
    pairs = {("x86_64-efi", "stable")}
    for path, target in parsed.items():
        try:
            fields = ReleaseFields.from_target(path, target)
        except FieldError as err:
            one_line(err)
            continue
        pairs.update((hw, fields.channel) for hw in fields.hardware[:2])
    for hardware, channel in sorted(pairs)[:6]:
        for rel in releases(parsed, hardware, channel):
            parse_version(rel.version)
            if any(role != image.role for role, image in rel.images.items()):
                raise Broken(f"release {rel.version}: an image is filed under another role")


# --- the mirror manifest ------------------------------------------------------------------


def manifest(data: bytes) -> None:
    """`Manifest.from_json` of a mirror manifest. Only `MirrorRejected`; an accepted
    manifest round-trips through `to_json`."""
    try:
        found = Manifest.from_json(data, "fuzz")
    except MirrorRejected as err:
        one_line(err)
        return
    again = Manifest.from_json(json.dumps(found.to_json()), "rebuilt")
    if again != found:
        raise Broken("Manifest.from_json(to_json()) is not the same manifest")


# --- the journal ----------------------------------------------------------------------


def journal(data: bytes) -> None:
    """The agent's journal load path: `journal.json` is the input up to its first NUL
    byte (absent if that part is empty), `journal.json.bak` what follows (absent if
    there is no NUL). `load_journal` never raises; `Journal.from_json` raises only
    `JournalFormatError`; a loaded journal saved and loaded again is the same."""
    main, nul, rest = data.partition(b"\0")
    state_dir = _scratch.directory()
    if main:
        (state_dir / JOURNAL_NAME).write_bytes(main)
    if nul:
        (state_dir / BACKUP_NAME).write_bytes(rest)
    value = _json(main)
    if value is not _NOT_JSON:
        try:
            Journal.from_json(value)
        except JournalFormatError as err:
            one_line(err)
    loaded = load_journal(state_dir)
    if loaded.last_error is not None:
        one_line(ValueError(loaded.last_error))
    save_journal(state_dir, loaded)
    if load_journal(state_dir) != loaded:
        raise Broken("a loaded journal, saved, does not load back the same")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    # The project's own errors this target's reader may raise (documentation for the
    # report; each `run` catches exactly these).
    errors: tuple[type[BaseException], ...]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("gpt", gpt, (GPTError,)),
        Target("grubenv", grubenv, (GrubenvError,)),
        Target("layout", layout, (LayoutError,)),
        Target("config", config, (ConfigError,)),
        Target("release_custom", release_custom, (FieldError,)),
        Target("release_targets", release_targets, ()),
        Target("manifest", manifest, (MirrorRejected,)),
        Target("journal", journal, (JournalFormatError,)),
    )
}

__all__ = ["TARGETS", "Broken", "Target", "UpdaterError", "strict_logging"]
