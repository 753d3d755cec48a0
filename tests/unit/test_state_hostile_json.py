"""A journal.json that is JSON the standard decoder cannot take - arrays nested past the
recursion limit, an integer of more than 4300 digits, NaN - is a damaged journal like
any other: `load_journal` falls back to the backup (or to an empty journal) and says
why, it does not raise. Found by the fuzz harness of the journal load path
(tests/fuzz/targets.py `journal`; the inputs are kept in tests/fuzz/crashes/journal/).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from updater.state import BACKUP_NAME, JOURNAL_NAME, Journal, load_journal, save_journal

HOSTILE = {
    "nested": b"[" * 100_000,
    "nested-in-field": b'{"schema": 1, "slots": ' + b"[" * 5000 + b"}",
    "long-int": b'{"schema": 1, "last_check": ' + b"7" * 5000 + b"}",
    "nan": b'{"schema": NaN}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_journal_is_damaged_not_a_crash(tmp_path: Path, name: str) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(HOSTILE[name])
    journal = load_journal(tmp_path)
    assert journal.slots == {}
    assert journal.last_error is not None
    assert f"journal {tmp_path / JOURNAL_NAME} is damaged" in journal.last_error
    assert "\n" not in journal.last_error


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_journal_falls_back_to_the_backup(tmp_path: Path, name: str) -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    good = Journal().with_installed("A", "1.0.0", now)
    save_journal(tmp_path, good)
    save_journal(tmp_path, good)  # the second save keeps the first as the backup
    assert (tmp_path / BACKUP_NAME).exists()
    (tmp_path / JOURNAL_NAME).write_bytes(HOSTILE[name])
    journal = load_journal(tmp_path)
    assert journal.version_in("A") == "1.0.0"
    assert journal.last_error is not None and "using the previous one" in journal.last_error
