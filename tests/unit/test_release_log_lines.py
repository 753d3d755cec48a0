"""`core.release.releases` logs each target it skips; a signed target path is untrusted
text and may hold a newline or a carriage return, which must not start a new (forged)
line in the agent's log. Found by the release_targets fuzz target (the input is kept in
tests/fuzz/crashes/release_targets/)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from tuf.api.metadata import TargetFile  # type: ignore[attr-defined]

from core.release import build_custom, releases

GOOD: dict[str, Any] = {
    "version": "1.0.0",
    "hardware": ["x86_64-efi"],
    "channel": "stable",
    "role": "root",
    "compression": "none",
    "raw_length": 3,
    "raw_sha256": "0" * 64,
}


def target(path: str) -> TargetFile:
    info = TargetFile.from_data(path, path.encode(), ["sha256"])
    info.unrecognized_fields["custom"] = build_custom(**GOOD)
    return info


@pytest.mark.parametrize("char", ["\n", "\r", "\x1b"])
def test_a_skipped_target_is_logged_on_one_line(
    caplog: pytest.LogCaptureFixture, char: str
) -> None:
    path = f"x86_64-efi/1.0.0/root.img{char}Dec 02 12:00:00 node updater[1]: committed 9.9.9"
    with caplog.at_level(logging.WARNING, logger="core.release"):
        assert releases({path: target(path)}, "x86_64-efi", "stable") == []
    (record,) = caplog.records
    message = record.getMessage()
    assert "skipping target" in message
    assert not any(line in message for line in ("\n", "\r", "\x1b"))
