"""The UAPI Boot Loader Specification as systemd-boot applies it: entry file names with
boot counters, the version comparison, the order of entries and the `default` choice.

Pure functions and values, no I/O; `updater.boot.sdboot` reads the ESP and uses them to
know what systemd-boot will boot next, exactly as systemd-boot decides it.

* **Names** (`EntryName.parse`, as systemd's `boot_filename_extract_tries` and
  systemd-boot's `config_entry_parse_tries`): `STEM+LEFT-DONE.SUFFIX` or
  `STEM+LEFT.SUFFIX` (DONE is then 0) carries a boot counter; the counter is the text
  after the LAST `+` and it must end right at the last `.`; LEFT and DONE are decimal,
  at most INT_MAX. Anything else (`a+b.conf`, `x+1-.efi`, `x+1-2-3.conf`) has no counter
  and the whole name is the stem, as both parsers read it.
* **States**: no counter -> good (blessed); LEFT > 0 -> tries left; LEFT == 0 -> bad.
  `blessed` is `systemd-bless-boot good` (drop the counter), `cursed` is
  `systemd-bless-boot bad` (`+0-DONE`), `with_tries(n)` is `+n-0` (what kernel-install
  writes with /etc/kernel/tries, and the one try of an A/B update).
* **Order** (`compare`, systemd-boot's `config_entry_compare`): entries with no tries
  left last; entries with a sort key before those without; then sort key (ascending),
  machine id, version (newest first, `strverscmp_improved`), then the entry id (newest
  first); equal ids: more tries left first, then fewer tries done.
* **Choice** (`select`): the first entry of that order whose id matches the `default`
  glob of loader.conf (case-folded), else the first entry. A glob naming one entry wins
  even when that entry has no tries left: boot counting only falls back when the glob
  matches the fallback entry too (`updater.boot.sdboot` writes such a glob while a slot
  is on trial).

Invariants: `EntryName.parse(n.name) == n` for every name built here, `parse(s).name
== s` for every string (the name as found is kept), and `parse` is total (never
raises); `compare` is a total preorder; nothing here
touches a file.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

INT_MAX = 2**31 - 1  # systemd-boot and bootctl refuse larger counters
_DIGITS = "0123456789"


@dataclass(frozen=True)
class EntryName:
    """One entry file name: `stem` + optional counter + `suffix` (with its dot)."""

    stem: str
    suffix: str  # ".conf", ".efi" as written (FAT is case-insensitive)
    left: int | None = None  # None: no boot counter
    done: int = 0
    # The file name as found on disk, when `parse` read one (`foo+3.conf` is `+3-0`
    # but must be renamed from its own name); a transition makes a new name.
    written: str = field(default="", compare=False)

    @classmethod
    def parse(cls, name: str) -> EntryName:
        dot = name.rfind(".")
        if dot < 0:
            return cls(name, "", written=name)
        base, suffix = name[:dot], name[dot:]
        plus = base.rfind("+")
        if plus < 0:
            return cls(base, suffix, written=name)
        counter = base[plus + 1 :]
        left_text, dash, done_text = counter.partition("-")
        if not _is_count(left_text) or (dash and not _is_count(done_text)):
            return cls(base, suffix, written=name)
        done = int(done_text) if dash else 0
        return cls(base[:plus], suffix, int(left_text), done, written=name)

    @property
    def name(self) -> str:
        if self.written:
            return self.written
        if self.left is None:
            return f"{self.stem}{self.suffix}"
        return f"{self.stem}+{self.left}-{self.done}{self.suffix}"

    @property
    def counted(self) -> bool:
        return self.left is not None

    @property
    def good(self) -> bool:
        """Blessed: no counter, boots whenever it is chosen."""
        return self.left is None

    @property
    def bad(self) -> bool:
        """No tries left (`+0-N`): sorted last, never chosen unless named alone."""
        return self.left == 0

    def same_entry(self, other: EntryName) -> bool:
        """The same entry, whatever its counter (FAT compares names case-insensitively)."""
        return (self.stem.casefold(), self.suffix.casefold()) == (
            other.stem.casefold(),
            other.suffix.casefold(),
        )

    def blessed(self) -> EntryName:
        """`systemd-bless-boot good`: the counter is dropped."""
        return replace(self, left=None, done=0, written="")

    def cursed(self) -> EntryName:
        """`systemd-bless-boot bad`: `+0-DONE`, DONE kept (0 for an entry without one)."""
        return replace(self, left=0, done=self.done if self.counted else 0, written="")

    def with_tries(self, tries: int) -> EntryName:
        """A fresh counter: `tries` left, none done."""
        return replace(self, left=tries, done=0, written="")

    def booted_once(self) -> EntryName:
        """What systemd-boot renames a counted entry to as it boots it."""
        if self.left is None:
            return self
        left, done = max(self.left - 1, 0), min(self.done + 1, INT_MAX)
        return replace(self, left=left, done=done, written="")


def _is_count(text: str) -> bool:
    return bool(text) and all(c in _DIGITS for c in text) and int(text) <= INT_MAX


# --- versions: systemd's strverscmp_improved -------------------------------------------


def _version_char(c: str) -> bool:
    return (c.isascii() and c.isalnum()) or c in "~-^."


def _alpha(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _digit(c: str) -> bool:
    return c in _DIGITS and c != ""


def _cmp(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def strverscmp_improved(a: str | None, b: str | None) -> int:
    """systemd's version comparison (src/fundamental/string-util-fundamental.c): <0 if
    `a` is older, 0 equal, >0 newer. '~' sorts before anything, '-' and '.' separate,
    numbers compare numerically and are newer than letters; an empty or missing string
    compares as strcmp does (None first)."""
    if not a or not b:  # systemd's strcmp_ptr: NULL first, then plain strcmp
        if a is None or b is None:
            return _cmp(a is not None, b is not None)
        return _cmp(a, b)
    i = j = 0
    while True:
        while i < len(a) and not _version_char(a[i]):
            i += 1
        while j < len(b) and not _version_char(b[j]):
            j += 1
        ca, cb = a[i : i + 1], b[j : j + 1]
        if ca == "~" or cb == "~":
            r = _cmp(ca != "~", cb != "~")
            if r:
                return r
            i, j = i + 1, j + 1
            ca, cb = a[i : i + 1], b[j : j + 1]
        if not ca or not cb:
            return _cmp(a[i:], b[j:])
        for sep in "-^.":
            if ca == sep or cb == sep:
                r = _cmp(ca != sep, cb != sep)
                if r:
                    return r
                i, j = i + 1, j + 1
                ca, cb = a[i : i + 1], b[j : j + 1]
        if _digit(ca) or _digit(cb):
            r = _cmp(_digit(ca), _digit(cb))
            if r:
                return r
            while a[i : i + 1] == "0":
                i += 1
            while b[j : j + 1] == "0":
                j += 1
            ii, jj = i, j
            while _digit(a[ii : ii + 1]):
                ii += 1
            while _digit(b[jj : jj + 1]):
                jj += 1
            r = _cmp(ii != i, jj != j) or _cmp(ii - i, jj - j) or _cmp(a[i:ii], b[j:jj])
            if r:
                return r
        else:
            ii, jj = i, j
            while _alpha(a[ii : ii + 1]):
                ii += 1
            while _alpha(b[jj : jj + 1]):
                jj += 1
            n = min(ii - i, jj - j)
            r = _cmp(a[i : i + n], b[j : j + n]) or _cmp(ii - i, jj - j)
            if r:
                return r
        i, j = ii, jj


# --- the order of entries and the default choice ---------------------------------------


@dataclass(frozen=True)
class Entry:
    """What systemd-boot sorts an entry by. `id` is the entry's file name, lower-cased
    (systemd-boot 252 keeps the counter in it); `sort_key` / `version` / `machine_id`
    come from a Type #1 file's keys, or a UKI's .osrel (IMAGE_ID or ID; IMAGE_VERSION,
    VERSION, VERSION_ID or BUILD_ID)."""

    name: EntryName
    sort_key: str | None = None
    version: str | None = None
    machine_id: str | None = None

    @property
    def id(self) -> str:
        return self.name.name.lower()

    @property
    def tries_left(self) -> int | None:
        return self.name.left


def _strcmp(a: str | None, b: str | None) -> int:
    if a is None or b is None:
        return _cmp(a is not None, b is not None)
    return _cmp(a, b)


def compare(a: Entry, b: Entry) -> int:
    """systemd-boot's `config_entry_compare`: <0 if `a` comes first."""
    r = _cmp(a.tries_left == 0, b.tries_left == 0)
    if r:
        return r
    r = _cmp(a.sort_key is None, b.sort_key is None)
    if r:
        return r
    if a.sort_key is not None and b.sort_key is not None:
        r = (
            _strcmp(a.sort_key, b.sort_key)
            or _strcmp(a.machine_id, b.machine_id)
            or -strverscmp_improved(a.version, b.version)
        )
        if r:
            return r
    r = -strverscmp_improved(a.id, b.id)
    if r or a.tries_left is None or b.tries_left is None:
        return r
    return -_cmp(a.tries_left, b.tries_left) or _cmp(a.name.done, b.name.done)


