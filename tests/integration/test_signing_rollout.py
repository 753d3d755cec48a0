"""A release's signed rollout plan, end to end through the `sign-release` console script:
`add --waves`, `publish`, then `rollout --pause/--resume/--withdraw/--waves` and
`publish` again; after each, a python-tuf ngclient refreshes the repository over HTTP
from a real server on 127.0.0.1 and the node's own code (`updater.select`,
`updater.rollout.gate`) reads the plan from the metadata ngclient verified. Image bytes,
lengths and hashes never change; every other change to a published target is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Targets  # type: ignore[attr-defined]

from core.release import RolloutPlan, Wave
from signing.store import Store
from tests.signing_helpers import (
    KEYS_DIR,
    ROOT_JSON,
    SNAPSHOT_KEY,
    TARGETS_KEY,
    TIMESTAMP_KEY,
    ngclient_fetch_all,
    serve,
    tree_digest,
    write_image,
)
from updater.rollout import gate, position
from updater.select import select

SIGN_RELEASE = Path(sys.executable).parent / "sign-release"
HW = "x86_64-efi"
WAVES = "0.05@2030-01-01T00:00Z,25%@2030-01-02T00:00Z,1@2030-01-03T00:00Z"


def at(day: int, hour: int = 0) -> datetime:
    return datetime(2030, 1, day, hour, tzinfo=UTC)


PLAN = RolloutPlan((Wave(0.05, at(1)), Wave(0.25, at(2)), Wave(1.0, at(3))))


def sr(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(SIGN_RELEASE), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1"},
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def publish(repo: Path) -> None:
    sr("publish", repo, "--snapshot-key", SNAPSHOT_KEY, "--timestamp-key", TIMESTAMP_KEY)


def refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one line a refused command printed (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("sign-release: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not proc.stdout
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published repository: 1.1.0 (no plan) and 1.2.0 (root for HW and arm64 with
    WAVES; boot for HW, added without --waves, inherits them)."""
    tmp_path = tmp_path_factory.mktemp("base")
    repo = tmp_path / "repo"
    sr("init", repo, "--from-root", ROOT_JSON)
    sign = ("--sign-with", TARGETS_KEY)
    sr("add", repo, write_image(tmp_path / "old.img", 30_000, 1), "--version", "1.1.0",
       "--hardware", HW, *sign)  # fmt: skip
    sr("add", repo, write_image(tmp_path / "root.img", 200_000, 2), "--version", "1.2.0",
       "--hardware", HW, "--hardware", "arm64", "--waves", WAVES, *sign)  # fmt: skip
    sr("add", repo, write_image(tmp_path / "boot.img", 50_000, 3), "--version", "1.2.0",
       "--hardware", HW, "--role", "boot", *sign)  # fmt: skip
    publish(repo)
    return repo


@pytest.fixture
def repo(base: Path, tmp_path: Path) -> Path:
    """A copy of `base` for a test that changes it."""
    return Path(shutil.copytree(base, tmp_path / "repo"))


def node_view(repo: Path, client: Path) -> dict[str, Any]:
    """What a node sees after a refresh over HTTP: the verified targets (ngclient's
    cache), the target files it downloaded and verified, and the node's selection."""
    first = not (client / "root.json").exists()
    with serve(repo) as url:
        files = ngclient_fetch_all(url, client, ROOT_JSON if first else None)
    targets: Metadata[Targets] = Metadata.from_file(str(client / "targets.json"))
    chosen = select(targets.signed.targets, hardware=HW, channel="stable",
                    installed_version="1.0.0", failed_versions=())  # fmt: skip
    named = select(targets.signed.targets, hardware=HW, channel="stable",
                   installed_version="1.0.0", failed_versions=(), want_version="1.2.0")  # fmt: skip
    assert named is not None
    return {
        "targets": targets.signed.targets,
        "bytes": {p: f.read_bytes() for p, f in files.items()},
        "chosen": None if chosen is None else chosen.version,
        "plan": named.rollout,
    }


def fixed(view: dict[str, Any]) -> dict[str, Any]:
    """Every target's length, hashes and custom.release: what must never change."""
    return {
        p: (t.length, t.hashes, (t.custom or {}).get("release")) for p, t in view["targets"].items()
    }  # a chunk index (no custom) is fixed too


