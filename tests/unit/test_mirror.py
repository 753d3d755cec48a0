"""Unit tests of the mirror's pure parts (target plan, byte ranges, bind, expiry) and of
its store (atomic publish, carry-over, garbage collection) on a temporary directory."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tuf.api.metadata import Metadata, TargetFile  # type: ignore[attr-defined]

from core import release
from core.errors import ConfigError
from core.repository import TargetRejected
from mirror import expiry, metadata_files, plan_targets
from mirror.cli import cli
from mirror.server import Limits, byte_range, make_server, parse_bind
from mirror.store import MirrorDir, MirrorError
from tests.signing_helpers import ImageSpec, make_repo, write_image


def target(
    version: str,
    hardware: str = "x86_64-efi",
    channel: str = "stable",
    role: str = "root",
    sha: str | None = None,
) -> TargetFile:
    path = release.target_path(hardware, version, role, "none")
    digest = sha or hashlib.sha256(path.encode()).hexdigest()
    custom = release.build_custom(
        version=version,
        hardware=[hardware],
        channel=channel,
        role=role,
        compression="none",
        raw_length=10,
        raw_sha256="0" * 64,
    )
    return TargetFile(10, {"sha256": digest}, path, unrecognized_fields={"custom": custom})


def table(*targets: TargetFile) -> dict[str, TargetFile]:
    return {t.path: t for t in targets}


def versions(plan: list[Any]) -> list[tuple[str, str, str]]:
    return sorted((w.hardware, w.role, w.version) for w in plan)


def test_plan_all_releases_without_keep() -> None:
    targets = table(
        target("1.0.0"),
        target("1.1.0"),
        target("1.0.0", role="boot"),
        target("2.0.0", hardware="aarch64"),
    )
    assert versions(plan_targets(targets)) == [
        ("aarch64", "root", "2.0.0"),
        ("x86_64-efi", "boot", "1.0.0"),
        ("x86_64-efi", "root", "1.0.0"),
        ("x86_64-efi", "root", "1.1.0"),
    ]


def test_plan_keep_newest_per_hardware_role_and_newest_per_channel() -> None:
    targets = table(
        target("1.0.0"),
        target("1.1.0"),
        target("1.2.0"),
        target("1.3.0-rc.1", channel="beta"),
        target("0.9.0", hardware="arm"),
    )
    assert versions(plan_targets(targets, keep=2)) == [
        ("arm", "root", "0.9.0"),
        ("x86_64-efi", "root", "1.2.0"),
        ("x86_64-efi", "root", "1.3.0-rc.1"),
    ]
    # keep=1 would drop the stable 1.2.0 behind the beta; stable nodes still need it.
    assert versions(plan_targets(targets, keep=1)) == versions(plan_targets(targets, keep=2))
    assert versions(plan_targets(targets, keep=1, channel="stable")) == [
        ("arm", "root", "0.9.0"),
        ("x86_64-efi", "root", "1.2.0"),
    ]


def test_plan_orders_versions_as_versions() -> None:
    targets = table(target("1.9.0"), target("1.10.0"))
    assert versions(plan_targets(targets, keep=1)) == [("x86_64-efi", "root", "1.10.0")]


def test_plan_filters_and_skips_malformed() -> None:
    bad = TargetFile(1, {"sha256": "0" * 64}, "junk", unrecognized_fields={"custom": {}})
    targets = table(target("1.0.0"), target("1.0.0", hardware="arm"), bad)
    assert versions(plan_targets(targets, hardware=["arm"])) == [("arm", "root", "1.0.0")]
    assert plan_targets(targets, channel="beta") == []
    with pytest.raises(ConfigError, match="--keep 0"):
        plan_targets(targets, keep=0)


def test_plan_skips_what_nodes_skip() -> None:
    # The schema's name rule: a node never installs these, so the mirror plans none.
    targets = table(target("1.0.0"), target("1.1.0", channel="be ta"), target("1.2.0", "a b"))
    assert versions(plan_targets(targets)) == [("x86_64-efi", "root", "1.0.0")]


def test_wanted_url_path_is_the_served_path() -> None:
    (wanted,) = plan_targets(table(target("1.0.0", sha="ab" * 32)))
    assert wanted.url_path() == f"x86_64-efi/1.0.0/{'ab' * 32}.root.img"


def test_wanted_needs_a_sha256() -> None:
    t = target("1.0.0")
    t.hashes = {"sha512": "0" * 128}
    (wanted,) = plan_targets(table(t))
    with pytest.raises(TargetRejected, match="no sha256"):
        wanted.url_path()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=5-", (5, 100)),
        ("bytes=90-200", (90, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=100-", False),
        ("bytes=-0", False),
        ("bytes=9-3", False),
        ("bytes=0-1,5-6", None),
        ("items=1-2", None),
        ("bytes=-", None),
        # Numbers are never parsed unbounded: past 18 digits a position is beyond any file.
        ("bytes=" + "9" * 5000 + "-", False),
        ("bytes=0-" + "9" * 5000, (0, 100)),
        ("bytes=-" + "9" * 5000, (0, 100)),
        ("bytes=" + "0" * 5000 + "5-9", (5, 10)),
    ],
)
def test_byte_range(header: str | None, expected: object) -> None:
    assert byte_range(header, 100) == expected


def test_serve_limits_are_checked(tmp_path: Path) -> None:
    for limits, option in (
        (Limits(header_timeout=0), "--header-timeout"),
        (Limits(idle_timeout=-1), "--idle-timeout"),
        (Limits(workers=0), "--workers 0"),
    ):
        with pytest.raises(ConfigError, match=option):
            make_server(tmp_path, "127.0.0.1:0", limits)


def test_parse_bind() -> None:
    assert parse_bind("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_bind("[::1]:80") == ("::1", 80)
    for bad in ("8080", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_bind(bad)


def test_expiry_reports_days_left(tmp_path: Path) -> None:
    img = write_image(tmp_path / "img", 1000)
    repo = make_repo(tmp_path / "repo", [ImageSpec(img, "1.0.0")])
    files = metadata_files(repo)
    assert set(files) == {"root", "snapshot", "targets", "timestamp"}
    assert files["root"].name == "1.root.json"
    now = dt.datetime.now(dt.UTC)
    report = expiry(files, now)
    for role, path in files.items():
        expires = Metadata.from_file(str(path)).signed.expires
        assert report[role]["days_left"] == round((expires - now).total_seconds() / 86400, 1)
        assert report[role]["expires"] == expires.isoformat(timespec="seconds")
    assert 0 < report["timestamp"]["days_left"] <= 1
    later = expiry(files, now + dt.timedelta(days=2))
    assert later["timestamp"]["days_left"] < 0


def _store_with_objects(tmp_path: Path, *contents: bytes) -> tuple[MirrorDir, list[str]]:
    store = MirrorDir(tmp_path / "m")
    store.create()
    shas = []
    for data in contents:
        sha = hashlib.sha256(data).hexdigest()
        store.object_path(sha).write_bytes(data)
        shas.append(sha)
    return store, shas


def test_publish_swaps_current_and_carries_previous_state(tmp_path: Path) -> None:
    store, (a, b) = _store_with_objects(tmp_path, b"a", b"b")
    meta1 = {"1.snapshot.json": b"s1", "timestamp.json": b"t1"}
    store.publish(meta1, {f"hw/1/{a}.img": a}, (), "now", "up")
    assert os.readlink(store.current_link) == "states/1"
    store.publish(
        {"2.snapshot.json": b"s2", "timestamp.json": b"t2"}, {f"hw/2/{b}.img": b}, (), "now", "up"
    )
    cur = store.current()
    assert (cur / "metadata" / "1.snapshot.json").read_bytes() == b"s1"  # carried over
    assert (cur / "metadata" / "timestamp.json").read_bytes() == b"t2"
    assert (cur / "targets" / f"hw/1/{a}.img").exists()
    assert store.manifest(2).targets == {f"hw/2/{b}.img": b}
    store.publish(
        {"3.snapshot.json": b"s3", "timestamp.json": b"t3"}, {f"hw/2/{b}.img": b}, (), "now", "up"
    )
    assert store.collect_garbage() == []  # state 2 still links a
    store.publish(
        {"4.snapshot.json": b"s4", "timestamp.json": b"t4"}, {f"hw/2/{b}.img": b}, (), "now", "up"
    )
    assert store.collect_garbage() == [a]
    assert sorted(p.name for p in store.states.iterdir()) == ["3", "4"]
    assert not (store.current() / "metadata" / "2.snapshot.json").exists()


def test_failed_publish_leaves_current_untouched(tmp_path: Path) -> None:
    store, (a,) = _store_with_objects(tmp_path, b"a")
    store.publish({"timestamp.json": b"t1"}, {f"x/{a}.img": a}, (), "now", "up")
    with pytest.raises(MirrorError, match="cannot publish state 2"):
        store.publish({"timestamp.json": b"t2"}, {"x/missing.img": "f" * 64}, (), "now", "up")
    assert os.readlink(store.current_link) == "states/1"
    assert (store.current() / "metadata" / "timestamp.json").read_bytes() == b"t1"
    store.collect_garbage()
    assert sorted(p.name for p in store.states.iterdir()) == ["1"]


def test_second_writer_is_refused(tmp_path: Path) -> None:
    store = MirrorDir(tmp_path / "m")
    store.create()
    with store.locked(), pytest.raises(MirrorError, match="another sync"), store.locked():
        pass


def test_cli_help_and_missing_state() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["--help"]).output
    for command in ("sync", "verify", "export", "serve", "status"):
        assert command in out
    result = runner.invoke(cli, ["status", "/nonexistent-mirror"])
    assert result.exit_code == 3 and "holds no synced state" in result.output
