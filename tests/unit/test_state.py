"""updater.state: pure transitions, JSON round trip, atomic save, corruption fallback."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import UpdateFailed
from updater.state import (
    BACKUP_NAME,
    JOURNAL_NAME,
    MAX_FAILED_VERSIONS,
    Journal,
    JournalFormatError,
    load_journal,
    save_journal,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def installed() -> Journal:
    return Journal().with_installed("A", "1.0.0", T0).with_installed("B", "1.1.0", T0)


def test_transitions_are_pure_and_ordered() -> None:
    empty = Journal()
    journal = installed().with_pending("B", "1.1.0", T0)
    assert empty == Journal()  # the originals are untouched
    assert journal.pending is not None and journal.pending.slot == "B"
    assert journal.pending.since == "2026-01-02T03:04:05+00:00"
    assert journal.version_in("B") == "1.1.0"
    done = journal.committed()
    assert done.pending is None and journal.pending is not None
    assert done.version_in("B") == "1.1.0"


def test_with_good_commits_and_forgets_that_the_version_failed() -> None:
    journal = installed().with_failed("1.1.0", "health checks failed", T0)
    journal = journal.with_failed("1.0.9", "did not boot", T0).with_pending("B", "1.1.0", T0)
    good = journal.with_good("1.1.0")
    assert good.pending is None
    assert sorted(good.failed_versions) == ["1.0.9"]
    assert sorted(journal.failed_versions) == ["1.0.9", "1.1.0"]  # the original is untouched


def test_with_invalidated_forgets_the_slot_and_its_pending_boot() -> None:
    journal = installed().with_pending("B", "1.1.0", T0)
    gone = journal.with_invalidated("B")
    assert gone.version_in("B") is None and gone.pending is None
    assert gone.version_in("A") == journal.version_in("A")
    with pytest.raises(ValueError, match=r"slot B holds nothing"):
        gone.with_pending("B", "1.1.0", T0)


def test_pending_needs_the_version_installed_in_that_slot() -> None:
    with pytest.raises(ValueError, match=r"slot B holds nothing, not 2\.0"):
        Journal().with_pending("B", "2.0", T0)
    with pytest.raises(ValueError, match=r"slot A holds 1\.0\.0, not 2\.0"):
        installed().with_pending("A", "2.0", T0)
    with pytest.raises(ValueError, match="unknown slot 'C'"):
        Journal().with_installed("C", "2.0", T0)


def test_overwriting_the_pending_slot_clears_pending() -> None:
    journal = installed().with_pending("B", "1.1.0", T0).with_installed("B", "1.2.0", T0)
    assert journal.pending is None
    kept = installed().with_pending("B", "1.1.0", T0).with_installed("A", "1.2.0", T0)
    assert kept.pending is not None


def test_failed_versions() -> None:
    journal = installed().with_pending("B", "1.1.0", T0)
    failed = journal.with_failed("1.1.0", "health check\ncommand false exited 1", T0)
    assert failed.is_failed("1.1.0") and not failed.is_failed("1.0.0")
    assert failed.pending is None  # the failed version is no longer pending
    assert failed.failed_versions["1.1.0"].reason == "health check command false exited 1"


def test_failed_versions_are_bounded_oldest_first() -> None:
    journal = Journal()
    for i in range(MAX_FAILED_VERSIONS + 5):
        journal = journal.with_failed(f"v{i}", "bad", T0 + timedelta(seconds=i))
    assert len(journal.failed_versions) == MAX_FAILED_VERSIONS
    assert not journal.is_failed("v0") and journal.is_failed(f"v{MAX_FAILED_VERSIONS + 4}")


def test_check_records_time_and_error() -> None:
    journal = Journal().with_check("network down", T0)
    assert (journal.last_check, journal.last_error) == ("2026-01-02T03:04:05+00:00", "network down")
    assert Journal().with_check(None, T0).last_error is None


versions = st.text(alphabet="0123456789.-abc", min_size=1, max_size=12)


@given(
    a=versions,
    b=versions,
    reasons=st.dictionaries(versions, st.text(max_size=40)),
    pending=st.booleans(),
)
def test_json_round_trip(a: str, b: str, reasons: dict[str, str], pending: bool) -> None:
    journal = Journal().with_installed("A", a, T0).with_installed("B", b, T0)
    for version, reason in reasons.items():
        journal = journal.with_failed(version, reason, T0)
    if pending:
        journal = journal.with_pending("B", b, T0)
    journal = journal.with_check("boom", T0)
    assert Journal.from_json(json.loads(json.dumps(journal.to_json()))) == journal


def test_save_and_load(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert load_journal(state_dir) == Journal()  # nothing yet: empty, no error
    journal = installed().with_pending("B", "1.1.0", T0)
    save_journal(state_dir, journal)
    assert load_journal(state_dir) == journal
    data = json.loads((state_dir / JOURNAL_NAME).read_text())
    assert data["schema"] == 1 and data["pending"]["slot"] == "B"
    assert not (state_dir / BACKUP_NAME).exists()  # no previous journal to keep
    save_journal(state_dir, journal.committed())
    assert load_journal(state_dir) == journal.committed()
    assert json.loads((state_dir / BACKUP_NAME).read_text())["pending"]["slot"] == "B"
    assert sorted(p.name for p in state_dir.iterdir()) == [JOURNAL_NAME, BACKUP_NAME]


def test_crash_before_rename_keeps_the_old_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = installed()
    save_journal(tmp_path, old)
    before = (tmp_path / JOURNAL_NAME).read_bytes()

    def crash(src: object, dst: object) -> None:
        if str(dst).endswith(JOURNAL_NAME):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)  # type: ignore[arg-type]

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UpdateFailed, match=r"cannot write journal .*journal.json: Input/output"):
        save_journal(tmp_path, old.with_pending("B", "1.1.0", T0))
    monkeypatch.undo()
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before
    assert load_journal(tmp_path) == old
    # no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_NAME, BACKUP_NAME]


def test_backup_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(1, "Operation not permitted")  # what vfat answers

    save_journal(tmp_path, installed())
    monkeypatch.setattr(os, "link", no_links)
    save_journal(tmp_path, installed().with_check(None, T0))
    assert load_journal(tmp_path).last_check is not None
    assert Journal.from_json(json.loads((tmp_path / BACKUP_NAME).read_text())) == installed()


def test_unwritable_state_dir_is_update_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UpdateFailed, match=r"cannot write journal in .*file/state"):
        save_journal(blocker / "state", Journal())


@pytest.mark.parametrize(
    "damage",
    [
        b"",
        b'{"schema": 1, "slots": {',
        b"\xff\xfe",
        b"[]",
        b'{"schema": 99}',
        b'{"schema": 1, "slots": {"C": {}}, "pending": null, "failed_versions": {}, '
        b'"last_check": null, "last_error": null}',
    ],
)
def test_corrupt_journal_falls_back_to_backup(
    tmp_path: Path, damage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    good = installed()
    save_journal(tmp_path, good)
    save_journal(tmp_path, good.with_pending("A", "1.0.0", T0))  # good one -> .bak
    (tmp_path / JOURNAL_NAME).write_bytes(damage)
    with caplog.at_level(logging.WARNING, logger="updater.state"):
        loaded = load_journal(tmp_path)
    assert loaded.slots == good.slots and loaded.pending is None
    assert loaded.last_error is not None
    assert "is damaged" in loaded.last_error and "using the previous one" in loaded.last_error
    assert loaded.last_error in caplog.text
    # saving again must not overwrite the good backup with the damaged file
    save_journal(tmp_path, loaded)
    assert load_journal(tmp_path).slots == good.slots
    assert Journal.from_json(json.loads((tmp_path / BACKUP_NAME).read_text())) == good


def test_both_damaged_gives_an_empty_journal(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_text("{")
    (tmp_path / BACKUP_NAME).write_text("}")
    loaded = load_journal(tmp_path)
    assert loaded.slots == {} and loaded.last_error is not None
    assert "starting an empty journal" in loaded.last_error


def test_missing_journal_with_backup_uses_backup(tmp_path: Path) -> None:
    save_journal(tmp_path, installed())
    save_journal(tmp_path, installed().with_check(None, T0))
    (tmp_path / JOURNAL_NAME).unlink()
    loaded = load_journal(tmp_path)
    assert loaded.slots == installed().slots
    assert loaded.last_error is not None and "is missing" in loaded.last_error


def test_oversized_journal_is_not_read_whole(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(b" " * (2 * 1024 * 1024))
    loaded = load_journal(tmp_path)
    assert loaded.last_error is not None and "larger than" in loaded.last_error


def test_fleet_records_round_trip_and_old_journals_load(tmp_path: Path) -> None:
    j = (
        Journal()
        .with_installed("B", "2.0.0", T0)
        .with_install_record("B", "2.0.0", 1234, 5.25, T0, reused={"A": 4096, "B": 512})
        .with_commit_record("B", "2.0.0", T0)
        .with_lock("workers")
        .with_waiting("window: next opens\n 2026-12-03T02:00:00+00:00")
    )
    assert j.waiting == "window: next opens 2026-12-03T02:00:00+00:00"
    again = Journal.from_json(json.loads(json.dumps(j.to_json())))
    assert again == j
    assert again.last_install is not None and again.last_install.bytes_fetched == 1234
    assert again.last_install.bytes_reused == {"A": 4096, "B": 512}
    assert j.to_json()["last_install"]["bytes_reused"] == {"A": 4096, "B": 512}
    # An install record written before delta updates has no bytes_reused: nothing reused.
    before_delta = j.to_json()
    del before_delta["last_install"]["bytes_reused"]
    assert Journal.from_json(before_delta).last_install.bytes_reused == {}  # type: ignore[union-attr]
    # A journal written before these fields existed has none of their keys.
    old = {k: v for k, v in j.to_json().items()}
    for key in ("last_install", "last_commit", "lock_held", "waiting"):
        del old[key]
    loaded = Journal.from_json(old)
    assert loaded.last_install is None and loaded.lock_held is None and loaded.waiting is None


@pytest.mark.parametrize(
    "field, value",
    [
        (
            "last_install",
            {"version": "1", "slot": "C", "at": "x", "bytes_fetched": 1, "seconds": 1},
        ),
        (
            "last_install",
            {"version": "1", "slot": "A", "at": "x", "bytes_fetched": -1, "seconds": 1},
        ),
        (
            "last_install",
            {"version": "1", "slot": "A", "at": "x", "bytes_fetched": True, "seconds": 1},
        ),
        (
            "last_install",
            {"version": "1", "slot": "A", "at": "x", "bytes_fetched": 1, "seconds": 1e300},
        ),
        (
            "last_install",
            {
                "version": "1",
                "slot": "A",
                "at": "x",
                "bytes_fetched": 1,
                "seconds": 1,
                "bytes_reused": {"C": 1},
            },
        ),
        (
            "last_install",
            {
                "version": "1",
                "slot": "A",
                "at": "x",
                "bytes_fetched": 1,
                "seconds": 1,
                "bytes_reused": {"A": -1},
            },
        ),
        (
            "last_install",
            {
                "version": "1",
                "slot": "A",
                "at": "x",
                "bytes_fetched": 1,
                "seconds": 1,
                "bytes_reused": [1],
            },
        ),
        ("last_commit", {"version": 3, "slot": "A", "at": "x"}),
        ("last_commit", []),
        ("lock_held", 7),
        ("waiting", {"a": 1}),
    ],
)
def test_damaged_fleet_records_are_a_damaged_journal(field: str, value: object) -> None:
    data = Journal().to_json()
    data[field] = value
    with pytest.raises(JournalFormatError):
        Journal.from_json(data)