def test_plan_from_add_to_node_then_pause_resume_waves_withdraw(repo: Path, tmp_path: Path) -> None:
    client = tmp_path / "client"
    view = node_view(repo, client)
    assert view["chosen"] == "1.2.0" and view["plan"] == PLAN
    raw = view["targets"][f"{HW}/1.2.0/boot.img.zst"].custom["rollout"]
    assert raw == {"state": "active", "waves": [
        {"share": "0.05", "start": "2030-01-01T00:00:00Z"},
        {"share": "0.25", "start": "2030-01-02T00:00:00Z"},
        {"share": "1", "start": "2030-01-03T00:00:00Z"}]}  # fmt: skip
    assert "rollout" not in view["targets"][f"{HW}/1.1.0/root.img.zst"].custom
    # The node's gate: before its wave it waits until the wave's start, then goes.
    mids = [f"{i:032x}" for i in range(200)]
    early = next(m for m in mids if position(m, HW, "1.2.0") < 0.05)
    late = next(m for m in mids if position(m, HW, "1.2.0") >= 0.25)
    assert gate(view["plan"], position(early, HW, "1.2.0"), at(1)) is None
    waiting = gate(view["plan"], position(late, HW, "1.2.0"), at(2, 12))
    assert waiting is not None and (waiting.reason, waiting.until) == ("wave", at(3))
    before = fixed(view)
    served = tree_digest(repo / "targets")

    expected_states = {"--pause": "paused", "--resume": "active", "--withdraw": "withdrawn"}
    two = "0.5@2030-01-01T00:00Z,1@2030-01-01T06:00Z"
    for args in (["--pause"], ["--resume"], ["--waves", two],
                 ["--pause"], ["--withdraw"], ["--resume"]):  # fmt: skip
        out = json.loads(sr("--json", "rollout", repo, HW, "1.2.0", *args, "--sign-with",
                            TARGETS_KEY).stdout)  # fmt: skip
        assert out["staged"] == [f"{HW}/1.2.0/boot.img.zst", f"{HW}/1.2.0/root.img.zst"]
        publish(repo)
        view = node_view(repo, client)
        plan = view["plan"]
        assert plan is not None and plan.to_custom() == out["rollout"]
        if args[0] in expected_states:
            assert plan.state == expected_states[args[0]]
        if args[0] == "--waves":
            assert plan.waves[0] == Wave(0.5, at(1)) and len(plan.waves) == 2
        # Withdrawn: not offered unless named; paused: offered, the gate holds it.
        assert view["chosen"] == ("1.1.0" if plan.state == "withdrawn" else "1.2.0")
        if plan.state != "active":
            waiting = gate(plan, position(early, HW, "1.2.0"), at(9))
            assert waiting is not None and waiting.reason == plan.state
        # Bytes, lengths, hashes and release fields as signed at add; files untouched.
        assert fixed(view) == before
        assert tree_digest(repo / "targets") == served
        # The other hardware's targets keep their own plan.
        arm64 = view["targets"]["arm64/1.2.0/root.img.zst"].custom["rollout"]
        assert RolloutPlan.from_custom(arm64) == PLAN
    sr("verify", repo, "--root", ROOT_JSON)
    status = json.loads(sr("--json", "status", repo).stdout)
    rollouts = status["roles"]["targets"]["published"]["rollouts"]
    assert [(r["hardware"], r["version"], r["agree"]) for r in rollouts] == [
        ("arm64", "1.2.0", True), (HW, "1.2.0", True)]  # fmt: skip
    assert f"rollout {HW} 1.2.0: active: 50% 2030-01-01T00:00:00Z" in sr("status", repo).stdout

    # Versions stay immutable: a re-add of 1.2.0 with a different image is refused.
    digest = tree_digest(repo)
    other = write_image(tmp_path / "other.img", 200_000, 9)
    for role in ("root", "boot"):
        proc = sr("add", repo, other, "--version", "1.2.0", "--hardware", HW, "--role", role,
                  "--sign-with", TARGETS_KEY, ok=False)  # fmt: skip
        refused(proc, "already published", "versions are immutable")
    assert tree_digest(repo) == digest


def test_a_plan_of_a_release_without_one(repo: Path, tmp_path: Path) -> None:
    sign = ("--sign-with", TARGETS_KEY)
    digest = tree_digest(repo)
    refused(sr("rollout", repo, HW, "1.1.0", "--resume", *sign, ok=False), "nothing to resume")
    assert tree_digest(repo) == digest
    sr("rollout", repo, HW, "1.1.0", "--pause", *sign)
    publish(repo)
    view = node_view(repo, tmp_path / "client")
    paused = view["targets"][f"{HW}/1.1.0/root.img.zst"].custom["rollout"]
    assert paused["state"] == "paused" and [w["share"] for w in paused["waves"]] == ["1"]


