"""Release metadata schema and the selection policy: which release a node installs.

A release is the set of TUF targets that share one `custom.release.version`; each
target is the image of one slot role (`root`, `boot`, ...). The schema of the custom
field (DESIGN.md, "Trust"):

    {"release": {"version": "1.2.0", "hardware": ["x86_64-generic"], "channel": "stable",
                 "role": "root", "compression": "zstd", "raw_length": 123,
                 "raw_sha256": "<64 hex>"}}

Invariants:

* Pure: no I/O, no clock. Inputs are the *verified* targets of the trusted TUF targets
  metadata (`core.repository.Repository.targets()`); outputs are plain data.
* Malformed custom data never crashes selection: such a target is skipped (and logged),
  and a version whose targets disagree (two images for one role) is skipped whole,
  because the node cannot tell which image was meant.
* Versions are compared as versions (`parse_version`), never as strings. Without an
  explicit `want_version`, only upgrades are offered and versions that failed on this
  node are skipped; an explicit `want_version` may retry a failed version, and may go
  down or re-install only with `force`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import total_ordering
from typing import Any

# python-tuf documents tuf.api.metadata as the public home of TargetFile but does not
# re-export it explicitly; mypy still resolves the real class (checked), hence the ignore.
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from core.errors import UpdateRejected

logger = logging.getLogger(__name__)

COMPRESSIONS = frozenset({"zstd", "xz", "gzip", "none"})

# MAJOR.MINOR.PATCH, no leading zeros, optional dot-separated pre-release identifiers.
# Build metadata (`+...`) is refused: it would make two different strings equal versions.
_VERSION_RE = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# A role names a partition of a slot (`root`, `boot`, ...) and is part of file names.
ROLE_RULE = "a lowercase letter, then up to 31 of a-z, 0-9, '_' and '-'"
_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_MAX_VERSION_LEN = 128
_MAX_PATH_LEN = 1024


class ReleaseRejected(UpdateRejected):
    """No acceptable release: unknown version, downgrade, wrong roles."""


class VersionError(ReleaseRejected, ValueError):
    """A version string is not `MAJOR.MINOR.PATCH[-PRERELEASE]` (also a ValueError)."""


@total_ordering
@dataclass(frozen=True, eq=False)
class Version:
    """A parsed semver-like version; ordering follows semver precedence."""

    text: str
    major: int
    minor: int
    patch: int
    pre: tuple[str | int, ...] = ()

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after all its pre-releases; numeric identifiers sort before
        # alphanumeric ones; a longer pre-release wins on an equal prefix (semver 11).
        pre = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> Version:
    """Parse `1.2.0` or `1.2.0-rc.1`; raise `VersionError` (a ValueError) otherwise."""
    if not isinstance(text, str) or len(text) > _MAX_VERSION_LEN:
        raise VersionError(f"invalid version {text!r}: not a string of at most 128 chars")
    m = _VERSION_RE.fullmatch(text)
    if m is None:
        raise VersionError(f"invalid version {text!r}: expected MAJOR.MINOR.PATCH[-PRE]")
    pre: tuple[str | int, ...] = ()
    if m.group(4):
        pre = tuple(int(p) if p.isdigit() else p for p in m.group(4).split("."))
    return Version(text, int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)


def check_role(role: object) -> str:
    """`role` if it is a valid role name; ValueError naming the rule otherwise."""
    if not isinstance(role, str) or not _ROLE_RE.fullmatch(role):
        raise ValueError(f"role {role!r} is not a valid role name ({ROLE_RULE})")
    return role


def check_target_path(path: object) -> str:
    """`path` if it is safe to use below a directory; ValueError naming the rule otherwise.

    A signed target path is still untrusted input: the agent, the mirror and the
    signing tools join it to directories. It must be relative, its `/`-separated
    components must be non-empty and not `.` or `..`, and it must hold no control
    characters (which includes NUL) and no backslash.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"target path {path!r} is not a non-empty string")
    if len(path) > _MAX_PATH_LEN:
        raise ValueError(f"target path {path[:40]!r}... is longer than {_MAX_PATH_LEN} characters")
    if path.startswith("/"):
        raise ValueError(f"target path {path!r} is absolute")
    bad = next((c for c in path if ord(c) < 0x20 or ord(c) == 0x7F or c == "\\"), None)
    if bad is not None:
        raise ValueError(f"target path {path!r} contains the character {bad!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"target path {path!r} has an empty, '.' or '..' component")
    return path


@dataclass(frozen=True)
class Image:
    """One target of a release: the image for one slot role."""

    role: str
    path: str
    target: TargetFile
    compression: str
    raw_length: int
    raw_sha256: str


@dataclass(frozen=True)
class Release:
    """All images of one version for this node's hardware and channel (role -> Image)."""

    version: str
    channel: str
    images: Mapping[str, Image]

    @property
    def parsed_version(self) -> Version:
        return parse_version(self.version)


@dataclass(frozen=True)
class _Entry:
    version: Version
    hardware: tuple[str, ...]
    channel: str
    image: Image


def _parse_custom(path: str, target: TargetFile) -> _Entry:
    """Validate one target's `custom.release`; raise ValueError naming the problem."""
    check_target_path(path)
    custom: Any = target.custom
    rel = custom.get("release") if isinstance(custom, dict) else None
    if not isinstance(rel, dict):
        raise ValueError("no custom.release object")
    version_text = rel.get("version")
    if not isinstance(version_text, str):
        raise ValueError("version is not a string")
    version = parse_version(version_text)
    hardware = rel.get("hardware")
    if not (
        isinstance(hardware, list) and hardware and all(isinstance(h, str) and h for h in hardware)
    ):
        raise ValueError("hardware is not a non-empty list of strings")
    channel, role = rel.get("channel"), rel.get("role")
    if not isinstance(channel, str) or not channel:
        raise ValueError("channel is not a non-empty string")
    role = check_role(role)
    compression = rel.get("compression")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {sorted(COMPRESSIONS)}")
    raw_length = rel.get("raw_length")
    # bool is an int subclass; `true` is not a length.
    if not isinstance(raw_length, int) or isinstance(raw_length, bool) or raw_length <= 0:
        raise ValueError("raw_length is not a positive integer (an image is never empty)")
    raw_sha256 = rel.get("raw_sha256")
    if not isinstance(raw_sha256, str) or not _SHA256_RE.fullmatch(raw_sha256):
        raise ValueError("raw_sha256 is not 64 lowercase hex digits")
    image = Image(role, path, target, compression, raw_length, raw_sha256)
    return _Entry(version, tuple(hardware), channel, image)


def releases(targets: Mapping[str, TargetFile], hardware: str, channel: str) -> list[Release]:
    """Releases for `hardware` on `channel`, oldest first.

    Targets with malformed custom release data are skipped; a version with two images
    for the same role is skipped whole (ambiguous). Both are logged, never raised.
    """
    by_version: dict[Version, dict[str, Image]] = {}
    ambiguous: set[Version] = set()
    for path in sorted(targets):
        try:
            entry = _parse_custom(path, targets[path])
        except ValueError as err:
            logger.warning("skipping target %s: malformed custom release data: %s", path, err)
            continue
        if hardware not in entry.hardware or entry.channel != channel:
            continue
        images = by_version.setdefault(entry.version, {})
        if entry.image.role in images:
            logger.warning(
                "skipping version %s: two images for role %s (%s, %s)",
                entry.version,
                entry.image.role,
                images[entry.image.role].path,
                path,
            )
            ambiguous.add(entry.version)
        images[entry.image.role] = entry.image
    return [
        Release(version.text, channel, dict(sorted(images.items())))
        for version, images in sorted(by_version.items())
        if version not in ambiguous
    ]


def select(
    targets: Mapping[str, TargetFile],
    *,
    hardware: str,
    channel: str,
    installed_version: str | None,
    failed_versions: Collection[str],
    want_version: str | None = None,
    force: bool = False,
) -> Release | None:
    """The release to install, or None when there is nothing newer.

    Without `want_version`: the newest version strictly greater than
    `installed_version` that is not in `failed_versions` (`force` does not apply).
    With `want_version`: exactly that version, even a failed one (an explicit request
    is a deliberate retry); a version <= the installed one raises `ReleaseRejected`
    ("downgrade") unless `force`. A `want_version` that does not exist for this
    hardware and channel raises `ReleaseRejected` naming the versions that do.
    An unparsable `installed_version` raises `VersionError`.
    """
    available = releases(targets, hardware, channel)
    installed = None
    if installed_version is not None:
        try:
            installed = parse_version(installed_version)
        except VersionError as e:
            raise VersionError(f"installed version: {e}") from e
    if want_version is not None:
        chosen = next((r for r in available if r.version == want_version), None)
        if chosen is None:
            names = ", ".join(r.version for r in available) or "none"
            raise ReleaseRejected(
                f"version {want_version} is not available for hardware {hardware} "
                f"on channel {channel}; available: {names}"
            )
        if installed is not None and chosen.parsed_version <= installed and not force:
            word = "re-install" if chosen.parsed_version == installed else "downgrade"
            raise ReleaseRejected(
                f"refusing {word} from {installed} to {chosen.version} "
                f"(hardware {hardware}, channel {channel}); use force to allow it"
            )
        return chosen
    failed = {_maybe_version(v) for v in failed_versions} - {None}
    for release in reversed(available):
        version = release.parsed_version
        if installed is not None and version <= installed:
            return None
        if version not in failed:
            return release
    return None


def _maybe_version(text: str) -> Version | None:
    try:
        return parse_version(text)
    except VersionError:
        return None


def check_roles(release: Release, roles: Collection[str]) -> None:
    """Refuse a release whose image roles are not exactly the slot's configured roles."""
    have, want = sorted(release.images), sorted(set(roles))
    if have != want:
        raise ReleaseRejected(
            f"release {release.version} has images for roles [{', '.join(have)}] "
            f"but the slots are configured with roles [{', '.join(want)}]"
        )
