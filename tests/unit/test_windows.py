"""updater.windows: the grammar, its one-line errors, the wall-clock rule across DST
(Europe/Berlin, America/New_York), and properties: `next_open` is the first open instant
and `is_open` agrees with a direct reading of the specs."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from updater.windows import DAY_NAMES, WindowError, Windows, parse_windows

REPO = Path(__file__).resolve().parents[2]
BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
MINUTE = timedelta(minutes=1)
COUNTS: dict[str, int] = {}


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def open_spans(
    windows: Windows, start: datetime, stop: datetime
) -> list[tuple[datetime, datetime]]:
    """The open [from, to) spans between two instants, walked with next_open at minute
    steps (the windows of these tests open and close on whole minutes of UTC)."""
    spans: list[tuple[datetime, datetime]] = []
    t = start
    while t < stop:
        if windows.is_open(t):
            begin = t
            while t < stop and windows.is_open(t):
                t += MINUTE
            spans.append((begin, t))
        else:
            t += MINUTE
    return spans


# --- grammar -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "intervals"),
    [
        ("Mon 02:00-04:00", ((120, 240),)),
        ("mon 2:00-4:00", ((120, 240),)),  # case and one-digit hours
        ("Tue-Thu 00:00-01:00", ((1440, 1500), (2880, 2940), (4320, 4380))),
        ("Sat,Sun 00:00-06:00", ((7200, 7560), (8640, 9000))),
        ("Sat, Sun 00:00-06:00", ((7200, 7560), (8640, 9000))),
        ("Fri-Mon 10:00-11:00", ((600, 660), (6360, 6420), (7800, 7860), (9240, 9300))),
        ("Fri 22:00-02:00", ((7080, 7320),)),  # ends Saturday 02:00
        ("Sun 23:00-01:00", ((0, 60), (10020, 10080))),  # ends Monday 01:00
        ("Mon 22:00-24:00", ((1320, 1440),)),
        ("Mon 00:00-24:00", ((0, 1440),)),
        ("Mon 03:00-02:00", ((180, 1560),)),  # 23 hours
        ("* 00:00-24:00", ((0, 10080),)),
        ("Mon-Mon 01:00-02:00", ((60, 120),)),
    ],
)
def test_grammar(spec: str, intervals: tuple[tuple[int, int], ...]) -> None:
    assert parse_windows([spec], "UTC").intervals == intervals


def test_overlapping_and_touching_windows_merge() -> None:
    windows = parse_windows(["Mon 02:00-04:00", "Mon 03:00-05:00", "Mon 05:00-06:00"], "UTC")
    assert windows.intervals == ((120, 360),)
    assert parse_windows(["Sun 22:00-02:00", "Mon 01:00-03:00"], "UTC").intervals == (
        (0, 180),
        (9960, 10080),
    )


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("Mon 02:00-02:00", "starts and ends at 02:00: a zero-length window"),
        ("Mon 00:00-00:00", "starts and ends at 00:00: a zero-length window"),
        ("Mon 24:00-02:00", "24:00 is only an end"),
        ("Mon 25:00-26:00", "25:00 is not a time of day"),
        ("Mon 01:60-02:00", "01:60 is not a time of day"),
        ("Mon 24:30-02:00", "24:30 is not a time of day"),
        ("Mon 1-2", "'1' is not a time HH:MM"),
        ("Mon 01:00", "'01:00' is not a time range HH:MM-HH:MM"),
        ("Mon 01:00-02:00-03:00", "is not a time range"),
        ("Mon", "must be DAYS HH:MM-HH:MM"),
        ("", "must be DAYS HH:MM-HH:MM"),
        ("Monday 01:00-02:00", "'Monday' is not a day (Mon, Tue"),
        ("Mon-Tue-Wed 01:00-02:00", "'Mon-Tue-Wed' is not a day or a range of days"),
        ("Mon,,Tue 01:00-02:00", "'' is not a day"),
        ("*,Mon 01:00-02:00", "'*' (every day) stands alone"),
        ("Mon \uff101:00-02:00", "is not a time HH:MM"),  # a fullwidth digit
    ],
)
def test_bad_spec_is_one_line_naming_index_and_spec(spec: str, reason: str) -> None:
    with pytest.raises(WindowError) as info:
        parse_windows(["Sat 00:00-06:00", spec], "UTC")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"windows[1] {spec!r}: ")
    assert reason in message
    assert info.value.index == 1 and info.value.spec == spec


def test_a_long_spec_is_shortened_in_the_message() -> None:
    with pytest.raises(WindowError) as info:
        parse_windows(["Mon" * 10_000 + " 01:00-02:00"], "UTC")
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    ("zone", "reason"),
    [
        ("Mars/Olympus_Mons", "unknown time zone 'Mars/Olympus_Mons'"),
        ("europe/berlin", "unknown time zone"),
        ("/etc/passwd", "is not a time zone name"),
        ("../etc/passwd", "is not a time zone name"),
        ("Europe/../UTC", "cannot be loaded"),
        ("Europe/Berlin ", "is not a time zone name"),
        ("a\0b", "is not a time zone name"),
        ("", "is not a time zone name"),
        ("x" * 5000, "is not a time zone name"),
        ("zone.tab", "is not a time zone name"),
        ("leapseconds", "cannot be loaded: Invalid TZif file"),  # a file of the database
        ("right/UTC", "counts leap seconds"),
    ],
)
def test_bad_zone_is_one_line(zone: str, reason: str) -> None:
    with pytest.raises(WindowError) as info:
        parse_windows(["Mon 01:00-02:00"], zone)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert reason in str(info.value)
    assert info.value.index is None


# --- the wall-clock rule -------------------------------------------------------------


def test_no_windows_is_always_open() -> None:
    windows = parse_windows([], "Europe/Berlin")
    now = utc(2026, 3, 29, 1, 30)
    assert windows.is_open(now) and windows.next_open(now) is now


def test_open_closed_and_next_open_in_utc() -> None:
    windows = parse_windows(["Mon-Fri 02:00-04:00", "Sat 00:00-06:00"], "UTC")
    monday = utc(2026, 12, 7)  # a Monday
    assert not windows.is_open(monday)
    assert windows.next_open(monday) == monday.replace(hour=2)
    assert windows.is_open(monday.replace(hour=2))
    assert windows.is_open(monday.replace(hour=3, minute=59, second=59, microsecond=999999))
    assert not windows.is_open(monday.replace(hour=4))
    # Friday 04:00 -> Saturday 00:00; Saturday 06:00 -> Monday 02:00.
    assert windows.next_open(utc(2026, 12, 11, 4)) == utc(2026, 12, 12, 0)
    assert windows.next_open(utc(2026, 12, 12, 6)) == utc(2026, 12, 14, 2)


def test_next_open_when_open_returns_now_itself() -> None:
    windows = parse_windows(["* 02:00-04:00"], "Europe/Berlin")
    now = datetime(2026, 7, 1, 3, 15, 7, 12, tzinfo=BERLIN)
    assert windows.next_open(now) is now


def test_next_open_answers_in_the_zone_of_now() -> None:
    windows = parse_windows(["Mon 02:00-04:00"], "Europe/Berlin")
    now = datetime(2026, 12, 6, 12, tzinfo=NEW_YORK)  # a Sunday
    found = windows.next_open(now)
    assert found is not None and found.tzinfo is NEW_YORK
    assert found == datetime(2026, 12, 7, 2, tzinfo=BERLIN)


def test_naive_datetimes_are_refused() -> None:
    windows = parse_windows(["Mon 02:00-04:00"], "UTC")
    with pytest.raises(ValueError, match="has no time zone"):
        windows.is_open(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="has no time zone"):
        windows.next_open(datetime(2026, 1, 1))


def test_crossing_midnight_and_the_week_end() -> None:
    windows = parse_windows(["Fri 22:00-02:00", "Sun 23:00-01:00"], "UTC")
    assert open_spans(windows, utc(2026, 12, 4), utc(2026, 12, 8)) == [
        (utc(2026, 12, 4, 22), utc(2026, 12, 5, 2)),  # Friday into Saturday
        (utc(2026, 12, 6, 23), utc(2026, 12, 7, 1)),  # Sunday into Monday
    ]


def test_fri_mon_wraps_over_the_week_end() -> None:
    windows = parse_windows(["Fri-Mon 12:00-13:00"], "UTC")
    opened = [s for s, _ in open_spans(windows, utc(2026, 12, 7), utc(2026, 12, 14))]
    assert [d.strftime("%a") for d in opened] == ["Mon", "Fri", "Sat", "Sun"]


def test_berlin_spring_forward_skips_the_hour_that_does_not_exist() -> None:
    # 2026-03-29 02:00 CET (01:00Z) the clocks jump to 03:00 CEST.
    windows = parse_windows(["Sun 02:00-03:00"], "Europe/Berlin")
    assert not any(windows.is_open(utc(2026, 3, 29, 0) + k * MINUTE) for k in range(180))
    assert windows.next_open(utc(2026, 3, 28, 12)) == datetime(2026, 4, 5, 2, tzinfo=BERLIN)
    assert windows.next_open(utc(2026, 3, 28, 12)) == utc(2026, 4, 5, 0)


def test_berlin_spring_forward_window_around_the_gap_is_open_on_both_sides() -> None:
    windows = parse_windows(["Sun 01:30-03:30"], "Europe/Berlin")
    # 01:30-02:00 CET and 03:00-03:30 CEST: one real hour, 00:30Z-01:30Z.
    assert open_spans(windows, utc(2026, 3, 28, 20), utc(2026, 3, 29, 6)) == [
        (utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 30))
    ]
    # A window that starts inside the gap opens when the clocks jump past its start.
    late = parse_windows(["Sun 02:30-04:00"], "Europe/Berlin")
    assert late.next_open(utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1)  # 03:00 CEST
    assert not late.is_open(utc(2026, 3, 29, 1) - timedelta(microseconds=1))


def test_berlin_fall_back_repeated_hour_is_open_both_times() -> None:
    # 2026-10-25 03:00 CEST (01:00Z) the clocks go back to 02:00 CET.
    windows = parse_windows(["Sun 02:00-03:00"], "Europe/Berlin")
    assert open_spans(windows, utc(2026, 10, 24, 20), utc(2026, 10, 25, 6)) == [
        (utc(2026, 10, 25, 0), utc(2026, 10, 25, 2))
    ]
    # 01:00-02:30: open 01:00-02:30 CEST, closed 02:30-03:00 CEST, open again when the
    # clocks go back to 02:00 - an instant whose wall time is not the window's start.
    earlier = parse_windows(["Sun 01:00-02:30"], "Europe/Berlin")
    assert earlier.next_open(utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 25, 1)
    assert open_spans(earlier, utc(2026, 10, 24, 20), utc(2026, 10, 25, 6)) == [
        (utc(2026, 10, 24, 23), utc(2026, 10, 25, 0, 30)),
        (utc(2026, 10, 25, 1), utc(2026, 10, 25, 1, 30)),
    ]


def test_berlin_window_crossing_midnight_into_the_gap() -> None:
    windows = parse_windows(["Sat 23:00-03:00"], "Europe/Berlin")
    # Saturday 23:00 CET (22:00Z) to 03:00 CEST (01:00Z): three real hours, not four.
    assert open_spans(windows, utc(2026, 3, 28, 12), utc(2026, 3, 29, 12)) == [
        (utc(2026, 3, 28, 22), utc(2026, 3, 29, 1))
    ]


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2026-03-08 02:00 EST (07:00Z) -> 03:00 EDT; 2026-11-01 02:00 EDT (06:00Z) -> 01:00 EST.
    spring = parse_windows(["Sun 02:30-03:30"], "America/New_York")
    assert spring.next_open(utc(2026, 3, 7, 12)) == utc(2026, 3, 8, 7)  # 03:00 EDT
    assert open_spans(spring, utc(2026, 3, 8, 0), utc(2026, 3, 8, 12)) == [
        (utc(2026, 3, 8, 7), utc(2026, 3, 8, 7, 30))
    ]
    fall = parse_windows(["Sun 01:00-02:00"], "America/New_York")
    assert open_spans(fall, utc(2026, 11, 1, 0), utc(2026, 11, 1, 12)) == [
        (utc(2026, 11, 1, 5), utc(2026, 11, 1, 7))  # 01:00 EDT to 02:00 EST
    ]
    # (PEP 495: an ambiguous 01:00 New York time never equals a UTC one; compare in UTC.)
    found = fall.next_open(utc(2026, 11, 1, 4))
    assert found is not None and found == utc(2026, 11, 1, 5)
    assert found.astimezone(NEW_YORK).replace(tzinfo=None) == datetime(2026, 11, 1, 1)


def test_dst_days_windows_keep_their_wall_clock_times() -> None:
    # The days around a change: the same wall-clock window, an hour apart in UTC.
    windows = parse_windows(["* 04:00-05:00"], "America/New_York")
    assert windows.next_open(utc(2026, 3, 7, 12)) == utc(2026, 3, 8, 8)  # 04:00 EDT
    assert windows.next_open(utc(2026, 3, 6, 12)) == utc(2026, 3, 7, 9)  # 04:00 EST


# --- without a tz database -----------------------------------------------------------

NO_TZDATA = "import sys; sys.modules['tzdata'] = None\n"  # the fallback package, hidden


def run_python(code: str, tzpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONTZPATH": str(tzpath), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_utc_needs_no_tz_database(tmp_path: Path) -> None:
    code = NO_TZDATA + (
        "from datetime import datetime, UTC\n"
        "from updater.windows import parse_windows, WindowError\n"
        "w = parse_windows(['Mon 02:00-04:00'], 'UTC')\n"
        "print(w.next_open(datetime(2026, 12, 6, tzinfo=UTC)).isoformat())\n"
        "try:\n"
        "    parse_windows([], 'Europe/Berlin')\n"
        "except WindowError as err:\n"
        "    print(err)\n"
    )
    result = run_python(code, tmp_path)  # an empty directory: no zone anywhere
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "2026-12-07T02:00:00+00:00"
    assert lines[1].startswith("unknown time zone 'Europe/Berlin' (an IANA name")


def test_named_zones_fall_back_to_the_tzdata_package(tmp_path: Path) -> None:
    pytest.importorskip("tzdata")
    code = (
        "from datetime import datetime, UTC\n"
        "from updater.windows import parse_windows\n"
        "w = parse_windows(['Sun 02:00-03:00'], 'Europe/Berlin')\n"
        "print(w.next_open(datetime(2026, 3, 28, 12, tzinfo=UTC)).isoformat())\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2026-04-05T00:00:00+00:00"


# --- properties ------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # DST of 30 minutes
    "Pacific/Chatham",  # UTC+12:45 / +13:45
    "Asia/Kolkata",
    "America/Sao_Paulo",
    "Africa/Casablanca",  # DST suspended every Ramadan: four changes a year
]
TIMES = st.builds("{:02d}:{:02d}".format, st.integers(0, 23), st.sampled_from([0, 15, 30, 45]))
DAYS = st.one_of(
    st.just("*"),
    st.sampled_from(DAY_NAMES),
    st.builds("{}-{}".format, st.sampled_from(DAY_NAMES), st.sampled_from(DAY_NAMES)),
    st.lists(st.sampled_from(DAY_NAMES), min_size=1, max_size=3).map(",".join),
)
SPEC = st.builds(
    "{} {}-{}".format, DAYS, TIMES, TIMES | st.just("24:00") | st.just("00:00")
).filter(lambda spec: spec.split()[1].split("-")[0] != spec.split()[1].split("-")[1])
INSTANTS = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)
)


def spec_is_open(spec: str, wall: datetime) -> bool:
    """Whether `spec` covers the naive wall time `wall`, read directly from its text."""
    days_text, times = spec.split()
    start_text, end_text = times.split("-")
    start = int(start_text[:2]) * 60 + int(start_text[3:])
    end = int(end_text[:2]) * 60 + int(end_text[3:])
    if days_text == "*":
        days = set(range(7))
    else:
        days = set()
        for item in days_text.split(","):
            first, _, last = item.partition("-")
            a, b = DAY_NAMES.index(first), DAY_NAMES.index(last or first)
            days.update((a + k) % 7 for k in range((b - a) % 7 + 1))
    minute = wall.hour * 60 + wall.minute + (wall.second + wall.microsecond / 1e6) / 60
    if end > start:
        return wall.weekday() in days and start <= minute < end
    return (wall.weekday() in days and minute >= start) or (
        (wall.weekday() - 1) % 7 in days and minute < end
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(SPEC, min_size=1, max_size=3),
    zone=st.sampled_from(ZONES),
    now=INSTANTS,
)
def test_next_open_is_the_first_open_instant(specs: list[str], zone: str, now: datetime) -> None:
    COUNTS["next_open"] = COUNTS.get("next_open", 0) + 1
    windows = parse_windows(specs, zone)
    found = windows.next_open(now)
    assert found is not None and found >= now
    assert windows.is_open(found)
    if found > now:
        assert not windows.is_open(found - timedelta(microseconds=1))
    steps = int((found - now) / MINUTE)
    COUNTS["minutes sampled"] = COUNTS.get("minutes sampled", 0) + steps
    for step in range(steps):
        assert not windows.is_open(now + step * MINUTE), (now + step * MINUTE).isoformat()


@settings(max_examples=1000, deadline=None)
@given(
    specs=st.lists(SPEC, min_size=1, max_size=4),
    zone=st.sampled_from(ZONES),
    now=INSTANTS,
)
def test_is_open_reads_the_wall_clock(specs: list[str], zone: str, now: datetime) -> None:
    COUNTS["is_open"] = COUNTS.get("is_open", 0) + 1
    windows = parse_windows(specs, zone)
    wall = now.astimezone(windows.zone).replace(tzinfo=None)
    assert windows.is_open(now) == any(spec_is_open(spec, wall) for spec in specs)


def test_report_example_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """Printed with `-s`: how many inputs the property tests above tried in this run."""
    with capsys.disabled():
        print(f"\nwindows property tests, examples tried: {COUNTS}")
