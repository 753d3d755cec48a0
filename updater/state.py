"""The agent's persistent journal: what is installed where, what waits for a commit.

`state_dir/journal.json` holds one `Journal`: the version in each slot, the pending
update (installed and activated, not yet committed), the versions that failed on this
node (never retried), and the time and outcome of the last check.

Invariants:

* a `Journal` is immutable; the `with_*` / `committed` transitions are pure (no I/O,
  the time is passed in), so the agent's decisions are testable as data;
* `pending`, when set, names a slot whose recorded version is the pending version;
* `save_journal` is atomic (`fsutil.atomic_write`: temp file, fsync, `os.replace`,
  fsync of the directory) - a crash leaves the old journal or the new one, never half;
  a journal.json that is a symlink stays one, and the file it names is replaced; the
  journal is 0600;
* before it is replaced, the last journal that parsed is kept as `journal.json.bak`
  (a hard link, so there is never a moment without a journal.json);
* a damaged journal never bricks the agent: `load_journal` falls back to the backup,
  then to an empty journal, logs why, and records it in `last_error`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from core.errors import UpdateFailed
from core.fsutil import atomic_write, write_target
from core.textparse import loads_json
from updater.slots import SLOTS

log = logging.getLogger(__name__)

SCHEMA = 1
JOURNAL_NAME = "journal.json"
BACKUP_NAME = "journal.json.bak"
MAX_JOURNAL_BYTES = 1024 * 1024  # a journal is a few hundred bytes; bound the read
MAX_FAILED_VERSIONS = 64  # oldest failures are forgotten first


class JournalFormatError(ValueError):
    """A journal file does not parse; internal to loading (it falls back, never raises)."""


def _now(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SlotRecord:
    version: str
    installed_at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class Pending:
    slot: str
    version: str
    since: str  # ISO 8601, UTC: when the slot was made primary


@dataclass(frozen=True)
class Failure:
    reason: str
    at: str  # ISO 8601, UTC


@dataclass(frozen=True)
class InstallRecord:
    """The last install that wrote a slot: what, where, when, and what it cost."""

    version: str
    slot: str
    at: str  # ISO 8601, UTC
    bytes_fetched: int  # bytes downloaded for it (compressed, as served)
    seconds: float
    # Raw bytes a delta install reused, per slot they were read from (docs/delta.md);
    # empty for a full install and in records written before delta updates.
    bytes_reused: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitRecord:
    """The last slot committed by a health check."""

    version: str | None
    slot: str
    at: str  # ISO 8601, UTC


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Journal:
    slots: Mapping[str, SlotRecord] = field(default_factory=lambda: _frozen({}))
    pending: Pending | None = None
    failed_versions: Mapping[str, Failure] = field(default_factory=lambda: _frozen({}))
    last_check: str | None = None
    last_error: str | None = None
    # Fleet facts (docs/fleet.md), all optional in the file: a journal written before
    # they existed loads with None.
    last_install: InstallRecord | None = None
    last_commit: CommitRecord | None = None
    lock_held: str | None = None  # the group whose reboot lock this node holds
    waiting: str | None = None  # why the last cycle did not reboot into a new slot

    # --- pure transitions -----------------------------------------------------------

    def with_installed(self, slot: str, version: str, now: datetime | None = None) -> Journal:
        """`version` was written and verified in `slot` (not yet activated)."""
        _check_slot(slot)
        slots = dict(self.slots)
        slots[slot] = SlotRecord(version=version, installed_at=_now(now))
        # The pending image, if it was in this slot, has just been overwritten.
        pending = None if self.pending and self.pending.slot == slot else self.pending
        return replace(self, slots=_frozen(slots), pending=pending)

    def with_invalidated(self, slot: str) -> Journal:
        """`slot` is about to be overwritten: it holds nothing verified until
        `with_installed` (so a crash mid-write never leaves a record to activate)."""
        _check_slot(slot)
        slots = {k: v for k, v in self.slots.items() if k != slot}
        pending = None if self.pending and self.pending.slot == slot else self.pending
        return replace(self, slots=_frozen(slots), pending=pending)

    def with_pending(self, slot: str, version: str, now: datetime | None = None) -> Journal:
        """`slot`, holding `version`, is the bootloader's primary with one try."""
        _check_slot(slot)
        record = self.slots.get(slot)
        if record is None or record.version != version:
            held = record.version if record else "nothing"
            raise ValueError(f"slot {slot} holds {held}, not {version}; install it first")
        return replace(self, pending=Pending(slot=slot, version=version, since=_now(now)))

    def committed(self) -> Journal:
        """The pending slot passed its health checks and was marked good."""
        return replace(self, pending=None)

    def with_good(self, version: str | None) -> Journal:
        """`version` runs and passed its health checks: committed, and no longer failed
        (an explicit `install --version` retry of a failed version that now works)."""
        failed = {k: v for k, v in self.failed_versions.items() if k != version}
        return replace(self, pending=None, failed_versions=_frozen(failed))

    def with_failed(self, version: str, reason: str, now: datetime | None = None) -> Journal:
        """`version` failed on this node (health checks, boot): never install it again."""
        failed = {k: v for k, v in self.failed_versions.items() if k != version}
        failed[version] = Failure(reason=" ".join(reason.split()), at=_now(now))
        while len(failed) > MAX_FAILED_VERSIONS:
            del failed[min(failed, key=lambda k: failed[k].at)]
        pending = None if self.pending and self.pending.version == version else self.pending
        return replace(self, failed_versions=_frozen(failed), pending=pending)

    def with_check(self, error: str | None = None, now: datetime | None = None) -> Journal:
        """An update check ran; `error` is its one-line failure, None on success."""
        return replace(self, last_check=_now(now), last_error=error)

    def with_install_record(
        self,
        slot: str,
        version: str,
        bytes_fetched: int,
        seconds: float,
        now: datetime | None = None,
        *,
        reused: Mapping[str, int] | None = None,
    ) -> Journal:
        """An install wrote `version` into `slot`, fetching `bytes_fetched` bytes and
        reusing `reused[s]` raw bytes read from slot `s`."""
        _check_slot(slot)
        by_slot = dict(sorted((reused or {}).items()))
        for source in by_slot:
            _check_slot(source)
        record = InstallRecord(version, slot, _now(now), bytes_fetched, round(seconds, 3), by_slot)
        return replace(self, last_install=record)

    def with_commit_record(
        self, slot: str, version: str | None, now: datetime | None = None
    ) -> Journal:
        _check_slot(slot)
        return replace(self, last_commit=CommitRecord(version, slot, _now(now)))

    def with_lock(self, group: str | None) -> Journal:
        """This node now holds the reboot lock of `group` (None: holds none)."""
        return replace(self, lock_held=group)

    def with_waiting(self, reason: str | None) -> Journal:
        """Why the last cycle did not reboot into a new slot (None: it was not waiting)."""
        return replace(self, waiting=None if reason is None else " ".join(reason.split()))

    def is_failed(self, version: str) -> bool:
        return version in self.failed_versions

    def version_in(self, slot: str) -> str | None:
        record = self.slots.get(slot)
        return record.version if record else None

    # --- serialisation --------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "slots": {
                s: {"version": r.version, "installed_at": r.installed_at}
                for s, r in sorted(self.slots.items())
            },
            "pending": None
            if self.pending is None
            else {
                "slot": self.pending.slot,
                "version": self.pending.version,
                "since": self.pending.since,
            },
            "failed_versions": {
                v: {"reason": f.reason, "at": f.at} for v, f in sorted(self.failed_versions.items())
            },
            "last_check": self.last_check,
            "last_error": self.last_error,
            "last_install": None
            if self.last_install is None
            else {
                "version": self.last_install.version,
                "slot": self.last_install.slot,
                "at": self.last_install.at,
                "bytes_fetched": self.last_install.bytes_fetched,
                "bytes_reused": dict(self.last_install.bytes_reused),
                "seconds": self.last_install.seconds,
            },
            "last_commit": None
            if self.last_commit is None
            else {
                "version": self.last_commit.version,
                "slot": self.last_commit.slot,
                "at": self.last_commit.at,
            },
            "lock_held": self.lock_held,
            "waiting": self.waiting,
        }

    @classmethod
    def from_json(cls, data: Any) -> Journal:
        """Parse a decoded journal; any deviation from the schema is a JournalFormatError."""
        if not isinstance(data, dict):
            raise JournalFormatError("not a JSON object")
        if data.get("schema") != SCHEMA:
            raise JournalFormatError(f"schema {data.get('schema')!r}, expected {SCHEMA}")
        try:
            slots = {
                _slot(s): SlotRecord(_str(_dict(r)["version"]), _str(r["installed_at"]))
                for s, r in _dict(data["slots"]).items()
            }
            raw_pending = data["pending"]
            pending = None
            if raw_pending is not None:
                p = _dict(raw_pending)
                pending = Pending(_slot(p["slot"]), _str(p["version"]), _str(p["since"]))
            failed = {
                _str(v): Failure(reason=_str(_dict(f)["reason"]), at=_str(f["at"]))
                for v, f in _dict(data["failed_versions"]).items()
            }
            journal = cls(
                slots=_frozen(slots),
                pending=pending,
                failed_versions=_frozen(failed),
                last_check=_opt_str(data["last_check"]),
                last_error=_opt_str(data["last_error"]),
                last_install=_install_record(data.get("last_install")),
                last_commit=_commit_record(data.get("last_commit")),
                lock_held=_opt_str(data.get("lock_held")),
                waiting=_opt_str(data.get("waiting")),
            )
        except (KeyError, TypeError) as err:
            raise JournalFormatError(f"missing or wrong field {err}") from err
        if pending and journal.version_in(pending.slot) != pending.version:
            raise JournalFormatError(f"pending {pending.version} is not in slot {pending.slot}")
        return journal


