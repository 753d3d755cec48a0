"""updater.state saves through `fsutil.atomic_write`: a journal.json that is a symlink
(e.g. to persistent storage) stays a symlink and its target is replaced, the journal is
0600, and the journal.json.bak backup of the previous good journal is still kept."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from updater.state import BACKUP_NAME, JOURNAL_NAME, Journal, load_journal, save_journal

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_symlinked_journal_is_written_through_its_link(tmp_path: Path) -> None:
    state, persistent = tmp_path / "state", tmp_path / "persistent"
    state.mkdir()
    persistent.mkdir()
    (state / JOURNAL_NAME).symlink_to(persistent / "journal.json")
    first = Journal().with_installed("A", "1.0.0", T0)
    save_journal(state, first)
    save_journal(state, first.with_check(None, T0))

    assert (state / JOURNAL_NAME).is_symlink()  # the link is kept, its target replaced
    assert load_journal(state) == first.with_check(None, T0)
    assert Journal.from_json(json.loads((persistent / "journal.json").read_text())) == (
        first.with_check(None, T0)
    )
    # The previous good journal is still kept next to the link.
    assert Journal.from_json(json.loads((state / BACKUP_NAME).read_text())) == first
    assert not any(p.name.endswith(".tmp") or ".journal" in p.name for p in persistent.iterdir())


def test_the_journal_is_private(tmp_path: Path) -> None:
    save_journal(tmp_path, Journal())
    save_journal(tmp_path, Journal().with_check(None, T0))
    assert (tmp_path / JOURNAL_NAME).stat().st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / BACKUP_NAME).st_mode & 0o777 == 0o600