def test_one_more_image_must_agree_with_the_plan_of_its_version(repo: Path, tmp_path: Path) -> None:
    digest = tree_digest(repo)
    efi = write_image(tmp_path / "efi.img", 10_000, 4)
    for waves in ("1@2030-01-01T00:00Z", "0.05@now,1@+1d"):
        proc = sr("add", repo, efi, "--version", "1.2.0", "--hardware", HW, "--role", "efi",
                  "--waves", waves, "--sign-with", TARGETS_KEY, ok=False)  # fmt: skip
        refused(proc, "has images with rollout plan active: 5% 2030-01-01T00:00:00Z")
    proc = sr("add", repo, efi, "--version", "1.1.0", "--hardware", HW, "--role", "efi",
              "--waves", WAVES, "--sign-with", TARGETS_KEY, ok=False)  # fmt: skip
    refused(proc, "has images with no rollout plan")
    assert tree_digest(repo) == digest
    # The same plan (or none: inherited) is accepted.
    sr("add", repo, efi, "--version", "1.2.0", "--hardware", HW, "--role", "efi",
       "--waves", WAVES, "--sign-with", TARGETS_KEY)  # fmt: skip


BAD_WAVES = [
    "NaN@now", "1e309@now", "0.5@now,0.4@+1d,1@+2d", "0.5@now", "0.5@+2d,1@+1d",
    ",".join(f"{(i + 1) / 21:.4f}@now" for i in range(21)), "1@now\x01", "9" * 5000 + "@now",
    "1@2030-02-30T00:00Z", "", "1@+1y", "-1@now",
]  # fmt: skip


@pytest.mark.parametrize("spec", BAD_WAVES)
def test_bad_wave_specs_are_one_line_and_change_nothing(
    base: Path, tmp_path: Path, spec: str
) -> None:
    repo = base
    digest = tree_digest(repo)
    image = tmp_path / "new.img"
    write_image(image, 10_000, 5)
    add = sr("add", repo, image, "--version", "2.0.0", "--hardware", HW, "--waves", spec,
             "--sign-with", TARGETS_KEY, ok=False)  # fmt: skip
    change = sr("rollout", repo, HW, "1.2.0", "--waves", spec, "--sign-with", TARGETS_KEY,
                ok=False)  # fmt: skip
    for proc in (add, change):
        line = refused(proc, "--waves: waves")
        assert len(line) < 600
    assert tree_digest(repo) == digest


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([HW, "1.2.0"], ["needs one of --pause, --resume, --withdraw, --waves"]),
        ([HW, "1.2.0", "--pause", "--withdraw"], ["needs one of"]),
        ([HW, "1.2.0", "--resume"], ["already has this plan"]),
        ([HW, "9.9.9", "--pause"], ["no such release", "versions for x86_64-efi: 1.1.0, 1.2.0"]),
        (["../etc", "1.2.0", "--pause"], ["no such release"]),
        (["arm64", "1.1.0", "--withdraw"], ["no such release", "versions for arm64: 1.2.0"]),
    ],
)
def test_bad_rollout_commands_are_one_line_and_change_nothing(
    base: Path, args: list[str], words: list[str]
) -> None:
    repo = base
    digest = tree_digest(repo)
    refused(sr("rollout", repo, *args, "--sign-with", TARGETS_KEY, ok=False), *words)
    assert tree_digest(repo) == digest


def test_publish_refuses_any_other_change_to_a_published_target(repo: Path) -> None:
    """Staged targets edited by other means than `rollout` (by hand, by a bug): publish
    takes a change of custom.rollout only."""
    from signing.keys import Secrets
    from signing.roles import load_signers, sign_all
    from signing.store import role_keys

    def stage(edit: Any) -> None:
        with Store(repo) as store:
            md, _ = store.editable("targets", None)
            edit(md.signed.targets[f"{HW}/1.2.0/root.img.zst"])
            keys = role_keys(store.current_root().signed, "targets")
            signers = load_signers(
                [str(TARGETS_KEY)], keys, "targets", Secrets(), allow_example_keys=True
            )
            sign_all(md, signers)
            store.write_staged(md)

    def channel(t: Any) -> None:
        t.unrecognized_fields["custom"]["release"]["channel"] = "beta"

    def length(t: Any) -> None:
        t.length += 1

    def hashes(t: Any) -> None:
        t.hashes["sha256"] = "0" * 64

    def extra(t: Any) -> None:
        t.unrecognized_fields["note"] = "x"

    for edit, what in ((channel, "custom"), (length, "length"), (hashes, "hashes"),
                       (extra, "note")):  # fmt: skip
        stage(edit)
        digest = tree_digest(repo / "metadata")
        proc = sr("publish", repo, "--snapshot-key", SNAPSHOT_KEY, "--timestamp-key",
                  TIMESTAMP_KEY, ok=False)  # fmt: skip
        refused(proc, f"published target {HW}/1.2.0/root.img.zst ({what})", "immutable")
        assert tree_digest(repo / "metadata") == digest
        (repo / "staged" / "targets.json").unlink()

    def plan_only(t: Any) -> None:
        t.unrecognized_fields["custom"]["rollout"]["state"] = "paused"

    stage(plan_only)  # the other half of the plan: both images must agree for a node
    publish(repo)
    assert KEYS_DIR.is_dir()