def _check_slot(slot: str) -> None:
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _int(value: Any) -> int:
    # bool is an int in Python; a count is never true/false.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r:.40}")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e12:
        raise TypeError(f"expected seconds, got {value!r:.40}")
    return float(value)


def _install_record(value: Any) -> InstallRecord | None:
    if value is None:
        return None
    r = _dict(value)
    return InstallRecord(
        _str(r["version"]),
        _slot(r["slot"]),
        _str(r["at"]),
        _int(r["bytes_fetched"]),
        _seconds(r["seconds"]),
        # Absent in records written before delta updates: nothing was reused.
        {_slot(k): _int(v) for k, v in sorted(_dict(r.get("bytes_reused", {})).items())},
    )


def _commit_record(value: Any) -> CommitRecord | None:
    if value is None:
        return None
    r = _dict(value)
    return CommitRecord(_opt_str(r["version"]), _slot(r["slot"]), _str(r["at"]))


def _slot(value: Any) -> str:
    if value not in SLOTS:
        raise TypeError(f"unknown slot {value!r}")
    return str(value)


# --- I/O ---------------------------------------------------------------------------------


def _read(path: Path) -> Journal:
    """Parse one journal file; OSError if unreadable, JournalFormatError if damaged."""
    with path.open("rb") as f:
        raw = f.read(MAX_JOURNAL_BYTES + 1)
    if len(raw) > MAX_JOURNAL_BYTES:
        raise JournalFormatError(f"larger than {MAX_JOURNAL_BYTES} bytes")
    try:
        # textparse: nesting past the recursion limit, 5000-digit numbers and NaN are
        # ValueErrors too, so they are a damaged journal like any other, not a crash.
        data = loads_json(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError is one
        raise JournalFormatError(f"not JSON: {err}") from err
    return Journal.from_json(data)


def load_journal(state_dir: Path) -> Journal:
    """The journal in `state_dir`: an empty one if there is none, never an exception for
    a damaged file (falls back to journal.json.bak, then to empty; logs and records why).
    """
    path, backup = state_dir / JOURNAL_NAME, state_dir / BACKUP_NAME
    try:
        return _read(path)
    except FileNotFoundError:
        if not backup.exists():
            return Journal()
        problem = f"journal {path} is missing"
    except (OSError, JournalFormatError) as err:
        problem = f"journal {path} is damaged ({err})"
    try:
        journal = _read(backup)
        message = f"{problem}; using the previous one, {backup}"
    except (OSError, JournalFormatError) as err:
        journal = Journal()
        message = f"{problem}; backup {backup} unusable ({err}); starting an empty journal"
    log.warning("%s", message)
    return replace(journal, last_error=message)


def save_journal(state_dir: Path, journal: Journal) -> None:
    """Write `journal` atomically to state_dir/journal.json, keeping the previous good one."""
    path, backup = state_dir / JOURNAL_NAME, state_dir / BACKUP_NAME
    data = (json.dumps(journal.to_json(), indent=2, sort_keys=True) + "\n").encode()
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise UpdateFailed(f"cannot write journal in {state_dir}: {err.strerror or err}") from err
    try:
        # The backup first: if the write then fails, journal.json and its backup are
        # both the previous journal, which is what a later load wants.
        _keep_backup(path, backup)
        atomic_write(path, data, mode=0o600)
    except OSError as err:
        raise UpdateFailed(f"cannot write journal {path}: {err.strerror or err}") from err


def _keep_backup(path: Path, backup: Path) -> None:
    """Hard-link the current journal to journal.json.bak, if it is a good one."""
    try:
        _read(path)
        # The file journal.json names: link(2) would link a symlink itself, whose
        # target is about to be replaced.
        current = write_target(path)
    except (OSError, JournalFormatError):
        return  # nothing, or nothing good, to keep: the existing backup stays
    link = backup.with_name(f".{backup.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    try:
        os.link(current, link)
    except OSError:
        # A file system without hard links (vfat), or a journal.json linking to another
        # file system: a copy, with the same care as a save.
        atomic_write(backup, path.read_bytes(), mode=0o600)
        return
    os.replace(link, backup)
