"""The release schema, declared once: what a signed release image is, and how targets
group into releases.

A release is the set of TUF targets that share one `custom.release.version`; each
target is the image of one slot role (`root`, `boot`, ...). The custom field of a
target (DESIGN.md, "Trust"):

    {"release": {"version": "1.2.0", "hardware": ["x86_64-generic"], "channel": "stable",
                 "role": "root", "compression": "zstd", "raw_length": 123,
                 "raw_sha256": "<64 hex>", "index": "x86_64-generic/1.2.0/root.index"},
     "rollout": {"state": "active", "waves": [...]}}

`index` is optional: the target path of the image's chunk index (`core.chunkindex`), a
TUF target of its own (`index_path`), which lets a node fetch only the frames it does
not hold (docs/delta.md); without it a node downloads the whole image.

`rollout` is optional: the signed plan of a phased rollout (`core.rolloutplan`), the
same in every target of a release; without it every node may install at once.

This module is the one declaration of it, imported by the signing tools (which write
it), the agent and the mirror (which read it) and the test simulator:

* the fields as a typed value, `ReleaseFields` (`from_target` / `from_custom` parse,
  `to_custom` and `build_custom` write);
* the version grammar (`parse_version`, `Version`), the role grammar (`check_role`), the
  hardware and channel name rule (`check_name`), the compressions with their file
  suffixes (`COMPRESSIONS`, `SUFFIXES`);
* the rollout plan, `RolloutPlan` of `Wave`s (`from_custom` / `to_custom`), and the
  `--waves` grammar of the signing tools (`parse_waves`), declared in `core.rolloutplan`
  and re-exported here; `FieldError` (`core.fielderror`), the error of every field;
* the rule for signed target paths (`check_target_path`) and the path builders: a release
  image's target path (`target_path`), its chunk index's (`index_path`, recognised by
  `is_index_path`: an index is not an image, `releases` passes over it) and where a
  consistent-snapshot repository serves a target (`served_path`);
* `releases`, the grouping of verified targets into releases that the agent's selection
  policy (`updater.select`) and the mirror's plan start from.

Invariants:

* One parser: `ReleaseFields.from_target` is exactly what a node accepts. `sign-release
  add` signs only a custom it parsed back with it, so the two cannot disagree.
* A refused field raises `FieldError` (a ValueError) whose one-line message names the
  field, the value and the rule; `releases` logs and skips such a target, never raises.
* Pure: no I/O, no clock. tuf is imported for type checking only, so the agent's fast
  commands can import the schema (`updater status` starts without tuf).
* Versions are compared as versions (`parse_version`), never as strings; build
  metadata is refused, so two different strings are never the same version.
* The rollout plan keeps its own invariants (`core.rolloutplan`, re-exported here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import total_ordering
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from core.errors import UpdateRejected
from core.fielderror import FieldError as FieldError
from core.fielderror import refuse as _refuse
from core.fielderror import show as _show
from core.rolloutplan import ROLLOUT_STATES as ROLLOUT_STATES
from core.rolloutplan import RolloutPlan as RolloutPlan
from core.rolloutplan import Wave as Wave
from core.rolloutplan import format_time as format_time
from core.rolloutplan import parse_waves as parse_waves

if TYPE_CHECKING:
    # python-tuf documents tuf.api.metadata as the home of TargetFile but does not
    # re-export it explicitly; mypy still resolves the real class, hence the ignore.
    from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

logger = logging.getLogger(__name__)

# Compression name -> suffix of the target file name (`root.img.zst`).
SUFFIXES: Mapping[str, str] = MappingProxyType(
    {"zstd": ".zst", "xz": ".xz", "gzip": ".gz", "none": ""}
)
COMPRESSIONS: tuple[str, ...] = tuple(SUFFIXES)

# MAJOR.MINOR.PATCH, no leading zeros, optional dot-separated pre-release identifiers.
# Build metadata (`+...`) is refused: it would make two different strings equal versions.
_VERSION_RE = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
)
_MAX_VERSION_LEN = 128
VERSION_RULE = (
    f"MAJOR.MINOR.PATCH[-PRE] (semver without build metadata, at most {_MAX_VERSION_LEN} "
    "characters)"
)
# A role names a partition of a slot (`root`, `boot`, ...) and is part of file names.
ROLE_RULE = "a lowercase letter, then up to 31 of a-z, 0-9, '_' and '-'"
_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# Hardware and channel names: a hardware name is the first directory of target paths.
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_PATH_LEN = 1024


class ReleaseRejected(UpdateRejected):
    """No acceptable release: unknown version, downgrade, wrong roles."""


class VersionError(ReleaseRejected, FieldError):
    """A version string is not `MAJOR.MINOR.PATCH[-PRE]` (also a ValueError)."""


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


def parse_version(text: object) -> Version:
    """Parse `1.2.0` or `1.2.0-rc.1`; raise `VersionError` (a ValueError) otherwise."""
    m = None
    if isinstance(text, str) and len(text) <= _MAX_VERSION_LEN:
        m = _VERSION_RE.fullmatch(text)
    if not isinstance(text, str) or m is None:
        shown = _show(text)
        raise _refuse(
            VersionError,
            "version",
            text,
            f"is not {VERSION_RULE}",
            f"invalid version {shown}: expected {VERSION_RULE}",
        )
    pre: tuple[str | int, ...] = ()
    if m.group(4):
        pre = tuple(int(p) if p.isdigit() else p for p in m.group(4).split("."))
    return Version(text, int(m.group(1)), int(m.group(2)), int(m.group(3)), pre)


def check_role(role: object) -> str:
    """`role` if it is a valid role name; `FieldError` naming the rule otherwise."""
    if not isinstance(role, str) or not _ROLE_RE.fullmatch(role):
        raise _refuse(FieldError, "role", role, f"is not a valid role name ({ROLE_RULE})")
    return role


def check_name(field: str, name: object) -> str:
    """`name` if it is a valid hardware or channel name (`field` says which)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _refuse(FieldError, field, name, f"is not a valid name ({NAME_RULE})")
    return name


