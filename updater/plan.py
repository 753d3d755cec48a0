"""What an install will write, decided before the inactive slot is touched.

`plan_writes` takes the chosen release, the inactive slot's partitions and the
configured roles, and returns the writes to do - one (role, image, partition) each - or
refuses the release with `ReleaseUnfit` naming the image, the partition and the sizes.
It is pure (no I/O): the agent calls it after selecting a release and before
invalidating the inactive slot, so a release that can never be installed (an image
larger than its partition, an empty image, an unknown compression, a role without a
partition) costs the node nothing: the slot, its verified version in the journal and
the bootloader state stay as they were, however often the install is retried.

Invariant: every write of a returned plan passes `install.check_image` (the writer
checks again, per image, before opening anything).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from core.errors import UpdateRejected
from core.release import Image, Release, check_roles
from updater.install import check_image
from updater.slots import Target


class ReleaseUnfit(UpdateRejected):
    """A release cannot be installed into this node's slot (size, length, role)."""


@dataclass(frozen=True)
class PlannedWrite:
    role: str
    image: Image
    target: Target  # a partition, or a file on the ESP (`file:` roles)


@dataclass(frozen=True)
class Plan:
    release: Release
    writes: tuple[PlannedWrite, ...]  # sorted by role


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def plan_writes(chosen: Release, targets: Mapping[str, Target], roles: Collection[str]) -> Plan:
    """The writes that install `chosen` into the slot whose partitions and files are
    `targets` (role -> target), or `ReleaseUnfit` / `ReleaseRejected` saying why it
    cannot be. A file's size is the free space it may take on its filesystem."""
    check_roles(chosen, roles)
    writes: list[PlannedWrite] = []
    for role, image in sorted(chosen.images.items()):
        what = f"release {chosen.version} image {image.path}"
        target = targets.get(role)
        if target is None:
            have = ", ".join(sorted(targets)) or "none"
            raise ReleaseUnfit(f"{what}: no partition for role {role} (the slot has: {have})")
        if image.target.length <= 0:
            raise ReleaseUnfit(f"{what}: signed length {image.target.length} is not positive")
        if image.raw_length > target.size:
            raise ReleaseUnfit(
                f"{what}: {image.raw_length} bytes ({_mib(image.raw_length)}) do not fit "
                f"{target.describe()} of {target.size} bytes ({_mib(target.size)})"
            )
        try:
            check_image(target, image.compression, image.raw_length, image.raw_sha256)
        except UpdateRejected as err:
            raise ReleaseUnfit(f"{what}: {err}") from err
        writes.append(PlannedWrite(role, image, target))
    return Plan(chosen, tuple(writes))
