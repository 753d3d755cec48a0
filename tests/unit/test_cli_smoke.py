"""The three console scripts exist and answer --help through their installed entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("script", ["updater", "sign-release", "update-mirror"])
def test_console_script_help(script: str) -> None:
    out = subprocess.run([BIN / script, "--help"], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout
    assert script in out.stdout
