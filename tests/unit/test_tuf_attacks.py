"""TUF attacks against the agent's repository client, on the in-memory simulator.

Each test: a client refreshes once (trusted state), the repository is attacked, the
next refresh must raise the specific project error, and the client's cache must still
hold the last trusted metadata. The TUF logic under test is python-tuf's ngclient as
wired by core.repository (fetcher, cache, error mapping).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata

from core import release
from core.repository import MetadataRejected, Repository, TargetRejected
from tests.reposim import METADATA_URL, TARGETS_URL, RepositorySimulator, release_custom
from tests.signing_helpers import KEYS_DIR
from updater.select import select

IMAGE = b"root filesystem image\n" * 100
PATH = "x86_64-generic/1.0.0/root.img"


@pytest.fixture
def sim() -> RepositorySimulator:
    sim = RepositorySimulator()
    sim.add_target(PATH, IMAGE, release_custom("1.0.0", raw=IMAGE))
    sim.publish_targets()
    return sim


def client(sim: RepositorySimulator, tmp_path: Path) -> Repository:
    trusted_root = tmp_path / "shipped-root.json"
    if not trusted_root.exists():
        trusted_root.write_bytes(sim.signed_roots[0])
    return Repository(METADATA_URL, TARGETS_URL, trusted_root, tmp_path / "tuf", fetcher=sim)


def cache(tmp_path: Path) -> dict[str, bytes]:
    """Every file of the client cache, by relative path."""
    root = tmp_path / "tuf"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def trusted(sim: RepositorySimulator, tmp_path: Path) -> dict[str, bytes]:
    """Refresh once successfully; return the cache as it was then."""
    client(sim, tmp_path).refresh()
    return cache(tmp_path)


def refresh_fails(sim: RepositorySimulator, tmp_path: Path, match: str) -> None:
    with pytest.raises(MetadataRejected, match=match):
        client(sim, tmp_path).refresh()


def test_refresh_and_targets_on_a_good_repository(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    assert set(trusted) >= {"root.json", "timestamp.json", "snapshot.json", "targets.json"}
    repo = client(sim, tmp_path)
    assert list(repo.targets()) == [PATH]
    assert b"".join(repo.stream_target(repo.get_targetinfo(PATH))) == IMAGE
    assert "/targets/" + sim.stored_target_path(PATH) in sim.fetches


def test_rollback_of_timestamp(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.timestamp.version -= 1
    refresh_fails(sim, tmp_path, r"timestamp\.json rejected: BadVersionNumberError")
    assert cache(tmp_path) == trusted


def test_rollback_of_snapshot(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.snapshot.version -= 1
    sim.update_timestamp()  # a fresh timestamp that points at an older snapshot
    refresh_fails(sim, tmp_path, r"timestamp\.json rejected: BadVersionNumberError.*snapshot")
    assert cache(tmp_path) == trusted


def test_rollback_of_targets(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.targets.version -= 1
    sim.update_snapshot()  # a fresh snapshot that lists an older targets
    refresh_fails(sim, tmp_path, r"snapshot\.json rejected: BadVersionNumberError.*targets")
    # Only the (legitimately newer) timestamp may have been accepted.
    after = cache(tmp_path)
    assert after.pop("timestamp.json") != trusted.pop("timestamp.json")
    assert after == trusted


def test_indefinite_freeze_expired_timestamp(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.timestamp.expires = sim.past
    sim.update_timestamp()
    refresh_fails(sim, tmp_path, r"timestamp\.json rejected: ExpiredMetadataError")
    assert cache(tmp_path) == trusted


def test_mix_and_match_snapshot_names_another_targets_version(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.update_snapshot()
    sim.snapshot.meta["targets.json"].version = sim.targets.version + 3  # never served
    refresh_fails(sim, tmp_path, r"5\.targets\.json rejected: BadVersionNumberError")
    assert cache(tmp_path)["targets.json"] == trusted["targets.json"]


def test_endless_data_metadata_longer_than_limit(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.update_timestamp()
    sim.padding["timestamp"] = 20_000  # ngclient's timestamp limit is 16384 bytes
    refresh_fails(sim, tmp_path, r"timestamp\.json exceeds its allowed length")
    assert cache(tmp_path) == trusted


def test_threshold_not_met(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    # Root v2 requires two timestamp keys; the attacker holds (and signs with) one.
    second = sim.add_key("timestamp")
    sim.root.roles["timestamp"].threshold = 2
    sim.next_root()
    del sim.signers["timestamp"][second.public_key.keyid]
    sim.update_timestamp()
    refresh_fails(sim, tmp_path, r"timestamp\.json rejected: UnsignedMetadataError")
    after = cache(tmp_path)
    assert "root_history/2.root.json" in after  # the legitimate root update stays
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        assert after[name] == trusted[name]


def test_signature_by_an_unknown_key(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.signers["snapshot"] = {}
    sim.add_key("snapshot")  # in the simulator's root, but root v2 is never published
    sim.update_snapshot()
    refresh_fails(sim, tmp_path, r"snapshot\.json rejected: UnsignedMetadataError")
    assert cache(tmp_path)["snapshot.json"] == trusted["snapshot.json"]


def test_fast_forward_recovery_after_key_rotation(sim: RepositorySimulator, tmp_path: Path) -> None:
    # A compromised timestamp key pushed version 1000 to the client...
    sim.timestamp.version = 999
    sim.update_timestamp()
    client(sim, tmp_path).refresh()
    # ...without rotation, resetting the version is a rollback and is refused...
    sim.timestamp.version = 0
    sim.update_timestamp()
    refresh_fails(sim, tmp_path, r"timestamp\.json rejected: BadVersionNumberError")
    # ...after root v2 rotates the timestamp and snapshot keys, version 1 is accepted.
    sim.rotate_key("timestamp")
    sim.rotate_key("snapshot")
    sim.next_root()
    sim.snapshot.version = 0
    sim.timestamp.version = 0
    sim.update_snapshot()  # snapshot v1, timestamp v1
    repo = client(sim, tmp_path)
    repo.refresh()
    assert repo.get_targetinfo(PATH).length == len(IMAGE)
    assert Metadata.from_bytes(cache(tmp_path)["timestamp.json"]).signed.version == 1


def test_wrong_software_target_hash_mismatch(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    sim.served_override[PATH] = b"X" + IMAGE[1:]  # same length, one byte changed
    repo = client(sim, tmp_path)
    chunks = repo.stream_target(repo.get_targetinfo(PATH))
    with pytest.raises(TargetRejected, match=r"root\.img: sha256 mismatch"):
        b"".join(chunks)
    assert cache(tmp_path) == trusted


def test_wrong_software_target_for_other_hardware(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    arm = b"arm image"
    sim.add_target("arm64/2.0.0/root.img", arm, release_custom("2.0.0", hardware=("arm64",)))
    sim.publish_targets()
    targets = client(sim, tmp_path).targets()
    assert len(targets) == 2
    picked = select(
        targets,
        hardware="x86_64-generic",
        channel="stable",
        installed_version="1.0.0",
        failed_versions=(),
    )
    assert picked is None
    with pytest.raises(release.ReleaseRejected, match=r"2\.0\.0 is not available.*x86_64"):
        select(
            targets,
            hardware="x86_64-generic",
            channel="stable",
            installed_version="1.0.0",
            failed_versions=(),
            want_version="2.0.0",
        )


def test_delegated_role_cannot_list_targets_outside_its_paths(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    arm, rogue = b"arm image", b"x86 image from the arm vendor"
    sim.add_delegation("arm-vendor", ["arm64/*/*"])  # TUF globs: "*" stops at "/"
    sim.add_delegated_target("arm-vendor", "arm64/2.0.0/root.img", arm)
    sim.add_delegated_target("arm-vendor", "x86_64-generic/9.0.0/root.img", rogue)
    sim.publish_targets()
    repo = client(sim, tmp_path)
    assert sorted(repo.targets()) == ["arm64/2.0.0/root.img", PATH]
    assert b"".join(repo.stream_target(repo.get_targetinfo("arm64/2.0.0/root.img"))) == arm
    with pytest.raises(TargetRejected, match=r"x86_64-generic/9\.0\.0/root\.img is not in"):
        repo.get_targetinfo("x86_64-generic/9.0.0/root.img")


def test_rotation_to_a_root_with_an_example_key_is_refused(
    sim: RepositorySimulator, trusted: dict[str, bytes], tmp_path: Path
) -> None:
    # Root v2, properly signed, adds the published keys-example/timestamp key: from
    # then on anyone could sign timestamps, so the node must not trust root v2.
    pub = json.loads((KEYS_DIR / "timestamp.pub").read_text())
    sim.root.add_key(SSlibKey.from_dict(pub.pop("keyid"), pub), "timestamp")
    sim.next_root()
    shipped = tmp_path / "shipped-root.json"
    refresh_fails(
        sim,
        tmp_path,
        rf"^root version 2 from {METADATA_URL} \(rotated to from trusted root {shipped}\): "
        r"names the example key keys-example/timestamp: its private key is published",
    )
    assert cache(tmp_path)["timestamp.json"] == trusted["timestamp.json"]
    # A demo or test may say so explicitly.
    repo = Repository(
        METADATA_URL, TARGETS_URL, shipped, tmp_path / "tuf", fetcher=sim, allow_example_keys=True
    )
    repo.refresh()
    assert repo.get_targetinfo(PATH).length == len(IMAGE)
