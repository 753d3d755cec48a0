"""`tools/setup.sh` and `tools/system-packages.txt`: what `make test` / `make demo` install.

The rows once named a package that no longer shipped its command (`cgpt` in
vboot-utils); CI passed only because the developer machine had the tool already. Two
guards: every row's package really ships its command or file (read from dpkg's own
file lists), and setup.sh itself stops, naming command and package, when an apt-get
install left a row's command missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = ROOT / "tools" / "system-packages.txt"


def rows() -> list[tuple[str, str, str]]:
    out = []
    for line in ROWS.read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            cmd, pkg, targets = fields
            out.append((cmd, pkg, targets))
    return out


@pytest.mark.parametrize(("cmd", "pkg", "targets"), rows(), ids=lambda v: str(v))
def test_each_package_ships_the_command_of_its_row(cmd: str, pkg: str, targets: str) -> None:
    listed = subprocess.run(["dpkg-query", "-L", pkg], capture_output=True, text=True, check=False)
    assert listed.returncode == 0, f"{pkg} is not installed: {listed.stderr.strip()}"
    files = set(listed.stdout.split())
    if cmd.startswith("/"):
        wanted = {cmd, cmd.replace("/usr/", "/", 1)}
    else:
        wanted = {f"{d}/{cmd}" for d in ("/bin", "/sbin", "/usr/bin", "/usr/sbin")}
    assert files & wanted, f"package {pkg} does not ship {cmd} (row of {ROWS.name})"


def test_setup_stops_naming_command_and_package_when_apt_left_it_missing(
    tmp_path: Path,
) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy(ROOT / "tools" / "setup.sh", tools / "setup.sh")
    (tools / "system-packages.txt").write_text(
        "sh              dash            test\nno-such-tool-x  vboot-utils     test,demo\n"
    )
    # An apt-get that "installs" without error but ships nothing - what an install of
    # a package that dropped the command looks like to setup.sh.
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    log = tmp_path / "apt.log"
    (fakebin / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (fakebin / "apt-get").chmod(0o755)
    (fakebin / "id").write_text("#!/bin/sh\necho 0\n")  # as root, whoever runs the test
    (fakebin / "id").chmod(0o755)
    env = {**os.environ, "PATH": f"{fakebin}:{os.environ['PATH']}", "VENV": str(tmp_path / "v")}
    done = subprocess.run(
        ["sh", str(tools / "setup.sh"), "test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "install -y -q --no-install-recommends vboot-utils" in log.read_text()
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        "setup: error: package vboot-utils is installed but no-such-tool-x is still "
        "missing; fix its row in tools/system-packages.txt"
    ]
    assert not (tmp_path / "v").exists()  # stopped before the venv
