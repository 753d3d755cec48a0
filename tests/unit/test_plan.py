"""updater.plan.plan_writes: pure, and it refuses every release that cannot be installed
into the slot - naming the image, the partition and the sizes - before anything is
written. Data in, data out: no disk, no network."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from core.errors import UpdateRejected
from core.release import Image, Release, ReleaseRejected
from updater.plan import ReleaseUnfit, plan_writes
from updater.slots import PartitionTarget

MiB = 1 << 20
SHA = "ab" * 32
DISK = Path("/dev/vda")
SLOT_B = {
    "boot": PartitionTarget("B", "boot", "boot_b", DISK, 100 * MiB, 64 * MiB),
    "root": PartitionTarget("B", "root", "root_b", DISK, 200 * MiB, 384 * MiB),
}


def image(role: str, raw_length: int, length: int = 1000, compression: str = "zstd") -> Image:
    path = f"x86_64-efi/3.0.0/{role}.img.zst"
    target = TargetFile(length, {"sha256": SHA}, path)
    return Image(role, path, target, compression, raw_length, SHA)


def release(*images: Image) -> Release:
    return Release("3.0.0", "stable", {i.role: i for i in images})


def test_a_fitting_release_is_planned_role_by_role() -> None:
    chosen = release(image("root", 384 * MiB), image("boot", 1))
    plan = plan_writes(chosen, SLOT_B, ("boot", "root"))
    assert plan.release is chosen
    assert [(w.role, w.target.label, w.image.raw_length) for w in plan.writes] == [
        ("boot", "boot_b", 1),
        ("root", "root_b", 384 * MiB),
    ]


@pytest.mark.parametrize(
    ("images", "roles", "message"),
    [
        (
            [image("root", 385 * MiB), image("boot", MiB)],
            ("boot", "root"),
            r"release 3\.0\.0 image x86_64-efi/3\.0\.0/root\.img\.zst: 403701760 bytes "
            r"\(385\.0 MiB\) do not fit slot B root \(root_b, /dev/vda@209715200\) of "
            r"402653184 bytes \(384\.0 MiB\)",
        ),
        (
            [image("root", 0), image("boot", MiB)],
            ("boot", "root"),
            r"root\.img\.zst: image for slot B root .*: raw_length 0 <= 0",
        ),
        (
            [image("root", MiB, length=0), image("boot", MiB)],
            ("boot", "root"),
            r"root\.img\.zst: signed length 0 is not positive",
        ),
        (
            [image("root", MiB, compression="lz4"), image("boot", MiB)],
            ("boot", "root"),
            r"root\.img\.zst: image for slot B root .*: unknown compression 'lz4'",
        ),
        (
            [image("root", MiB), image("data", MiB)],
            ("data", "root"),
            r"data\.img\.zst: no partition for role data \(the slot has: boot, root\)",
        ),
    ],
)
def test_what_cannot_be_installed_is_refused(
    images: list[Image], roles: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ReleaseUnfit, match=message) as err:
        plan_writes(release(*images), SLOT_B, roles)
    assert isinstance(err.value, UpdateRejected) and err.value.exit_code == 3


def test_roles_other_than_the_configured_ones_are_refused() -> None:
    with pytest.raises(ReleaseRejected, match=r"roles \[root\] but the slots .* \[boot, root\]"):
        plan_writes(release(image("root", MiB)), SLOT_B, ("boot", "root"))


@given(root=st.integers(-2, 400 * MiB), boot=st.integers(-2, 70 * MiB))
def test_planned_exactly_when_every_image_fits(root: int, boot: int) -> None:
    chosen = release(image("root", root), image("boot", boot))
    fits = 0 < root <= 384 * MiB and 0 < boot <= 64 * MiB
    try:
        plan = plan_writes(chosen, SLOT_B, ("boot", "root"))
    except ReleaseUnfit:
        assert not fits
    else:
        assert fits and all(0 < w.image.raw_length <= w.target.size for w in plan.writes)