def check_target_path(path: object) -> str:
    """`path` if it is safe to use below a directory; `FieldError` naming the rule.

    A signed target path is still untrusted input: the agent, the mirror and the
    signing tools join it to directories. It must be relative, its `/`-separated
    components must be non-empty and not `.` or `..`, and it must hold no control
    characters (which includes NUL) and no backslash.
    """
    field = "target path"
    if not isinstance(path, str) or not path:
        raise _refuse(FieldError, field, path, "is not a non-empty string")
    if len(path) > _MAX_PATH_LEN:
        raise _refuse(FieldError, field, path, f"is longer than {_MAX_PATH_LEN} characters")
    if path.startswith("/"):
        raise _refuse(FieldError, field, path, "is absolute")
    bad = next((c for c in path if ord(c) < 0x20 or ord(c) == 0x7F or c == "\\"), None)
    if bad is not None:
        raise _refuse(FieldError, field, path, f"contains the character {bad!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise _refuse(FieldError, field, path, "has an empty, '.' or '..' component")
    return path


def target_path(hardware: str, version: str, role: str, compression: str) -> str:
    """The target path of a release image: `<hardware>/<version>/<role>.img<suffix>`."""
    return f"{hardware}/{version}/{role}.img{SUFFIXES[compression]}"


INDEX_SUFFIX = ".index"


def index_path(hardware: str, version: str, role: str) -> str:
    """The target path of a release image's chunk index: `<hardware>/<version>/<role>.index`
    (an image's path ends in `.img[<suffix>]`, so the two never collide)."""
    return f"{hardware}/{version}/{role}{INDEX_SUFFIX}"


def is_index_path(path: str) -> bool:
    """Whether a target path names a chunk index rather than an image."""
    return path.endswith(INDEX_SUFFIX)


def served_path(path: str, digest: str) -> str:
    """Where a consistent-snapshot repository serves target `path` whose hash is
    `digest`: `<dir>/<digest>.<basename>` (TUF specification, "consistent snapshots")."""
    dirname, sep, basename = path.rpartition("/")
    return f"{dirname}{sep}{digest}.{basename}"


def served_digest(name: str) -> str:
    """The digest a served file name `<digest>.<basename>` starts with."""
    return name.split(".", 1)[0]


def build_custom(
    *,
    version: str,
    hardware: Sequence[str],
    channel: str,
    role: str,
    compression: str,
    raw_length: int,
    raw_sha256: str,
    rollout: Mapping[str, Any] | None = None,
    index: str | None = None,
) -> dict[str, Any]:
    """The `custom` field of a target, unchecked (`ReleaseFields.from_custom` checks);
    `rollout` is a plan's `to_custom()` (None: no plan, no `rollout` key); `index` the
    target path of the image's chunk index (None: no `index` key)."""
    custom: dict[str, Any] = {
        "release": {
            "version": version,
            "hardware": list(hardware),
            "channel": channel,
            "role": role,
            "compression": compression,
            "raw_length": raw_length,
            "raw_sha256": raw_sha256,
        }
    }
    if index is not None:
        custom["release"]["index"] = index
    if rollout is not None:
        custom["rollout"] = dict(rollout)
    return custom


@dataclass(frozen=True)
class ReleaseFields:
    """The `custom.release` of one target, parsed: every field obeys its rule."""

    version: Version
    hardware: tuple[str, ...]
    channel: str
    role: str
    compression: str
    raw_length: int
    raw_sha256: str
    rollout: RolloutPlan | None = None  # `custom.rollout`; None: install at once
    index: str | None = None  # target path of the chunk index; None: no delta possible

    @classmethod
    def from_target(cls, path: str, target: TargetFile) -> ReleaseFields:
        """What a node accepts: a safe target path and a valid custom (`FieldError`)."""
        check_target_path(path)
        return cls.from_custom(target.custom)

    @classmethod
    def from_custom(cls, custom: object) -> ReleaseFields:
        """Parse a target's `custom`; `FieldError` naming the first field that is wrong."""
        rel = custom.get("release") if isinstance(custom, dict) else None
        if not isinstance(rel, dict):
            raise _refuse(FieldError, "release", custom, "is not a custom.release object")
        version = parse_version(rel.get("version"))
        hardware = rel.get("hardware")
        if not isinstance(hardware, list) or not hardware:
            raise _refuse(FieldError, "hardware", hardware, "is not a non-empty list of names")
        for name in hardware:
            check_name("hardware", name)
        channel = check_name("channel", rel.get("channel"))
        role = check_role(rel.get("role"))
        compression = rel.get("compression")
        if not isinstance(compression, str) or compression not in SUFFIXES:
            rule = f"is not one of {', '.join(sorted(SUFFIXES))}"
            raise _refuse(FieldError, "compression", compression, rule)
        raw_length = rel.get("raw_length")
        # bool is an int subclass; `true` is not a length.
        if not isinstance(raw_length, int) or isinstance(raw_length, bool) or raw_length <= 0:
            rule = "is not a positive integer (an image is never empty)"
            raise _refuse(FieldError, "raw_length", raw_length, rule)
        raw_sha256 = rel.get("raw_sha256")
        if not isinstance(raw_sha256, str) or not _SHA256_RE.fullmatch(raw_sha256):
            raise _refuse(FieldError, "raw_sha256", raw_sha256, "is not 64 lowercase hex digits")
        index = rel.get("index")
        if "index" in rel:
            index = check_target_path(index)
            if not is_index_path(index):
                rule = f"is not a chunk index path (ending in {INDEX_SUFFIX})"
                raise _refuse(FieldError, "index", index, rule)
        plan = None
        if isinstance(custom, dict) and "rollout" in custom:  # always a dict here
            plan = RolloutPlan.from_custom(custom["rollout"])
        return cls(
            version,
            tuple(hardware),
            channel,
            role,
            compression,
            raw_length,
            raw_sha256,
            plan,
            index,
        )

    def to_custom(self) -> dict[str, Any]:
        """The `custom` field these values are parsed from (`from_custom`'s inverse)."""
        return build_custom(
            version=self.version.text,
            hardware=self.hardware,
            channel=self.channel,
            role=self.role,
            compression=self.compression,
            raw_length=self.raw_length,
            raw_sha256=self.raw_sha256,
            rollout=None if self.rollout is None else self.rollout.to_custom(),
            index=self.index,
        )

    def target_path(self, hardware: str) -> str:
        """This image's target path for one of its hardware names."""
        return target_path(hardware, self.version.text, self.role, self.compression)


@dataclass(frozen=True)
class Image:
    """One target of a release: the image for one slot role."""

    role: str
    path: str
    target: TargetFile
    compression: str
    raw_length: int
    raw_sha256: str
    index: str | None = None  # target path of its chunk index (`core.chunkindex`)


@dataclass(frozen=True)
class Release:
    """All images of one version for this node's hardware and channel (role -> Image),
    and their rollout plan (the same in every image; None: install at once)."""

    version: str
    channel: str
    images: Mapping[str, Image]
    rollout: RolloutPlan | None = None

    @property
    def parsed_version(self) -> Version:
        return parse_version(self.version)


def releases(targets: Mapping[str, TargetFile], hardware: str, channel: str) -> list[Release]:
    """Releases for `hardware` on `channel`, oldest first.

    Chunk indexes (`is_index_path`) are no images and are passed over quietly; targets
    with malformed custom release data are skipped; a version with two images
    for the same role, or whose images carry different rollout plans, is skipped whole
    (ambiguous: the node cannot tell which image, or which plan, was meant). Both are
    logged, never raised.
    """
    by_version: dict[Version, dict[str, Image]] = {}
    plans: dict[Version, RolloutPlan | None] = {}
    ambiguous: set[Version] = set()
    for path in sorted(targets):
        if is_index_path(path):
            continue
        try:
            fields = ReleaseFields.from_target(path, targets[path])
        except ValueError as err:
            # %r: a signed path is still untrusted text; a newline in it must not forge
            # a log line (the error's own message quotes the value with repr too).
            logger.warning("skipping target %r: malformed custom release data: %s", path, err)
            continue
        if hardware not in fields.hardware or fields.channel != channel:
            continue
        image = Image(
            fields.role,
            path,
            targets[path],
            fields.compression,
            fields.raw_length,
            fields.raw_sha256,
            fields.index,
        )
        images = by_version.setdefault(fields.version, {})
        if image.role in images:
            logger.warning(
                "skipping version %s: two images for role %s (%s, %s)",
                fields.version,
                image.role,
                images[image.role].path,
                path,
            )
            ambiguous.add(fields.version)
        elif images and plans[fields.version] != fields.rollout:
            logger.warning(
                "skipping version %s: its images carry different rollout plans (%s in %s)",
                fields.version,
                _plan_text(fields.rollout),
                path,
            )
            ambiguous.add(fields.version)
        plans.setdefault(fields.version, fields.rollout)
        images[image.role] = image
    return [
        Release(version.text, channel, dict(sorted(images.items())), plans[version])
        for version, images in sorted(by_version.items())
        if version not in ambiguous
    ]


def _plan_text(plan: RolloutPlan | None) -> str:
    return "no plan" if plan is None else plan.describe()


def check_roles(release: Release, roles: Collection[str]) -> None:
    """Refuse a release whose image roles are not exactly the slot's configured roles."""
    have, want = sorted(release.images), sorted(set(roles))
    if have != want:
        raise ReleaseRejected(
            f"release {release.version} has images for roles [{', '.join(have)}] "
            f"but the slots are configured with roles [{', '.join(want)}]"
        )
