"""The agent's selection policy: which release, of those the node may install, it installs.

`core.release.releases` groups the verified targets into releases for this node's
hardware and channel (the schema, shared with the mirror); `select` picks one of them.

Invariants:

* Pure: no I/O, no clock; inputs are the *verified* targets of the trusted TUF targets
  metadata (`core.repository.Repository.targets()`), outputs plain data.
* Versions are compared as versions (`core.release.parse_version`). Without an
  explicit `want_version`, only upgrades are offered and versions that failed on this
  node are skipped; an explicit `want_version` may retry a failed version, and may go
  down or re-install only with `force`.
* A release whose signed rollout plan is withdrawn is not offered: without
  `want_version` it is as if it were absent (a node running it moves on to the next
  newer release as usual); `want_version` may still name it. Waves and pauses are not
  decided here: the agent asks `updater.rollout.gate` about the chosen release.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from core.release import Release, ReleaseRejected, Version, VersionError, parse_version, releases

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

__all__ = ["Release", "select"]  # Release: what `select` returns


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
    `installed_version` that is not in `failed_versions` and not withdrawn (`force`
    does not apply).
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
        if release.rollout is not None and release.rollout.state == "withdrawn":
            continue  # as if absent: the next older release is still a candidate
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
