"""systemd/*.service: verified by the real `systemd-analyze verify`, and the directives
the design depends on (restart policy, every-boot health check, writable devices)."""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

import pytest

from tests.conftest import run_tool

UNITS = Path(__file__).resolve().parents[2] / "systemd"
NAMES = ("updater.service", "updater-health-check.service")


def read_unit(name: str) -> configparser.ConfigParser:
    # strict=False: systemd allows repeated keys (e.g. After=, DeviceAllow=).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; point it at this checkout's console script.
    updater = Path(sys.executable).parent / "updater"
    assert updater.exists()
    copies = []
    for name in NAMES:
        text = (UNITS / name).read_text().replace("/usr/bin/updater", str(updater))
        (tmp_path / name).write_text(text)
        copies.append(tmp_path / name)
    result = run_tool("systemd-analyze", "verify", *copies, check=False)
    # Unknown keys and bad values are warnings on stderr with exit 0: both must be clean.
    assert (result.returncode, result.stderr) == (0, "")


def test_agent_unit() -> None:
    unit = read_unit("updater.service")
    service = unit["Service"]
    assert service["Type"] == "simple"
    assert service["ExecStart"] == "/usr/bin/updater daemon"
    assert service["Restart"] == "on-failure"
    assert "updater-health-check.service" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("name", NAMES)
def test_sandbox_still_allows_writing_block_devices(name: str) -> None:
    service = read_unit(name)["Service"]
    assert service["PrivateDevices"] == "no"  # yes would hide /dev/vda
    assert service["DeviceAllow"] == "block-* rw"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "updater"  # /var/lib/updater stays writable
    assert "-/boot/efi" in service["ReadWritePaths"].split()


def test_health_check_unit_runs_on_every_boot_after_the_workload() -> None:
    unit = read_unit("updater-health-check.service")
    assert unit["Service"]["Type"] == "oneshot"
    assert unit["Service"]["ExecStart"] == "/usr/bin/updater health-check --wait"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "multi-user.target" in unit["Unit"]["After"].split()
    assert unit["Unit"]["Before"] == "updater.service"
    # Nothing may make it skip a boot: no condition other than the config existing.
    conditions = [k for k in unit["Unit"] if k.startswith("Condition")]
    assert conditions == ["ConditionPathExists"]
