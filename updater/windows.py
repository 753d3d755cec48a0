"""Maintenance windows: when the agent may reboot a node into a new slot.

`[daemon] windows = ["Mon-Fri 02:00-04:00", "Sat 00:00-06:00"]` with `timezone =
"Europe/Berlin"`: downloads happen any time, the reboot waits for a window. Pure: no I/O
besides zoneinfo reading the zone's tz database file once.

Grammar of one window: ``DAYS HH:MM-HH:MM``. DAYS is `*`, a day (`Mon`), a range
(`Mon-Fri`; `Fri-Mon` wraps over the week end) or a comma list of those (`Sat,Sun`); the
days name where a window *starts*. An end at or before the start crosses midnight
(`Fri 22:00-02:00` ends on Saturday 02:00, `Sun 23:00-01:00` on Monday 01:00); `24:00` is
an end only. A window whose start equals its end is refused: it could mean nothing or a
whole day (write `00:00-24:00` for that).

Invariants kept here:

* the rule is the wall clock's: an instant is open iff the clock of `timezone` reads,
  at that instant, a time inside a window. So on the day clocks spring forward the hour
  that does not exist opens nothing (`Sun 02:00-03:00` in Europe/Berlin on the last
  Sunday of March is skipped; `01:30-03:30` is open 01:30-02:00 CET and 03:00-03:30
  CEST), and the hour that repeats in autumn is open both times it is lived. A node is
  never rebooted while the wall clock reads a time the operator did not allow;
* `next_open(t)` is the first instant >= t that `is_open` accepts (t itself when open):
  found exactly, segment by segment of constant UTC offset, never by sampling;
* no windows means always open; `"UTC"` needs no tz database (datetime.timezone.utc);
  every bad spec or zone is one `WindowError` line naming the spec, its index and why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY = 24 * 60  # minutes
_WEEK = 7 * _DAY
# The longest wait before a window opens is a week, plus a skipped window (its hour
# sprang forward), plus DST shifts: two years is far beyond any zone of the tz database.
_HORIZON = timedelta(days=2 * 366)
# Offset changes are searched for at this step, then located to the second. Two changes
# less than this apart that cancel out would be missed: no zone has had such a pair.
_PROBE = timedelta(hours=1)
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+.-]+)*", re.ASCII)
_TIME = re.compile(r"([0-9]{1,2}):([0-9]{2})", re.ASCII)
_SHOWN = 40


class WindowError(ValueError):
    """A bad window spec (`index` is its position) or time zone (`index` is None)."""

    def __init__(self, reason: str, spec: str | None = None, index: int | None = None) -> None:
        self.reason = reason
        self.spec = spec
        self.index = index
        super().__init__(reason if index is None else f"windows[{index}] {self.described}")

    @property
    def described(self) -> str:
        """The spec and why it is refused, without its index: "'Mon 2:00-x': ..."."""
        return self.reason if self.spec is None else f"{_shown(self.spec)}: {self.reason}"


@dataclass(frozen=True)
class Windows:
    """Parsed windows: weekly intervals of wall-clock minutes in `zone`."""

    specs: tuple[str, ...]
    timezone: str
    zone: tzinfo
    # Disjoint, sorted, non-adjacent [start, end) minutes of the week (Monday 00:00 = 0),
    # none crossing the week's end (a window that does is split in two).
    intervals: tuple[tuple[int, int], ...]

    def is_open(self, now: datetime) -> bool:
        """Whether the wall clock of the zone reads a time inside a window at `now`."""
        if not self.intervals:
            return True
        return self._wall_open(_wall(_aware(now), self.zone)) == timedelta(0)

    def next_open(self, now: datetime) -> datetime | None:
        """The first instant >= `now` that is open (`now` itself when open), in the
        time zone of `now`; None if none opens within two years (no real zone does)."""
        now = _aware(now)
        if not self.intervals:
            return now
        try:
            t = now.astimezone(UTC)
            limit = t + _HORIZON
            while t < limit:
                offset = _offset(t, self.zone)
                # Within one offset, wall time = UTC + offset: the first open wall time
                # at or after t's is the first open instant, if no offset change comes
                # first; if one does, start over from it.
                candidate = t + self._wall_open((t + offset).replace(tzinfo=None))
                change = _offset_change(t, candidate, offset, self.zone)
                if change is None:
                    return now if candidate == now else candidate.astimezone(now.tzinfo)
                t = change
        except OverflowError:  # near datetime.max
            return None
        return None

    def _wall_open(self, wall: datetime) -> timedelta:
        """How long after the naive wall-clock time `wall` a window is open (0: now)."""
        position = timedelta(
            days=wall.weekday(),
            hours=wall.hour,
            minutes=wall.minute,
            seconds=wall.second,
            microseconds=wall.microsecond,
        )
        for start, end in self.intervals:
            if position < timedelta(minutes=end):
                return max(timedelta(minutes=start) - position, timedelta(0))
        return timedelta(minutes=self.intervals[0][0] + _WEEK) - position


def parse_windows(specs: Sequence[str], timezone: str) -> Windows:
    """The `Windows` of `specs` in the IANA zone `timezone` (WindowError otherwise)."""
    zone = resolve_zone(timezone)
    pieces: list[tuple[int, int]] = []
    for index, spec in enumerate(specs):
        for start, end in _parse_one(spec, index):
            if end <= _WEEK:
                pieces.append((start, end))
            else:  # crosses Sunday midnight: the rest is at the start of the week
                pieces.extend(((start, _WEEK), (0, end - _WEEK)))
    return Windows(tuple(specs), timezone, zone, _merged(pieces))


def resolve_zone(name: str) -> tzinfo:
    """The tzinfo of the IANA zone `name`; "UTC" without any tz database."""
    if name == "UTC":
        return UTC
    if len(name) > 255 or not _ZONE_NAME.fullmatch(name):
        raise WindowError(f"{_shown(name)} is not a time zone name (e.g. Europe/Berlin, UTC)")
    if name.startswith("right/"):
        raise WindowError(
            f"{_shown(name)} counts leap seconds, which the system clock does not "
            f"(use {name.removeprefix('right/')!r})"
        )
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:
        raise WindowError(
            f"unknown time zone {_shown(name)} (an IANA name such as Europe/Berlin, "
            "found neither in the system's tz database nor in the tzdata package)"
        ) from None
    except (ValueError, OSError) as err:  # not a TZif file, unreadable
        raise WindowError(f"time zone {_shown(name)} cannot be loaded: {err}") from err


# --- parsing -----------------------------------------------------------------------------


def _parse_one(spec: object, index: int) -> list[tuple[int, int]]:
    """[start, end) minutes of the week of each day of one spec; end may pass the week."""
    if not isinstance(spec, str):
        raise WindowError("must be a string such as 'Mon-Fri 02:00-04:00'", "", index)
    fields = spec.rsplit(None, 1)
    if len(fields) != 2:
        raise WindowError("must be DAYS HH:MM-HH:MM, e.g. 'Mon-Fri 02:00-04:00'", spec, index)
    days_text, times = fields
    if times.count("-") != 1:
        raise WindowError(f"{_shown(times)} is not a time range HH:MM-HH:MM", spec, index)
    start_text, end_text = times.split("-")
    start = _minutes(start_text, spec, index, end=False)
    end = _minutes(end_text, spec, index, end=True)
    if start == end % _DAY and end != _DAY:
        raise WindowError(
            f"starts and ends at {start_text}: a zero-length window "
            "(for a whole day write 00:00-24:00)",
            spec,
            index,
        )
    length = end - start if end > start else end + _DAY - start
    return [
        (day * _DAY + start, day * _DAY + start + length) for day in _days(days_text, spec, index)
    ]


def _minutes(text: str, spec: str, index: int, *, end: bool) -> int:
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise WindowError(f"{_shown(text)} is not a time HH:MM", spec, index)
    hours, minutes = int(match[1]), int(match[2])
    if hours == 24 and minutes == 0:
        if not end:
            raise WindowError(
                "24:00 is only an end (a window starting at midnight: 00:00)", spec, index
            )
        return _DAY
    if hours > 23 or minutes > 59:
        raise WindowError(
            f"{text.strip()} is not a time of day (00:00 to 23:59, or 24:00 as an end)", spec, index
        )
    return hours * 60 + minutes


def _days(text: str, spec: str, index: int) -> list[int]:
    """The weekdays (Monday = 0) of `*`, `Mon`, `Mon-Fri`, `Fri-Mon`, `Sat,Sun`, ..."""
    items = [item.strip() for item in text.split(",")]
    if items == ["*"]:
        return list(range(7))
    days: set[int] = set()
    for item in items:
        if item == "*":
            raise WindowError("'*' (every day) stands alone, not in a list", spec, index)
        bounds = [_day(part.strip(), spec, index) for part in item.split("-")]
        if len(bounds) > 2:
            raise WindowError(f"{_shown(item)} is not a day or a range of days", spec, index)
        first, last = bounds[0], bounds[-1]
        days.update((first + step) % 7 for step in range((last - first) % 7 + 1))
    return sorted(days)


def _day(text: str, spec: str, index: int) -> int:
    for number, name in enumerate(DAY_NAMES):
        if text.casefold() == name.casefold():
            return number
    known = ", ".join(DAY_NAMES)
    raise WindowError(f"{_shown(text)} is not a day ({known}, or * for every day)", spec, index)


def _merged(pieces: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Overlapping and touching intervals as one: `Mon 02:00-04:00` + `Mon 03:00-05:00`."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(pieces):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


# --- time --------------------------------------------------------------------------------


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{now.isoformat()} has no time zone (an aware datetime is needed)")
    return now


def _wall(instant: datetime, zone: tzinfo) -> datetime:
    """The naive wall-clock time the clocks of `zone` read at `instant`."""
    return instant.astimezone(zone).replace(tzinfo=None)


def _offset(instant: datetime, zone: tzinfo) -> timedelta:
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None  # astimezone into a tzinfo of the tz database or UTC
    return offset


def _offset_change(
    start: datetime, stop: datetime, offset: timedelta, zone: tzinfo
) -> datetime | None:
    """The first instant in (start, stop] whose UTC offset in `zone` is not `offset`."""
    if zone is UTC:
        return None
    probe = start
    while probe < stop:
        previous, probe = probe, min(probe + _PROBE, stop)
        if _offset(probe, zone) != offset:
            return _locate(previous, probe, offset, zone)
    return None


def _locate(before: datetime, after: datetime, offset: timedelta, zone: tzinfo) -> datetime:
    """The instant of the offset change in (before, after]: tz database transitions
    are at whole seconds, so bisect over whole seconds."""
    low = math.floor(before.timestamp())  # has `offset`: it is at or before `before`
    high = math.ceil(after.timestamp())  # has another: it is at or after `after`
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(datetime.fromtimestamp(middle, UTC), zone) == offset:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


def _shown(value: str) -> str:
    shown = repr(value)
    return shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
