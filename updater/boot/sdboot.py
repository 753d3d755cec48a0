"""The `systemd-boot` bootloader backend: UAPI boot counting on the ESP.

Each slot is one boot entry on the ESP (`[device] boot_entries`): a Type #1 file
`loader/entries/<stem>.conf`, or a Type #2 Unified Kernel Image `EFI/Linux/<stem>.efi`.
Its state is its file name (`updater.boot.bls`): no counter GOOD, `+LEFT-DONE` with
LEFT > 0 TRYING, `+0-DONE` (or no entry at all) BAD. What boots next is what
systemd-boot picks: the first entry, in its order, matching loader.conf's `default`.

| transition | the slot's entry | loader.conf `default` |
| --- | --- | --- |
| `try_next(s)` | `+1-0`: one try (systemd-boot makes it `+0-1` as it boots it) | both slots' glob |
| `commit(s)` | counter dropped (`systemd-bless-boot good`) | `s` alone (1) |
| `invalidate(s)` | `+0-DONE` (`systemd-bless-boot bad`) | if it named `s` alone: the other |
| `fall_back(s)` | `invalidate(s)`, then `try_next` and `commit` of the other slot | |

"Both slots' glob" matches both entries: the slot on trial comes first while it has a
try, and once it has none it sorts last, so the other slot boots. "The other" is the
other slot alone if it is GOOD, else the glob. (1): the glob is kept while the other
slot is on trial (a commit of the booted slot does not cancel a pending update).

A glob naming one entry wins even when that entry has no tries left (systemd-boot's
`config_entry_find`), so the glob names both slots while a slot is on trial; the trial
slot must then come first in systemd-boot's order - for UKIs of one OS that is the
newer version (`bls.compare`). When it does not, `primary()` says so and the agent
refuses to activate (`updater.decide.activate`).

`write` on the FAT ESP: a rename there is not atomic and loader.conf is replaced by
temp file + rename. A write is at most three steps (the two slots' renames and
loader.conf), each fsync'd (the file, its directory) before the next, in an order in
which every state a power cut can leave - between steps, and inside one rename (old
name, new name, or both, pointing at the same clusters) - boots the old or the new
choice (`write_plan`, `cut_safe`). The preferred order is: renames that take tries
away (to `+0-N`), then loader.conf, then renames that give tries or bless; when a
state makes it unsafe another order of the same steps is taken. Examples: activating
`s` writes the glob while `s` is still `+0-0` (the other slot still boots), then
renames `s` to `+1-0`; invalidating the booted-next `s` renames it to `+0-0` while
loader.conf still names it alone (it would still boot), then names the other slot.

Invariants: `load` reads loader.conf, lists `loader/entries/` and `EFI/Linux/` and reads
what systemd-boot sorts by (bounded: at most `MAX_ENTRIES` files per directory, 64 KiB
per .conf and per .osrel); transitions do no I/O; `write` renames only the slots'
entry files, never over an existing file, and rewrites only the `default` line of
loader.conf (every other line kept); two files for one slot's entry (a rename cut
short) are refused with a message naming them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from core.errors import ConfigError, UpdateFailed, UpdateRejected
from core.fsutil import atomic_write, fsync_dir, read_regular
from updater.boot import bls
from updater.boot.base import REGISTRY, BootContext, BootState, SlotState, fall_back_from
from updater.disk.pe import PEError, parse_os_release, read_sections
from updater.slots import SLOTS, other

LOADER_CONF = PurePosixPath("loader/loader.conf")
ENTRY_DIRS = {".conf": PurePosixPath("loader/entries"), ".efi": PurePosixPath("EFI/Linux")}
MAX_ENTRIES = 256
MAX_TEXT = 64 * 1024
EFIVARS = Path("/sys/firmware/efi/efivars")
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


class EntryError(UpdateFailed):
    """The ESP's entries cannot be read or renamed, or a slot's entry is ambiguous."""


def entry_path(relative: str) -> tuple[PurePosixPath, bls.EntryName]:
    """The directory and the (counter-less) name of a configured entry path, or
    ConfigError: it must be `loader/entries/<stem>.conf` or `EFI/Linux/<stem>.efi`."""
    path = PurePosixPath(relative)
    name = bls.EntryName.parse(path.name)
    where = ENTRY_DIRS.get(name.suffix.lower())
    if where is None or str(path.parent).lower() != str(where).lower():
        raise ConfigError(
            f"boot entry {relative!r} is neither loader/entries/<name>.conf (Type #1) "
            "nor EFI/Linux/<name>.efi (Type #2)"
        )
    if name.counted or not name.stem or name.stem.startswith(".") or "+" in name.stem:
        raise ConfigError(f"boot entry {relative!r}: give the name without a boot counter")
    return path.parent, name


# --- the state value --------------------------------------------------------------------


@dataclass(frozen=True)
class SdBootState:
    """Slot entries' names as they will be written (`names`) and as loaded; loader.conf's
    default glob likewise; what systemd-boot sorts each entry by (`sorting`: slot ->
    metadata, None when systemd-boot would skip the file) and every other entry."""

    canonical: Mapping[str, bls.EntryName]
    names: Mapping[str, bls.EntryName | None]
    default: str | None
    loaded_names: Mapping[str, bls.EntryName | None]
    loaded_default: str | None
    sorting: Mapping[str, bls.Entry | None]
    others: tuple[bls.Entry, ...] = ()
    # The slot on trial: given its try by `try_next` (or, as loaded, the counted entry
    # with tries left that systemd-boot picks). A commit of the other slot keeps it.
    trial: str | None = None

    def _name(self, slot: str) -> bls.EntryName | None:
        if slot not in self.canonical:
            raise ConfigError(f"systemd-boot: unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        return self.names[slot]

    def _present(self, slot: str) -> bls.EntryName:
        name = self._name(slot)
        if name is None:
            where = self.canonical[slot].name
            raise UpdateRejected(f"systemd-boot: slot {slot} has no boot entry ({where})")
        return name

    def _with(self, slot: str, name: bls.EntryName | None, default: str | None) -> SdBootState:
        names = dict(self.names)
        names[slot] = name
        return dataclasses.replace(self, names=MappingProxyType(names), default=default)

    def entries(self) -> list[tuple[str | None, bls.Entry]]:
        """Every entry systemd-boot will list, with its slot (None: not a slot's)."""
        found: list[tuple[str | None, bls.Entry]] = [(None, e) for e in self.others]
        for slot in SLOTS:
            name, meta = self.names[slot], self.sorting[slot]
            if name is not None and meta is not None:
                found.append((slot, dataclasses.replace(meta, name=name)))
        return found

    def state(self, slot: str) -> SlotState:
        name = self._name(slot)
        if name is None or name.bad:
            return SlotState.BAD
        return SlotState.GOOD if name.good else SlotState.TRYING

    def primary(self) -> str | None:
        entries = self.entries()
        chosen = bls.select([e for _, e in entries], self.default)
        return next((slot for slot, e in entries if e is chosen), None)

    def invalidate(self, slot: str) -> SdBootState:
        name = self._name(slot)
        default = self.default
        if (default or "").lower() == bls.exact_glob(self.canonical[slot]):
            fallback = other(slot)
            good = self.state(fallback) is SlotState.GOOD
            default = bls.exact_glob(self.canonical[fallback]) if good else self._glob()
        return self._with(slot, None if name is None else name.cursed(), default)

    def try_next(self, slot: str) -> SdBootState:
        tried = self._with(slot, self._present(slot).with_tries(1), self._glob())
        return dataclasses.replace(tried, trial=slot)

    def commit(self, slot: str) -> SdBootState:
        blessed = self._with(slot, self._present(slot).blessed(), self.default)
        if self.trial == other(slot):
            return blessed  # the other slot's try is still to come: keep the glob
        return dataclasses.replace(
            blessed, default=bls.exact_glob(self.canonical[slot]), trial=None
        )

    def fall_back(self, slot: str) -> SdBootState:
        return fall_back_from(self, slot)

    def _glob(self) -> str:
        return bls.glob_of([self.canonical[s] for s in SLOTS])


# --- reading the ESP ----------------------------------------------------------------------


def _listing(esp: Path, directory: PurePosixPath) -> list[str]:
    path = esp / directory
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise EntryError(f"systemd-boot: cannot list {path}: {err.strerror}") from err
    if len(names) > MAX_ENTRIES:
        raise EntryError(f"systemd-boot: {path} holds {len(names)} files (at most {MAX_ENTRIES})")
    return names


def _text(path: Path) -> bytes | None:
    try:
        return read_regular(path, MAX_TEXT)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise EntryError(f"systemd-boot: cannot read {path}: {err.strerror}") from err


def conf_keys(text: bytes) -> dict[str, str]:
    """`key value` lines of a loader.conf or Type #1 entry (the last of a key wins;
    `options`/`initrd` repeat in real files, but they do not decide anything here)."""
    keys: dict[str, str] = {}
    for raw in text.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.replace("\t", " ").partition(" ")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        keys[key] = value
    return keys


def _type1(esp: Path, path: Path, name: bls.EntryName) -> bls.Entry | None:
    """What systemd-boot sorts a Type #1 entry by; None if it would skip the file."""
    text = _text(path)
    keys = conf_keys(text or b"")
    loader = keys.get("linux") or keys.get("efi")
    if not loader or keys.get("architecture", "x64").lower() != "x64":
        return None
    if not (esp / loader.lstrip("/\\").replace("\\", "/")).is_file():
        return None  # systemd-boot checks that the kernel or EFI binary is there
    return bls.Entry(name, keys.get("sort-key"), keys.get("version"), keys.get("machine-id"))


def _type2(path: Path, name: bls.EntryName) -> bls.Entry | None:
    """What systemd-boot sorts a UKI by (its .osrel); None if it would skip the file."""
    try:
        osrel = read_sections(path, [".osrel"], MAX_TEXT).get(".osrel")
    except PEError:
        return None
    if osrel is None:
        return None
    values = parse_os_release(osrel)
    if not any(values.get(k) for k in ("PRETTY_NAME", "IMAGE_ID", "NAME", "ID")):
        return None
    version = next(
        (
            values[k]
            for k in ("IMAGE_VERSION", "VERSION", "VERSION_ID", "BUILD_ID")
            if values.get(k)
        ),
        None,
    )
    return bls.Entry(name, values.get("IMAGE_ID") or values.get("ID") or None, version)


def _sorting(esp: Path, directory: PurePosixPath, name: bls.EntryName) -> bls.Entry | None:
    path = esp / directory / name.name
    if name.suffix.lower() == ".conf":
        return _type1(esp, path, name)
    return _type2(path, name)


def find_entry(
    esp: Path, directory: PurePosixPath, canonical: bls.EntryName
) -> bls.EntryName | None:
    """The name the entry `canonical` has on the ESP now (any counter), None if absent;
    EntryError if two files are that entry."""
    found = [
        parsed
        for parsed in (bls.EntryName.parse(n) for n in _listing(esp, directory))
        if parsed.same_entry(canonical)
    ]
    if len(found) > 1:
        files = ", ".join(sorted(n.name for n in found))
        raise EntryError(
            f"systemd-boot: {esp / directory} holds {len(found)} files for one boot entry "
            f"({files}): a rename was cut short; check the ESP with fsck.vfat and remove one"
        )
    return found[0] if found else None


def current_entry_file(esp: Path, relative: str) -> Path:
    """Where the entry file `relative` (configured without counter) is now - or, if it
    does not exist yet, where a new one is created: under `+0-0`, so that a file being
    written never boots before it is verified and activated."""
    directory, canonical = entry_path(relative)
    name = find_entry(esp, directory, canonical) or canonical.cursed()
    return esp / directory / name.name


def read_default(esp: Path) -> tuple[list[str], str | None]:
    """loader.conf's lines and its `default` (None if it has none)."""
    text = _text(esp / LOADER_CONF)
    lines = (text or b"").decode("utf-8", "replace").splitlines()
    default = conf_keys(text or b"").get("default")
    return lines, default or None


def with_default(lines: list[str], default: str | None) -> str:
    """loader.conf text with its `default` line set (the first kept in place, others
    dropped; every other line as it was)."""
    out: list[str] = []
    placed = False
    for line in lines:
        key = line.strip().replace("\t", " ").partition(" ")[0]
        if key == "default" and not line.strip().startswith("#"):
            if not placed and default is not None:
                out.append(f"default {default}")
            placed = True
            continue
        out.append(line)
    if not placed and default is not None:
        out.append(f"default {default}")
    return "".join(f"{line}\n" for line in out)


# --- writing: the order of the steps ---------------------------------------------------------


@dataclass(frozen=True)
class Rename:
    slot: str
    old: bls.EntryName
    new: bls.EntryName


@dataclass(frozen=True)
class SetDefault:
    default: str | None


Step = Rename | SetDefault


def write_plan(state: SdBootState) -> tuple[Step, ...]:
    """The steps that take the ESP from what `state` loaded to `state` (none if it is
    unchanged), in the crash-safe order of the module docstring: renames that take
    tries away, then loader.conf, then the other renames."""
    renames = [
        Rename(slot, old, new)
        for slot in SLOTS
        if (old := state.loaded_names[slot]) is not None
        and (new := state.names[slot]) is not None
        and old != new
    ]
    demoted = [r for r in renames if r.new.bad and not r.old.bad]
    default: list[Step] = []
    if state.default != state.loaded_default:
        default.append(SetDefault(state.default))
    preferred = (*demoted, *default, *(r for r in renames if r not in demoted))
    # At most three steps: take the first order (the preferred one first) in which
    # every state a cut can leave boots the old or the new choice.
    for order in (preferred, *itertools.permutations(preferred)):
        if cut_safe(state, order):
            return order
    return preferred


def cut_safe(state: SdBootState, steps: tuple[Step, ...]) -> bool:
    old = after(state, ()).primary()
    new = after(state, steps).primary()
    for done in range(len(steps) + 1):
        cut = after(state, steps[:done])
        if cut.primary() not in (old, new):
            return False
        step = steps[done] if done < len(steps) else None
        meta = state.sorting[step.slot] if isinstance(step, Rename) else None
        if isinstance(step, Rename) and meta is not None:
            both = after(state, steps[: done + 1])
            entries = [*both.entries(), (step.slot, dataclasses.replace(meta, name=step.old))]
            chosen = bls.select([e for _, e in entries], cut.default)
            if next((s for s, e in entries if e is chosen), None) not in (old, new):
                return False
    return True


def after(state: SdBootState, steps: tuple[Step, ...]) -> SdBootState:
    """What the ESP holds once `steps` (a prefix of a plan) are done: a loaded value."""
    names = dict(state.loaded_names)
    default = state.loaded_default
    for step in steps:
        if isinstance(step, Rename):
            names[step.slot] = step.new
        else:
            default = step.default
    frozen = MappingProxyType(names)
    return dataclasses.replace(
        state, names=frozen, loaded_names=frozen, default=default, loaded_default=default
    )


# --- the backend ----------------------------------------------------------------------------


class SdBootBootloader:
    """Loads and writes the slots' boot entries and loader.conf on a mounted ESP."""

    name = "systemd-boot"

    def __init__(self, ctx: BootContext) -> None:
        if ctx.esp is None:
            raise ConfigError("bootloader systemd-boot: no esp (mount point) configured")
        missing = [s for s in SLOTS if not ctx.slot_entries.get(s)]
        if missing:
            raise ConfigError(f"systemd-boot: no boot entry for slot(s) {', '.join(missing)}")
        self.esp = ctx.esp
        self.where = {s: entry_path(ctx.slot_entries[s]) for s in SLOTS}
        first, second = (self.where[s][1] for s in SLOTS)
        if first.same_entry(second):
            raise ConfigError(f"systemd-boot: both slots name the boot entry {first.name}")

    def load(self) -> SdBootState:
        names: dict[str, bls.EntryName | None] = {}
        sorting: dict[str, bls.Entry | None] = {}
        for slot, (directory, canonical) in self.where.items():
            name = names[slot] = find_entry(self.esp, directory, canonical)
            sorting[slot] = None if name is None else _sorting(self.esp, directory, name)
        others = []
        for directory in ENTRY_DIRS.values():
            for file in _listing(self.esp, directory):
                parsed = bls.EntryName.parse(file)
                ours = any(parsed.same_entry(c) for _, c in self.where.values())
                if ours or file.startswith(".") or parsed.suffix.lower() not in ENTRY_DIRS:
                    continue
                if parsed.suffix.lower() == ".conf" and file.lower().startswith("auto-"):
                    continue  # systemd-boot skips these names
                meta = _sorting(self.esp, directory, parsed)
                if meta is not None:
                    others.append(meta)
        _, default = read_default(self.esp)
        frozen = MappingProxyType(names)
        state = SdBootState(
            canonical=MappingProxyType({s: c for s, (_, c) in self.where.items()}),
            names=frozen,
            default=default,
            loaded_names=frozen,
            loaded_default=default,
            sorting=MappingProxyType(sorting),
            others=tuple(others),
        )
        chosen = state.primary()
        name = None if chosen is None else names[chosen]
        if chosen is not None and name is not None and name.counted and not name.bad:
            state = dataclasses.replace(state, trial=chosen)
        return state

    def write(self, state: BootState) -> SdBootState:
        if not isinstance(state, SdBootState):
            raise TypeError(f"systemd-boot: cannot write a {type(state).__name__}")
        for step in write_plan(state):
            if isinstance(step, Rename):
                self._rename(step.slot, step.old, step.new)
            else:
                self._write_default(step.default)
        return dataclasses.replace(state, loaded_names=state.names, loaded_default=state.default)

    def _rename(self, slot: str, old: bls.EntryName, new: bls.EntryName) -> None:
        directory = self.esp / self.where[slot][0]
        source, target = directory / old.name, directory / new.name
        try:
            # Never over another file (systemd-bless-boot renames with RENAME_NOREPLACE);
            # the lock keeps other agents out between the check and the rename.
            if target.exists() and not _same_file(source, target):
                raise EntryError(f"systemd-boot: {target} exists; not renaming {source} over it")
            os.rename(source, target)
            fsync_dir(directory)
        except OSError as err:
            raise EntryError(
                f"systemd-boot: cannot rename {source} to {target.name}: {err.strerror}"
            ) from err

    def _write_default(self, default: str | None) -> None:
        lines, _ = read_default(self.esp)
        path = self.esp / LOADER_CONF
        try:
            atomic_write(path, with_default(lines, default).encode())
        except OSError as err:
            raise EntryError(f"systemd-boot: cannot write {path}: {err.strerror}") from err


def _same_file(a: Path, b: Path) -> bool:
    # On FAT a case-only rename (`AB-b.efi` -> `ab-B.efi`) names the same file.
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --- which entry systemd-boot booted --------------------------------------------------------


def loader_entry_selected(efivars: Path = EFIVARS) -> str | None:
    """The `LoaderEntrySelected` EFI variable (the id of the entry systemd-boot booted),
    None when efivarfs is not mounted or systemd-boot did not set it. The file is 4
    bytes of attributes, then UTF-16LE text ending in NUL."""
    try:
        raw = read_regular(efivars / f"LoaderEntrySelected-{LOADER_GUID}", 4096)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UpdateFailed(f"cannot read LoaderEntrySelected in {efivars}: {err.strerror}") from err
    text = raw[4:].decode("utf-16-le", "replace")
    return text.split("\0", 1)[0] or None


def slot_of_entry(entry_id: str, slot_entries: Mapping[str, str]) -> str | None:
    """The slot whose boot entry is `entry_id` (as LoaderEntrySelected names it: the
    file name, any case and counter, perhaps after a path), None if it is no slot's."""
    name = bls.EntryName.parse(entry_id.replace("\\", "/").rsplit("/", 1)[-1])
    for slot, relative in sorted(slot_entries.items()):
        try:
            if entry_path(relative)[1].same_entry(name):
                return slot
        except ConfigError:
            continue
    return None


REGISTRY["systemd-boot"] = SdBootBootloader
