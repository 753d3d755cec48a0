"""Expiry: `status` reports each role's expiry; metadata past its expiry makes `verify`
fail (checked with an expiry of 0 days and, for a real clock jump, under `faketime`);
the `timestamp` refresh needs nothing but the timestamp key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from signing.cli import cli
from tests.conftest import require_tool
from tests.signing_helpers import KEYS_DIR, ROOT_JSON, ImageSpec, make_repo, write_image

SIGN_RELEASE = Path(sys.executable).parent / "sign-release"


# These tests sign with the INSECURE keys of keys-example/: say so.
ALLOW = {"SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1"}


def sr(args: Sequence[str | Path], code: int = 0) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="sign-release", env=ALLOW)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def faketime(offset: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the console script with the clock moved by `offset` (libfaketime)."""
    return subprocess.run(
        [require_tool("faketime"), "-f", offset, str(SIGN_RELEASE), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **ALLOW},
    )


def test_status_reports_expiry_of_each_role(tmp_path: Path) -> None:
    keys = KEYS_DIR
    repo = tmp_path / "repo"
    sr(
        [
            "init",
            repo,
            "--root-key",
            keys / "root.pub",
            "--targets-key",
            keys / "targets.pub",
            "--snapshot-key",
            keys / "snapshot.pub",
            "--timestamp-key",
            keys / "timestamp.pub",
            "--expires",
            "root=200",
            "--expires",
            "targets=50",
            "--expires",
            "snapshot=5",
            "--expires",
            "timestamp=2",
            "--sign-with",
            keys / "root",
        ]
    )
    sr(["sign", repo, "targets", "--sign-with", keys / "targets"])
    sr(
        [
            "publish",
            repo,
            "--snapshot-key",
            keys / "snapshot",
            "--timestamp-key",
            keys / "timestamp",
        ]
    )
    status = json.loads(sr(["status", repo, "--json"]).stdout)["roles"]
    now = datetime.now(UTC)
    for role, days in (("root", 200), ("targets", 50), ("snapshot", 5), ("timestamp", 2)):
        entry = status[role]["published"]
        expires = datetime.strptime(entry["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert abs(expires - (now + timedelta(days=days))) < timedelta(minutes=5), role
        assert days - 0.1 <= entry["days_left"] <= days and entry["expired"] is False
    text = sr(["status", repo]).stdout
    assert "targets    published        1   1/1" in text and "50.0" in text
    # A later publish keeps init's choice for the online roles.
    sr(
        [
            "publish",
            repo,
            "--snapshot-key",
            keys / "snapshot",
            "--timestamp-key",
            keys / "timestamp",
            "--expires",
            "timestamp=3",
        ]
    )
    status = json.loads(sr(["status", repo, "--json"]).stdout)["roles"]
    assert 4.9 < status["snapshot"]["published"]["days_left"] <= 5
    assert 2.9 < status["timestamp"]["published"]["days_left"] <= 3


def test_expired_timestamp_fails_verify_until_refreshed_with_only_its_key(tmp_path: Path) -> None:
    image = write_image(tmp_path / "img", 10_000)
    repo = make_repo(tmp_path / "repo", [ImageSpec(image, "1.0.0")], expires={"timestamp": 0})
    assert "EXPIRED" in sr(["status", repo]).stdout
    assert (
        "ExpiredMetadataError: timestamp.json is expired"
        in sr(["verify", repo, "--root", ROOT_JSON], 3).stderr
    )
    # The online host holds only the timestamp key: nothing else is reachable.
    online = tmp_path / "online"
    online.mkdir()
    shutil.copy(KEYS_DIR / "timestamp", online / "timestamp")
    assert (
        "published timestamp v2"
        in sr(["timestamp", repo, "--timestamp-key", online / "timestamp"]).stdout
    )
    report = json.loads(sr(["verify", repo, "--root", ROOT_JSON, "--json"]).stdout)
    assert report["ok"] is True and report["timestamp_version"] == 2
    # A wrong key for the timestamp role is refused.
    assert (
        "not a key of role timestamp"
        in sr(["timestamp", repo, "--timestamp-key", KEYS_DIR / "snapshot"], 2).stderr
    )


@pytest.mark.parametrize(("offset", "expired"), [("+40d", "targets"), ("+8d", "snapshot")])
def test_clock_past_expiry_fails_verify(tmp_path: Path, offset: str, expired: str) -> None:
    image = write_image(tmp_path / "img", 10_000)
    repo = make_repo(tmp_path / "repo", [ImageSpec(image, "1.0.0")])
    if expired == "targets":
        # Long-lived snapshot/timestamp, short targets: only targets expires in 40 days.
        sr(["sign", repo, "targets", "--expires", "30", "--sign-with", KEYS_DIR / "targets"])
        sr(
            [
                "publish",
                repo,
                "--snapshot-key",
                KEYS_DIR / "snapshot",
                "--timestamp-key",
                KEYS_DIR / "timestamp",
                "--expires",
                "snapshot=60",
                "--expires",
                "timestamp=60",
            ]
        )
    else:
        sr(
            [
                "publish",
                repo,
                "--snapshot-key",
                KEYS_DIR / "snapshot",
                "--timestamp-key",
                KEYS_DIR / "timestamp",
                "--expires",
                "timestamp=60",
            ]
        )
    assert (
        subprocess.run(
            [str(SIGN_RELEASE), "verify", repo, "--root", ROOT_JSON], capture_output=True
        ).returncode
        == 0
    )
    proc = faketime(offset, "verify", repo, "--root", ROOT_JSON)
    assert proc.returncode == 3, proc.stderr
    assert "ExpiredMetadataError" in proc.stderr and expired in proc.stderr.split(": ")[-1]
    if expired == "snapshot":
        # An online timestamp refresh cannot extend a snapshot that has expired.
        before = sorted(os.listdir(repo / "metadata"))
        proc = faketime(offset, "timestamp", repo, "--timestamp-key", KEYS_DIR / "timestamp")
        assert proc.returncode == 2
        assert "published snapshot v2 expired" in proc.stderr
        assert sorted(os.listdir(repo / "metadata")) == before
