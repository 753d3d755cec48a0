"""What core.repository leans on inside python-tuf's ngclient, held to account.

core/repository.py uses three ngclient internals (pyproject.toml bounds `tuf` to the
major versions tested because of them):

* `Updater._persist_file(filename, data)` - overridden so that every metadata file of
  the cache is fsync'd (ngclient only renames). If a tuf release stopped calling it, the
  override would silently stop applying: the first test fails then, because it watches
  the real writes of a refresh and requires a fsync of each file before its rename and
  of the directory after it.
* `Updater._trusted_set` - the verified metadata of the refresh (`targets()` lists the
  top-level targets from it, the mirror copies its versions);
* `Updater._load_targets(role, parent_role)` - loads a delegated role, verified against
  its delegator and the snapshot (`targets()` walks delegations with it).

The writes are observed by wrapping `os.fsync` and `os.replace` with functions that
record the call and then make it: the file system does the real work.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Targets  # type: ignore[attr-defined]
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.updater import Updater

from core.repository import Repository
from tests.reposim import METADATA_URL, TARGETS_URL, RepositorySimulator, release_custom

IMAGE = b"root filesystem image\n" * 50
TOP = "x86_64-generic/1.0.0/root.img"
DELEGATED = "arm64/2.0.0/root.img"


@dataclass
class Writes:
    """The fsyncs (path of the descriptor) and renames (source, destination), in order."""

    events: list[tuple[str, str, str]] = field(default_factory=list)

    def unsynced(self, cache: Path) -> list[str]:
        """Files of `cache` whose last rename into place was not preceded by a fsync of
        the renamed file, or not followed by a fsync of their directory."""
        problems = []
        for path in sorted(p for p in cache.rglob("*") if p.is_file() and not p.is_symlink()):
            renames = [
                i for i, e in enumerate(self.events) if e[0] == "replace" and e[2] == str(path)
            ]
            if not renames:
                problems.append(f"{path.name}: never renamed into place")
                continue
            at = renames[-1]
            source = self.events[at][1]
            if ("fsync", source, "") not in self.events[:at]:
                problems.append(f"{path.name}: renamed from {source} without a fsync of it")
            if ("fsync", str(path.parent), "") not in self.events[at:]:
                problems.append(f"{path.name}: its directory was not fsync'd after the rename")
        return problems


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Writes]:
    seen = Writes()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        seen.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    yield seen


@pytest.fixture
def sim() -> RepositorySimulator:
    """A repository with a rotated root, a top-level and a delegated target: a refresh
    writes every kind of metadata file ngclient caches."""
    sim = RepositorySimulator()
    sim.add_target(TOP, IMAGE, release_custom("1.0.0", raw=IMAGE))
    sim.add_delegation("arm-vendor", ["arm64/*/*"])
    sim.add_delegated_target(
        "arm-vendor", DELEGATED, IMAGE, release_custom("2.0.0", hardware=("arm64",), raw=IMAGE)
    )
    sim.publish_targets()
    sim.next_root()
    return sim


def _bootstrap(sim: RepositorySimulator, tmp_path: Path) -> Path:
    trusted_root = tmp_path / "shipped-root.json"
    trusted_root.write_bytes(sim.signed_roots[0])
    return trusted_root


def client(sim: RepositorySimulator, tmp_path: Path) -> Repository:
    trusted = _bootstrap(sim, tmp_path)
    return Repository(METADATA_URL, TARGETS_URL, trusted, tmp_path / "tuf", fetcher=sim)


def test_every_metadata_file_a_refresh_caches_went_through_the_fsyncing_override(
    sim: RepositorySimulator, tmp_path: Path, writes: Writes
) -> None:
    repo = client(sim, tmp_path)
    assert sorted(repo.targets()) == [DELEGATED, TOP]  # refresh + the delegated role

    cache = tmp_path / "tuf"
    cached = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert cached == [
        "arm-vendor.json",
        "root.json",  # ngclient's link to root_history/2.root.json
        "root_history/1.root.json",
        "root_history/2.root.json",
        "snapshot.json",
        "targets.json",
        "timestamp.json",
    ]
    assert writes.unsynced(cache) == []


def test_ngclient_alone_does_not_fsync_so_the_override_is_needed(
    sim: RepositorySimulator, tmp_path: Path, writes: Writes
) -> None:
    """The observer above can fail: plain ngclient's cache writes are only renamed. (If
    a tuf release fsyncs by itself, this fails: review the override, maybe drop it.)"""
    cache = tmp_path / "plain"
    cache.mkdir()
    updater = Updater(
        str(cache), METADATA_URL, None, TARGETS_URL, sim, bootstrap=sim.signed_roots[0]
    )
    updater.refresh()
    assert updater.get_targetinfo(DELEGATED) is not None
    unsynced = writes.unsynced(cache)
    assert any(problem.startswith("timestamp.json: renamed from") for problem in unsynced)


def test_the_internals_keep_their_signatures() -> None:
    params = {
        name: list(inspect.signature(getattr(Updater, name)).parameters)
        for name in ("_persist_file", "_load_targets")
    }
    assert params == {
        "_persist_file": ["self", "filename", "data"],
        "_load_targets": ["self", "role", "parent_role"],
    }


def test_trusted_set_holds_the_verified_metadata_of_the_refresh(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    repo = client(sim, tmp_path)
    repo.refresh()
    trusted = repo._updater._trusted_set
    assert isinstance(trusted, TrustedMetadataSet)
    assert repo.trusted_set() is trusted
    versions = {
        "root": trusted.root.version,
        "timestamp": trusted.timestamp.version,
        "snapshot": trusted.snapshot.version,
        "targets": trusted.targets.version,
    }
    assert versions == {
        "root": sim.root.version,
        "timestamp": sim.timestamp.version,
        "snapshot": sim.snapshot.version,
        "targets": sim.targets.version,
    }
    assert list(trusted.targets.targets) == [TOP]  # top-level only: no delegated role yet
    assert "arm-vendor" not in trusted


def test_load_targets_verifies_a_delegated_role_once_and_adds_it_to_the_trusted_set(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    repo = client(sim, tmp_path)
    repo.refresh()
    updater = repo._updater
    fetched = len(sim.fetches)

    role = updater._load_targets("arm-vendor", "targets")

    assert isinstance(role, Targets) and list(role.targets) == [DELEGATED]
    assert role.version == sim.delegated["arm-vendor"].version
    assert updater._trusted_set["arm-vendor"] is role
    assert sim.fetches[fetched:] == [f"/metadata/{role.version}.arm-vendor.json"]
    assert updater._load_targets("arm-vendor", "targets") is role  # no second fetch
    assert len(sim.fetches) == fetched + 1


def test_load_targets_refuses_what_the_delegator_did_not_sign_for(
    sim: RepositorySimulator, tmp_path: Path
) -> None:
    repo = client(sim, tmp_path)
    repo.refresh()
    with pytest.raises(tuf_exc.RepositoryError):
        repo._updater._load_targets("not-delegated", "targets")  # not in the snapshot
    sim.signers["arm-vendor"] = {}  # the role is now served without its signature
    with pytest.raises(tuf_exc.RepositoryError):
        repo._updater._load_targets("arm-vendor", "targets")
