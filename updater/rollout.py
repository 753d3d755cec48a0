"""The wave gate of a phased rollout: where this node stands in the fleet, and whether
the signed plan of a release (`core.release.RolloutPlan`) lets it install now.

A node's position in [0, 1) is derived from its machine id and the release (hardware
and version), so it is stable across checks and restarts, the same on every node that
computes it (the benchmark, an operator's script), and different from one release to
the next: the first 5% of one release are not always the same machines. A node at
position p belongs to the first wave whose cumulative share is above p and may install
once the node's clock reaches that wave's start.

Invariants:

* `position` and `gate` are pure (no I/O, no clock: `now` is given). The only I/O is
  `read_machine_id` and `withdrawn_in_cache` (for `status`: the TUF cache's
  targets.json read as JSON, no tuf import), bounded reads that refuse FIFOs and devices
  (`core.fsutil`).
* A plan that is paused or withdrawn never lets a node go; a node whose clock is before
  its wave's start does not go (so a clock before the first wave holds every node).
* Every `Waiting.detail` is one line.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from core.errors import UpdateFailed
from core.fsutil import read_regular
from core.release import ReleaseFields, RolloutPlan, check_target_path, format_time
from core.textparse import loads_json

_MACHINE_ID_RE = re.compile(rb"[0-9a-f]{32}\n?")
_MACHINE_ID_LIMIT = 4096  # machine-id(5) is 33 bytes; anything far larger is not one
_METADATA_LIMIT = 16 * 1024 * 1024  # as the signing tools bound a metadata file


class _Device(Protocol):
    @property
    def hardware(self) -> str: ...
    @property
    def channel(self) -> str: ...


class MachineIdError(UpdateFailed):
    """The machine id file is missing, unreadable or not machine-id(5)."""


@dataclass(frozen=True)
class Waiting:
    """Why a node does not install a release yet: `reason` is "wave", "paused" or
    "withdrawn"; `detail` is one line; `until` is the wave's start (None when only the
    publisher can end the wait: paused, withdrawn)."""

    reason: str
    detail: str
    until: datetime | None = None


def position(machine_id: str, hardware: str, version: str) -> float:
    """This node's place in the fleet for one release, in [0, 1).

    sha256 of `machine_id`, `hardware` and `version` joined by NUL; its first 8 bytes as
    a big-endian integer divided by 2**64, rounded down to a multiple of 2**-53 (a float
    holds 53 bits: the division alone would round the largest values up to 1.0).
    """
    digest = hashlib.sha256("\0".join((machine_id, hardware, version)).encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def read_machine_id(path: Path) -> str:
    """The machine id in `path` (machine-id(5): 32 lowercase hex digits and a newline);
    `MachineIdError` naming the path otherwise (also for systemd's "uninitialized" and
    the all-zero id, which many images share)."""
    try:
        data = read_regular(path, _MACHINE_ID_LIMIT)
    except OSError as e:
        raise MachineIdError(f"machine id {path}: cannot read: {e.strerror or e}") from e
    if not _MACHINE_ID_RE.fullmatch(data):
        shown = repr(data[:40]) + ("..." if len(data) > 40 else "")
        raise MachineIdError(
            f"machine id {path}: {shown} is not 32 lowercase hex digits (machine-id(5))"
        )
    text = data.decode().strip()
    if text == "0" * 32:
        raise MachineIdError(f"machine id {path}: is all zeros, not a machine's own id")
    return text


def gate(plan: RolloutPlan | None, position: float, now: datetime) -> Waiting | None:
    """None if a node at `position` may install a release with `plan` at `now` (an
    aware datetime); otherwise why not. No plan: install at once."""
    if plan is None:
        return None
    if plan.state == "withdrawn":
        return Waiting("withdrawn", "the release is withdrawn by its publisher")
    if plan.state == "paused":
        return Waiting("paused", "the rollout of the release is paused by its publisher")
    # The last share is exactly 1 and a position is below 1: some wave always matches;
    # the default only guards a position given from elsewhere.
    index = next((i for i, w in enumerate(plan.waves) if position < w.share), -1)
    wave = plan.waves[index]
    if now >= wave.start:
        return None
    number = index + 1 if index >= 0 else len(plan.waves)
    return Waiting(
        "wave",
        f"wave {number} of {len(plan.waves)} (share {wave.share * 100:.4g}%) starts "
        f"{format_time(wave.start)}; this node is at {math.floor(position * 1000) / 1000:.3f}",
        wave.start,
    )


def withdrawn_in_cache(metadata_dir: Path, device: _Device, version: str) -> bool:
    """Whether the targets metadata the last refresh verified and cached (ngclient's
    `<metadata_dir>/targets.json`) withdraws `version` for this device's hardware and
    channel: every image of it carries the same plan and that plan is withdrawn (the
    grouping rule of `core.release.releases`). Anything unreadable or malformed: False -
    `status` reports what it knows and never fails on it."""
    try:
        doc = loads_json(read_regular(metadata_dir / "targets.json", _METADATA_LIMIT))
        targets = doc["signed"]["targets"]
        items = list(targets.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    plans = set()
    for path, target in items:
        try:  # a target a node skips (malformed) says nothing about the release
            check_target_path(path)
            fields = ReleaseFields.from_custom(target.get("custom"))
        except (ValueError, AttributeError):
            continue
        if (
            fields.version.text == version
            and device.hardware in fields.hardware
            and fields.channel == device.channel
        ):
            plans.add(fields.rollout)
    plan = next(iter(plans)) if len(plans) == 1 else None
    return plan is not None and plan.state == "withdrawn"
