"""Phased rollout, node side: the signed plan's grammar (`core.release.RolloutPlan`,
`parse_waves`), a node's position in the fleet and the wave gate (`updater.rollout`),
and what the grouping and the selection policy make of a plan (`core.release.releases`,
`updater.select`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securesystemslib.formats import encode_canonical
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from core.errors import UpdateFailed
from core.release import FieldError, ReleaseFields, RolloutPlan, Wave, parse_waves, releases
from tests.reposim import release_custom
from updater.rollout import (
    MachineIdError,
    Waiting,
    gate,
    position,
    read_machine_id,
    withdrawn_in_cache,
)
from updater.select import select

HW = "x86_64-generic"
NOW = datetime(2026, 12, 3, 1, 30, tzinfo=UTC)
T0 = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)


def plan(*waves: tuple[float, datetime], state: str = "active") -> RolloutPlan:
    return RolloutPlan(tuple(Wave(s, t) for s, t in waves), state)


THREE = plan((0.05, T0), (0.25, T0 + timedelta(days=1)), (1.0, T0 + timedelta(days=2)))


def machine_ids(n: int) -> list[str]:
    return [hashlib.sha256(b"node %d" % i).hexdigest()[:32] for i in range(n)]


# --- position -------------------------------------------------------------------------


def test_position_is_the_documented_hash_stable_and_below_one() -> None:
    ids = machine_ids(10_000)
    for mid in ids:
        p = position(mid, HW, "1.2.0")
        assert 0 <= p < 1 and position(mid, HW, "1.2.0") == p
        digest = hashlib.sha256(f"{mid}\0{HW}\0{'1.2.0'}".encode()).digest()
        assert abs(p - int.from_bytes(digest[:8], "big") / 2**64) <= 2**-53
    # Each of the three inputs moves the position.
    mid = ids[0]
    assert len({position(mid, HW, "1.2.0"), position(ids[1], HW, "1.2.0"),
                position(mid, "arm64", "1.2.0"), position(mid, HW, "1.3.0")}) == 4  # fmt: skip


def test_waves_take_their_share_of_10000_nodes_and_differ_per_release() -> None:
    ids = machine_ids(10_000)
    first_wave: dict[str, set[str]] = {}
    for version in ("1.2.0", "1.3.0"):
        counts = [0, 0, 0]
        first_wave[version] = set()
        for mid in ids:
            p = position(mid, HW, version)
            wave = next(i for i, w in enumerate(THREE.waves) if p < w.share)
            counts[wave] += 1
            if wave == 0:
                first_wave[version].add(mid)
        # Shares 5%, 20%, 75% of 10,000: each within 1.5 points (about 5 sigma of the
        # binomial for the first wave; the ids are fixed, so this is not a flaky bound).
        for got, want in zip(counts, (0.05, 0.20, 0.75), strict=True):
            assert abs(got / len(ids) - want) < 0.015, counts
    # The first 5% of one release are not the first 5% of the next (expected overlap 5%).
    overlap = len(first_wave["1.2.0"] & first_wave["1.3.0"])
    assert overlap < 0.2 * len(first_wave["1.2.0"])


# --- the gate -------------------------------------------------------------------------


def test_no_plan_goes_at_once() -> None:
    assert gate(None, 0.99, NOW) is None


def test_clock_before_the_first_wave_holds_every_node() -> None:
    for p in (0.0, 0.049, 0.05, 0.3, 0.999999):
        waiting = gate(THREE, p, T0 - timedelta(seconds=1))
        assert waiting is not None and waiting.reason == "wave", p
        assert waiting.until is not None and waiting.until >= T0


def test_exactly_at_a_wave_start_the_wave_goes() -> None:
    assert gate(THREE, 0.01, T0) is None
    assert gate(THREE, 0.01, T0 - timedelta(seconds=1)) == Waiting(
        "wave",
        "wave 1 of 3 (share 5%) starts 2026-12-03T02:00:00Z; this node is at 0.010",
        T0,
    )
    # A node exactly at a share belongs to the next wave (p < share).
    day1 = T0 + timedelta(days=1)
    waiting = gate(THREE, 0.05, T0)
    assert waiting is not None and waiting.until == day1
    assert waiting.detail.startswith("wave 2 of 3 (share 25%) starts 2026-12-04T02:00:00Z")
    assert gate(THREE, 0.05, day1) is None
    assert gate(THREE, 0.25, day1) is not None
    assert gate(THREE, 0.999, T0 + timedelta(days=2)) is None


def test_paused_and_withdrawn_hold_every_node_with_no_end() -> None:
    late = T0 + timedelta(days=30)
    for state in ("paused", "withdrawn"):
        p = RolloutPlan(THREE.waves, state)
        for where in (0.0, 0.5, 0.99):
            waiting = gate(p, where, late)
            assert waiting is not None
            assert (waiting.reason, waiting.until) == (state, None)
            assert "\n" not in waiting.detail


# --- the machine id -------------------------------------------------------------------

MID = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("content", [MID + "\n", MID])
def test_machine_id_is_read(tmp_path: Path, content: str) -> None:
    (tmp_path / "machine-id").write_text(content)
    assert read_machine_id(tmp_path / "machine-id") == MID


@pytest.mark.parametrize(
    "content",
    [b"", b"uninitialized\n", MID.upper().encode(), MID[:31].encode(), (MID + "0").encode(),
     b"0" * 32 + b"\n", (MID + "\n\n").encode(), b" " + MID.encode(), MID.encode() + b"\0",
     b"\xff" * 32, b"x" * 100_000],
)  # fmt: skip
def test_bad_machine_id_is_one_line_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "machine-id"
    path.write_bytes(content)
    with pytest.raises(MachineIdError) as err:
        read_machine_id(path)
    assert isinstance(err.value, UpdateFailed)
    assert str(err.value).startswith(f"machine id {path}: ") and "\n" not in str(err.value)


def test_machine_id_that_is_missing_a_directory_or_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # must not block: read_regular refuses it on the open descriptor
    for path in (tmp_path / "absent", tmp_path, fifo):
        with pytest.raises(MachineIdError, match=f"^machine id {path}: cannot read: "):
            read_machine_id(path)


# --- the plan's grammar ---------------------------------------------------------------


def test_parse_waves_absolute_relative_and_percentages() -> None:
    waves = parse_waves("0.05@2026-12-03T02:00Z, 25%@+1d,1@+2d", NOW)
    assert waves == (
        Wave(0.05, T0),
        Wave(0.25, NOW + timedelta(days=1)),
        Wave(1.0, NOW + timedelta(days=2)),
    )
    now = NOW.replace(microsecond=123456)  # relative times are whole seconds
    assert parse_waves(".5@now,100%@+90m", now) == (
        Wave(0.5, NOW),
        Wave(1.0, NOW + timedelta(minutes=90)),
    )
    assert parse_waves("1@2026-12-03T02:00:07Z", NOW) == (Wave(1.0, T0 + timedelta(seconds=7)),)
    assert parse_waves("0.1@+1h,1@+1h", NOW)[1].start == NOW + timedelta(hours=1)  # same time
    # A percentage is exact in millionths (a float quotient would be next to it).
    assert parse_waves("33.3333%@now,1@now", NOW)[0].share == 0.333333
    assert RolloutPlan(parse_waves("0.000001@now,1@now", NOW)).to_custom()["waves"] == [
        {"share": "0.000001", "start": "2026-12-03T01:30:00Z"},
        {"share": "1", "start": "2026-12-03T01:30:00Z"},
    ]


HOSTILE_SPECS = {
    "NaN@now": "waves[0]",
    "nan@now,1@+1d": "waves[0]",
    "inf@now": "waves[0]",
    "1e309@now": "waves[0]",
    "1e-3@now,1@now": "waves[0]",
    "-0.1@now,1@now": "waves[0]",
    "0@now,1@now": "waves[0].share",
    "0.5@now,0.5@+1d,1@+2d": "waves[1].share",
    "0.5@now,0.3@+1d,1@+2d": "waves[1].share",
    "0.5@now,0.9@+1d": "waves[1].share",
    "1.5@now": "waves[0].share",
    "101%@now": "waves[0].share",
    "0.5@+2d,1@+1d": "waves[1].start",
    "0.5@2026-12-05T00:00Z,1@2026-12-04T00:00Z": "waves[1].start",
    ",".join(f"{(i + 1) / 21:.6f}@+{i}h" for i in range(21)): "waves",
    "1@now\x00": "waves[0]",
    "\x00": "waves[0]",
    "1\x00@now": "waves[0]",
    "9" * 400 + "@now": "waves[0]",
    "0." + "1" * 400 + "@now,1@now": "waves[0]",
    "0.1234567@now,1@now": "waves[0]",
    "12.34567%@now,1@now": "waves[0]",
    "1@+" + "9" * 30 + "d": "waves[0]",
    "1@+9999999d": "waves[0]",
    "1@2026-02-30T00:00Z": "waves[0]",
    "1@0000-01-01T00:00Z": "waves[0]",
    "1@2026-12-03T25:00Z": "waves[0]",
    "1@2026-12-03T02:00": "waves[0]",
    "1@2026-12-03T02:00+01:00": "waves[0]",
    "1@2026-12-03 02:00Z": "waves[0]",
    "1@+1w": "waves[0]",
    "1@+-1d": "waves[0]",
    "1@yesterday": "waves[0]",
    "1": "waves[0]",
    "@now": "waves[0]",
    "1@now,": "waves[1]",
    "1@now@now": "waves[0]",
    "0.5@now\n1@now": "waves[0]",
    "": "waves",
    " ": "waves",
    "1@now" + " " * 3000: "waves",
}


@pytest.mark.parametrize("spec", list(HOSTILE_SPECS))
def test_hostile_wave_specs_are_one_line_naming_the_wave(spec: str) -> None:
    with pytest.raises(FieldError) as err:
        parse_waves(spec, NOW)
    message = str(err.value)
    assert err.value.field == HOSTILE_SPECS[spec], message
    assert message.startswith(HOSTILE_SPECS[spec] + " ") and "\n" not in message
    assert "\x00" not in message and len(message) < 400


START = "2026-12-03T02:00:00Z"
GOOD = {
    "state": "active",
    "waves": [{"share": "0.25", "start": START}, {"share": "1", "start": START}],
}
HOSTILE_PLANS: list[tuple[Any, str]] = [
    (None, "rollout"),
    ([], "rollout"),
    ({**GOOD, "state": "stopped"}, "rollout.state"),
    ({**GOOD, "state": None}, "rollout.state"),
    ({"waves": GOOD["waves"]}, "rollout.state"),
    ({**GOOD, "extra": 1}, "rollout"),
    ({"state": "active"}, "rollout.waves"),
    ({**GOOD, "waves": []}, "rollout.waves"),
    ({**GOOD, "waves": [{"share": "1", "start": START}] * 21}, "rollout.waves"),
    ({**GOOD, "waves": "1@now"}, "rollout.waves"),
    ({**GOOD, "waves": [1]}, "rollout.waves[0]"),
    ({**GOOD, "waves": [{"share": "1"}]}, "rollout.waves[0]"),
    ({**GOOD, "waves": [{"share": "1", "start": START, "x": 0}]}, "rollout.waves[0]"),
    *(({**GOOD, "waves": [{"share": bad, "start": START}]}, "rollout.waves[0].share")
      for bad in (float("nan"), float("inf"), 10**400, True, 1, 1.0, 0.5, None, "NaN",
                  "Infinity", "1e309", "1e-3", "0", "0.0", "0.000000", "1.5", "2", "-0.5",
                  "+0.5", ".5", "0.5 ", " 0.5", "0.5\x00", "0.1234567", "1.0000001",
                  "0." + "1" * 400, "\uff19")),
    ({**GOOD, "waves": [GOOD["waves"][1], GOOD["waves"][0]]}, "rollout.waves[1].share"),
    ({**GOOD, "waves": [{"share": "1", "start": "2026-12-03T02:00:00+00:00"}]},
     "rollout.waves[0].start"),
    ({**GOOD, "waves": [{"share": "1", "start": "2026-12-03T02:00:00.5Z"}]},
     "rollout.waves[0].start"),
    ({**GOOD, "waves": [{"share": "1", "start": "2026-13-03T02:00:00Z"}]},
     "rollout.waves[0].start"),
    ({**GOOD, "waves": [{"share": "1", "start": START + "\x00"}]}, "rollout.waves[0].start"),
    ({**GOOD, "waves": [{"share": "1", "start": 1764727200}]}, "rollout.waves[0].start"),
    ({**GOOD, "waves": [{"share": "0.5", "start": "2026-12-04T00:00:00Z"},
                        {"share": "1", "start": START}]}, "rollout.waves[1].start"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "field"), HOSTILE_PLANS)
def test_hostile_signed_plans_are_one_line_naming_the_field(obj: Any, field: str) -> None:
    with pytest.raises(FieldError) as err:
        RolloutPlan.from_custom(obj)
    assert err.value.field == field and str(err.value).startswith(field + " ")
    assert "\n" not in str(err.value) and "\x00" not in str(err.value)
    # A target carrying it is one a node skips (the one parser of the release schema).
    with pytest.raises(FieldError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        ReleaseFields.from_custom({**release_custom("1.2.0", hardware=(HW,)), "rollout": obj})


@given(
    st.lists(st.integers(1, 999_999), max_size=19, unique=True),
    st.lists(st.integers(0, 10**9), min_size=20, max_size=20),
    st.sampled_from(["active", "paused", "withdrawn"]),
)
def test_plans_round_trip_through_signed_json(
    millionths: list[int], offsets: list[int], state: str
) -> None:
    cumulative = [*(n / 10**6 for n in sorted(millionths)), 1.0]
    starts = sorted(T0 + timedelta(seconds=o) for o in offsets[: len(cumulative)])
    p = RolloutPlan(tuple(Wave(s, t) for s, t in zip(cumulative, starts, strict=True)), state)
    # Canonical JSON (what TUF signs) holds no floats: the plan must encode there.
    signed = encode_canonical(p.to_custom())
    assert isinstance(signed, str)
    again = RolloutPlan.from_custom(json.loads(signed))
    assert again == p and again.to_custom() == p.to_custom()


# --- grouping and selection -----------------------------------------------------------


def target(path: str, custom: Any) -> TargetFile:
    info = TargetFile.from_data(path, path.encode(), ["sha256"])
    info.unrecognized_fields["custom"] = custom
    return info


def release_targets(version: str, *plans: RolloutPlan | None) -> dict[str, TargetFile]:
    """One image per plan (roles root, boot, ...), each carrying that plan."""
    roles = ("root", "boot", "efi")
    out = {}
    for role, p in zip(roles, plans, strict=False):
        path = f"{HW}/{version}/{role}.img"
        rollout = None if p is None else p.to_custom()
        out[path] = target(
            path, release_custom(version, role=role, hardware=(HW,), rollout=rollout)
        )
    return out


def test_a_release_carries_its_plan() -> None:
    found = releases({**release_targets("1.2.0", THREE, THREE), **release_targets("1.1.0", None)},
                     HW, "stable")  # fmt: skip
    assert [(r.version, r.rollout) for r in found] == [("1.1.0", None), ("1.2.0", THREE)]


def test_images_with_different_plans_skip_the_release(caplog: pytest.LogCaptureFixture) -> None:
    paused = RolloutPlan(THREE.waves, "paused")
    for plans in ((THREE, paused), (THREE, None), (None, THREE)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert releases(release_targets("1.2.0", *plans), HW, "stable") == []
        assert "skipping version 1.2.0: its images carry different rollout plans" in caplog.text


def test_select_skips_a_withdrawn_release_unless_named() -> None:
    withdrawn = RolloutPlan(THREE.waves, "withdrawn")
    paused = RolloutPlan(THREE.waves, "paused")
    targets = {
        **release_targets("1.1.0", None),
        **release_targets("1.2.0", paused),
        **release_targets("1.3.0", withdrawn),
    }

    def pick(installed: str, **kw: Any) -> str | None:
        chosen = select(targets, hardware=HW, channel="stable", installed_version=installed,
                        failed_versions=(), **kw)  # fmt: skip
        return None if chosen is None else chosen.version

    assert pick("1.0.0") == "1.2.0"  # paused is a candidate: the gate holds it
    assert pick("1.2.0") is None  # 1.3.0 is as if absent
    assert pick("1.3.0") is None  # a node running it waits for the next release
    assert pick("1.0.0", want_version="1.3.0") == "1.3.0"
    del targets[f"{HW}/1.2.0/root.img"]
    assert pick("1.0.0") == "1.1.0"  # the next older one is still offered


def test_withdrawn_in_cache_reads_the_verified_targets_json(tmp_path: Path) -> None:
    class Device:
        hardware = HW
        channel = "stable"

    withdrawn = RolloutPlan(THREE.waves, "withdrawn")
    targets = {
        **release_targets("1.2.0", withdrawn, withdrawn),
        **release_targets("1.3.0", THREE),
        **release_targets("1.4.0", withdrawn, THREE),  # disagreeing images: no release
    }
    doc = {"signed": {"targets": {p: t.to_dict() for p, t in targets.items()}}}
    doc["signed"]["targets"]["../bad"] = {"custom": None}  # skipped, as a node skips it
    (tmp_path / "targets.json").write_text(json.dumps(doc))
    assert withdrawn_in_cache(tmp_path, Device(), "1.2.0")
    for version in ("1.3.0", "1.4.0", "9.9.9"):
        assert not withdrawn_in_cache(tmp_path, Device(), version)
    (tmp_path / "targets.json").write_text("{not json")
    assert not withdrawn_in_cache(tmp_path, Device(), "1.2.0")
    assert not withdrawn_in_cache(tmp_path / "absent", Device(), "1.2.0")
