"""The rollout plan of a release, declared once: the waves of a phased rollout, signed
into every target of the release beside `custom.release` (`core.release`):

    "rollout": {"state": "active",
                "waves": [{"share": "0.05", "start": "2026-12-03T02:00:00Z"},
                          {"share": "0.25", "start": "2026-12-04T02:00:00Z"},
                          {"share": "1", "start": "2026-12-05T02:00:00Z"}]}

`share` is cumulative (the first 5% of the fleet, then up to 25%, then all), written as
a decimal string with at most 6 decimals: TUF signs canonical JSON, which has no
floats (securesystemslib refuses to encode one), and a string is exact. A node at
position p (`updater.rollout.position`) is in the first wave with p < share and may
install from that wave's `start`. `paused` holds every node that does not have the
release yet; `withdrawn` takes it off offer (`updater.select`).

`RolloutPlan.from_custom` parses the signed value (what a node accepts), `to_custom`
writes it, `parse_waves` reads the `--waves` spec of `sign-release`. `core.release`
re-exports these names; import them from there.

Invariants:

* A `RolloutPlan` is valid by construction (checked in `__post_init__`, whoever builds
  it, so `parse_waves`, `from_custom` and the signing tools share one rule): 1..20 waves,
  cumulative shares strictly increasing in (0, 1], multiples of 0.000001 (so the signed
  decimal is exactly the share), ending at exactly 1, starts aware
  UTC datetimes of whole seconds, non-decreasing; `from_custom(to_custom())` is the same
  plan.
* Unknown keys are refused, not ignored: a node must not install early because it does
  not understand a restriction a later version added.
* Pure: no I/O, no clock (`parse_waves` is given `now`); every refusal is a
  `FieldError` whose one line names the field (`rollout.waves[2].start`, `waves[0]`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from core.fielderror import FieldError, refuse

ROLLOUT_STATES: tuple[str, ...] = ("active", "paused", "withdrawn")
MAX_WAVES = 20
TIME_RULE = "YYYY-MM-DDTHH:MM:SSZ (UTC)"
_TIME_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")
# `--waves` items: SHARE@WHEN, SHARE a fraction (0.05) or a percentage (5%), WHEN an
# absolute UTC time (seconds optional), `+N` minutes/hours/days from now, or `now`.
# Digits are bounded so that no number is ever huge (1e309, 10**400): the rule, not a
# float conversion, refuses them.
_SHARE_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,6})?|\.[0-9]{1,6}|([0-9]{1,3}(?:\.[0-9]{1,4})?)%")
# The signed form: a decimal string, at most 6 decimals, no sign, exponent or spaces.
_SIGNED_SHARE_RE = re.compile(r"0\.[0-9]{1,6}|1(?:\.0{1,6})?")
SHARE_RULE = 'is not a decimal string in (0, 1] with at most 6 decimals ("0.05", "1")'
_DECIMALS = 6
_WHEN_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?Z")
_AFTER_RE = re.compile(r"\+([0-9]{1,6})([mhd])")
_AFTER_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
WHEN_RULE = "YYYY-MM-DDTHH:MM[:SS]Z (UTC), +N(m|h|d) from now, or now"
WAVES_RULE = (
    f"SHARE@WHEN[,SHARE@WHEN...]: SHARE a cumulative fraction (0.05) or percentage (5%), "
    f"WHEN {WHEN_RULE}"
)
_MAX_SPEC = 2048


def format_time(when: datetime) -> str:
    """`when` as the plan stores it: `YYYY-MM-DDTHH:MM:SSZ` (UTC, whole seconds)."""
    t = when.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"


def _utc(field: str, text: str, groups: Sequence[str | None]) -> datetime:
    year, month, day, hour, minute, second = (int(g or 0) for g in groups)
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as e:  # month 13, February 30, year 0
        raise refuse(FieldError, field, text, f"is not a valid date and time ({e})") from e


@dataclass(frozen=True)
class Wave:
    """One wave: nodes whose position is below `share` (cumulative, of the whole fleet)
    and not in an earlier wave may install from `start` (aware, UTC, whole seconds)."""

    share: float
    start: datetime


@dataclass(frozen=True)
class RolloutPlan:
    """The signed rollout plan of a release: its waves, and whether it is `active`,
    `paused` (no node that lacks it installs it) or `withdrawn` (not offered at all)."""

    waves: tuple[Wave, ...]
    state: str = "active"

    def __post_init__(self) -> None:
        if self.state not in ROLLOUT_STATES:
            rule = f"is not one of {', '.join(ROLLOUT_STATES)}"
            raise refuse(FieldError, "rollout.state", self.state, rule)
        _check_waves(self.waves, "rollout.waves")

    @classmethod
    def from_custom(cls, obj: object) -> RolloutPlan:
        """Parse the value of a target's `custom.rollout`; `FieldError` naming
        `rollout.<field>` and the rule otherwise."""
        if not isinstance(obj, dict):
            raise refuse(FieldError, "rollout", obj, "is not an object {state, waves}")
        unknown = sorted(map(str, set(obj) - {"state", "waves"}))
        if unknown:
            raise refuse(FieldError, "rollout", unknown[0], "is not a key of a rollout plan")
        waves = obj.get("waves")
        if not isinstance(waves, list) or not 1 <= len(waves) <= MAX_WAVES:
            rule = f"is not a list of 1 to {MAX_WAVES} waves"
            raise refuse(FieldError, "rollout.waves", waves, rule)
        parsed = []
        for i, wave in enumerate(waves):
            where = f"rollout.waves[{i}]"
            if not isinstance(wave, dict) or set(wave) != {"share", "start"}:
                raise refuse(FieldError, where, wave, "is not an object {share, start}")
            share, start = wave["share"], wave["start"]
            if not isinstance(share, str) or not _SIGNED_SHARE_RE.fullmatch(share):
                raise refuse(FieldError, f"{where}.share", share, SHARE_RULE)
            m = _TIME_RE.fullmatch(start) if isinstance(start, str) else None
            if m is None:
                raise refuse(FieldError, f"{where}.start", start, f"is not {TIME_RULE}")
            parsed.append(Wave(float(share), _utc(f"{where}.start", start, m.groups())))
        return cls(tuple(parsed), obj.get("state"))  # type: ignore[arg-type]

    def to_custom(self) -> dict[str, Any]:
        """The `custom.rollout` value this plan is parsed from (`from_custom`'s inverse)."""
        return {
            "state": self.state,
            "waves": [
                {"share": format_share(w.share), "start": format_time(w.start)} for w in self.waves
            ],
        }

    def describe(self) -> str:
        """One line for people: `paused: 5% 2026-12-03T02:00:00Z, 100% ...`."""
        waves = ", ".join(f"{_percent(w.share)} {format_time(w.start)}" for w in self.waves)
        return f"{self.state}: {waves}"


def _percent(share: float) -> str:
    return f"{share * 100:.4g}%"


def format_share(share: float) -> str:
    """`share` as the plan signs it: `0.05`, `1` (a valid share has at most 6 decimals)."""
    return f"{share:.{_DECIMALS}f}".rstrip("0").rstrip(".")


def _check_waves(waves: Sequence[Wave], where: str) -> None:
    """The rules of a plan's waves; `FieldError` naming `<where>[i].<field>`."""
    if not 1 <= len(waves) <= MAX_WAVES:
        rule = f"waves: a plan has 1 to {MAX_WAVES}"
        raise refuse(FieldError, where, len(waves), rule, f"{where}: {len(waves)} {rule}")
    for i, wave in enumerate(waves):
        share, start = wave.share, wave.start
        # Range first: NaN and infinities fail it, and a huge int is never converted.
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0 < share <= 1:
            rule = "is not a number in (0, 1] (a cumulative share of the fleet)"
            raise refuse(FieldError, f"{where}[{i}].share", share, rule)
        if round(share, _DECIMALS) != share:
            rule = f"has more than {_DECIMALS} decimals (the plan signs it as a decimal)"
            raise refuse(FieldError, f"{where}[{i}].share", share, rule)
        if i and share <= waves[i - 1].share:
            rule = f"is not above the share of the wave before ({waves[i - 1].share}; cumulative)"
            raise refuse(FieldError, f"{where}[{i}].share", share, rule)
        if (
            not isinstance(start, datetime)
            or start.utcoffset() != timedelta(0)
            or start.microsecond
        ):
            raise refuse(FieldError, f"{where}[{i}].start", start, "is not a whole UTC second")
        if i and start < waves[i - 1].start:
            rule = f"is before the start of the wave before ({format_time(waves[i - 1].start)})"
            raise refuse(FieldError, f"{where}[{i}].start", format_time(start), rule)
    if waves[-1].share != 1:
        rule = "is not 1: the last wave is the whole fleet"
        raise refuse(FieldError, f"{where}[{len(waves) - 1}].share", waves[-1].share, rule)


def parse_waves(spec: str, now: datetime) -> tuple[Wave, ...]:
    """The waves of a `--waves` spec, e.g. `0.05@2026-12-03T02:00Z,0.25@+1d,1@+2d`
    (relative times from `now`, an aware datetime); `FieldError` naming `waves[i]`."""
    now = now.astimezone(UTC).replace(microsecond=0)
    if not isinstance(spec, str) or not spec.strip() or len(spec) > _MAX_SPEC:
        rule = f"is empty or longer than {_MAX_SPEC} characters (expected {WAVES_RULE})"
        raise refuse(FieldError, "waves", spec, rule)
    items = spec.split(",")
    if len(items) > MAX_WAVES:
        rule = f"has {len(items)} waves: a plan has 1 to {MAX_WAVES}"
        raise refuse(FieldError, "waves", spec, rule)
    waves = []
    for i, item in enumerate(items):
        field = f"waves[{i}]"
        share_text, at, when = item.strip().partition("@")
        m = _SHARE_RE.fullmatch(share_text)
        if not at or m is None:
            raise refuse(FieldError, field, item, f"is not {WAVES_RULE}")
        # Decimal: 33.3333% is exactly 0.333333, not a float quotient next to it.
        exact = Decimal(share_text.rstrip("%")) / (100 if m.group(1) else 1)
        share = float(exact)
        waves.append(Wave(share, _when(field, item, when, now)))
    _check_waves(waves, "waves")
    return tuple(waves)


def _when(field: str, item: str, when: str, now: datetime) -> datetime:
    if when == "now":
        return now
    if m := _WHEN_RE.fullmatch(when):
        return _utc(field, item, m.groups())
    if m := _AFTER_RE.fullmatch(when):
        try:
            return now + timedelta(**{_AFTER_UNITS[m.group(2)]: int(m.group(1))})
        except OverflowError as e:
            raise refuse(FieldError, field, item, "is after the year 9999") from e
    rule = f"has a WHEN that is not {WHEN_RULE}"
    raise refuse(FieldError, field, item, rule)