def ordered(entries: Iterable[Entry]) -> list[Entry]:
    return sorted(entries, key=functools.cmp_to_key(compare))


def matches(pattern: str, entry: Entry) -> bool:
    """Whether loader.conf's `default` glob names `entry`: systemd-boot matches the
    lower-cased id (with its counter in 252, without it since), bootctl the id without
    the counter; a glob we write matches either form."""
    pattern = pattern.lower()
    plain = entry.name.blessed().name.lower()
    return fnmatch.fnmatchcase(entry.id, pattern) or fnmatch.fnmatchcase(plain, pattern)


def select(entries: Sequence[Entry], pattern: str | None) -> Entry | None:
    """The entry systemd-boot boots when nobody presses a key (no one-shot or EFI
    variable default): the first in order matching `pattern`, else the first."""
    order = ordered(entries)
    if pattern:
        for entry in order:
            if matches(pattern, entry):
                return entry
    return order[0] if order else None


def glob_of(names: Sequence[EntryName]) -> str:
    """A `default` glob matching each of `names` under any counter: their common
    lower-cased prefix, `*`, and their common suffix."""
    stems = [n.stem.lower() for n in names]
    suffixes = {n.suffix.lower() for n in names}
    prefix = stems[0]
    for stem in stems[1:]:
        while not stem.startswith(prefix):
            prefix = prefix[:-1]
    suffix = suffixes.pop() if len(suffixes) == 1 else ""
    return _glob_escape(prefix) + "*" + _glob_escape(suffix)


def exact_glob(name: EntryName) -> str:
    """A `default` glob matching exactly the blessed entry `name`."""
    return _glob_escape(name.blessed().name.lower())


def _glob_escape(text: str) -> str:
    # fnmatch has no backslash escape; brackets quote the special characters.
    return "".join(f"[{c}]" if c in "*?[]\\" else c for c in text)
