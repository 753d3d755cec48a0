"""`sign-release publish` and `add` killed at every step that writes a file: the next run
completes or redoes the interrupted work by itself, leaves no temporary file, and a real
python-tuf ngclient - one that knew the repository before the crash, one that refreshed
during it, and a fresh one - refreshes the result.

Each crash is real: the console script runs in a subprocess with
`SIGN_RELEASE_FAILPOINT=<step>` and dies there with `os._exit` (no cleanup runs, as
with SIGKILL or a power cut).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from core.release import is_index_path
from signing.failpoints import FAILPOINT_ENV, FAILPOINT_EXIT
from signing.keys import load_private_key_file
from tests.signing_helpers import (
    ROOT_JSON,
    ROOT_KEY,
    SNAPSHOT_KEY,
    TARGETS_KEY,
    TIMESTAMP_KEY,
    ImageSpec,
    make_repo,
    ngclient_fetch_all,
    serve,
    write_image,
)

SIGN_RELEASE = Path(sys.executable).parent / "sign-release"
OLD = "x86_64-efi/1.0.0/root.img.zst"
NEW = "x86_64-efi/2.0.0/root.img.zst"


def images(files: Iterable[str]) -> set[str]:
    """The image targets among `files` (each zstd image comes with its chunk index)."""
    return {p for p in files if not is_index_path(p)}


PUBLISH: list[str | Path] = ["--snapshot-key", SNAPSHOT_KEY, "--timestamp-key", TIMESTAMP_KEY]


def sr(*args: str | Path, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script (example keys allowed: this is a test); with `failpoint`,
    assert that it died there."""
    env = {**os.environ, "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1"}
    env.pop(FAILPOINT_ENV, None)
    if failpoint is not None:
        env[FAILPOINT_ENV] = failpoint
    proc = subprocess.run(
        [str(SIGN_RELEASE), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    expected = 0 if failpoint is None else FAILPOINT_EXIT
    assert proc.returncode == expected, (failpoint, proc.stderr)
    return proc


def temp_files(repo: Path) -> list[str]:
    """Temporary files of fsutil.temp_file / atomic_write left in the repository."""
    return sorted(
        str(p.relative_to(repo))
        for sub in ("metadata", "targets", "staged")
        for p in (repo / sub).rglob(".*")
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository publishing 1.0.0 (all roles v1), a client that refreshed it, and
    the image of 2.0.0 (8 MiB, so a killed add leaves a sizeable temporary file)."""
    d = tmp_path_factory.mktemp("crash")
    make_repo(d / "repo", [ImageSpec(write_image(d / "old.img", 50_000, seed=1), "1.0.0")])
    # Incompressible, so the stored file is as large as the image.
    (d / "new.img").write_bytes(random.Random(2).randbytes(8 * 1024 * 1024))
    with serve(d / "repo") as url:
        assert images(ngclient_fetch_all(url, d / "client", ROOT_JSON)) == {OLD}
    return d


@pytest.fixture
def work(base: Path, tmp_path: Path) -> Path:
    shutil.copytree(base, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def add_new(work: Path, failpoint: str | None = None) -> None:
    sr(
        "add",
        work / "repo",
        work / "new.img",
        "--version",
        "2.0.0",
        "--hardware",
        "x86_64-efi",
        "--sign-with",
        TARGETS_KEY,
        failpoint=failpoint,
    )


def refresh_all(work: Path) -> None:
    """The returning client, the one that refreshed during the crash, and a fresh one
    all see 2.0.0 and the newest root."""
    repo = work / "repo"
    newest = max(int(p.name.split(".")[0]) for p in (repo / "metadata").glob("*.root.json"))
    with serve(repo) as url:
        for client, root in (("client", None), ("during", None), ("fresh", ROOT_JSON)):
            if root is None and not (work / client).exists():
                continue
            assert images(ngclient_fetch_all(url, work / client, root)) == {OLD, NEW}, client
            cached = json.loads((work / client / "root.json").read_text())
            assert cached["signed"]["version"] == newest, client


PUBLISH_STEPS = [
    "metadata-root-temp",
    "metadata-root",
    "metadata-root-copy-temp",
    "metadata-root-copy",
    "metadata-targets-temp",
    "metadata-targets",
    "metadata-snapshot-temp",
    "metadata-snapshot",
    "metadata-timestamp-temp",
    "metadata-timestamp",
    "publish-dropped-root",
]


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_publish_killed_then_the_next_publish_completes_it(work: Path, step: str) -> None:
    repo = work / "repo"
    add_new(work)
    sr("sign", repo, "root", "--expires", "400", "--sign-with", ROOT_KEY)  # stages root v2
    sr("publish", repo, *PUBLISH, failpoint=step)
    if step.endswith("-temp"):
        assert temp_files(repo), "the crash should have left its temporary file"
    root2 = repo / "metadata" / "2.root.json"
    public_root = root2.read_bytes() if root2.exists() else None

    # During the crash a node sees the old release (or already the new one).
    with serve(repo) as url:
        seen = images(ngclient_fetch_all(url, work / "during", ROOT_JSON))
    assert seen in ({OLD}, {OLD, NEW})

    sr("publish", repo, *PUBLISH)
    assert temp_files(repo) == []
    assert list((repo / "staged").iterdir()) == []
    if public_root is not None:
        # A root an interrupted publish wrote is public: it is never rewritten.
        assert root2.read_bytes() == public_root
    assert (repo / "metadata" / "root.json").read_bytes() == root2.read_bytes()
    refresh_all(work)


def test_root_written_by_a_killed_publish_is_never_replaced(work: Path) -> None:
    """After a crash that published root v2, the next change of root is v3 - not a
    different 2.root.json - and nodes walk 1 -> 2 -> 3."""
    repo = work / "repo"
    add_new(work)
    sr("sign", repo, "root", "--expires", "400", "--sign-with", ROOT_KEY)
    sr("publish", repo, *PUBLISH, failpoint="metadata-root")
    public_root = (repo / "metadata" / "2.root.json").read_bytes()
    sr("sign", repo, "root", "--expires", "300", "--sign-with", ROOT_KEY)
    staged = json.loads((repo / "staged" / "root.json").read_text())
    assert staged["signed"]["version"] == 3
    sr("publish", repo, *PUBLISH)
    assert (repo / "metadata" / "2.root.json").read_bytes() == public_root
    assert (repo / "metadata" / "3.root.json").exists()
    refresh_all(work)


def test_a_different_staged_root_of_a_published_version_is_refused(work: Path) -> None:
    """A staged root v2 that differs from the 2.root.json a killed publish wrote is
    refused with one line; the public 2.root.json is left as it is."""
    repo = work / "repo"
    sr("sign", repo, "root", "--expires", "400", "--sign-with", ROOT_KEY)
    sr("publish", repo, *PUBLISH, failpoint="metadata-root-copy")
    public_root = (repo / "metadata" / "2.root.json").read_bytes()
    other: Metadata = Metadata.from_bytes(public_root)  # type: ignore[type-arg]
    other.signed.expires = other.signed.expires.replace(year=other.signed.expires.year - 1)
    other.signatures.clear()
    key = json.loads(ROOT_KEY.with_name("root.pub").read_text())
    signer = CryptoSigner(
        load_private_key_file(ROOT_KEY, lambda _: None),
        other.signed.keys[key["keyid"]],
    )
    other.sign(signer)
    (repo / "staged" / "root.json").write_bytes(other.to_bytes(JSONSerializer(compact=False)))
    proc = subprocess.run(
        [str(SIGN_RELEASE), "publish", str(repo), *map(str, PUBLISH)],
        env={**os.environ, "SIGN_RELEASE_ALLOW_EXAMPLE_KEYS": "1"},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "2.root.json" in proc.stderr and "differs" in proc.stderr, proc.stderr
    assert (repo / "metadata" / "2.root.json").read_bytes() == public_root


ADD_STEPS = ["add-compressing", "add-compressed", "add-linked", "staged-targets-temp"]


@pytest.mark.parametrize("step", ADD_STEPS)
def test_add_killed_then_the_next_command_cleans_up_and_add_works(work: Path, step: str) -> None:
    repo = work / "repo"
    add_new(work, failpoint=step)
    left = temp_files(repo)
    assert left, "the crash should have left its temporary file"
    # Any command that takes the repository lock removes the temporary files.
    sr("status", repo)
    assert temp_files(repo) == []
    add_new(work)
    sr("publish", repo, *PUBLISH)
    assert temp_files(repo) == []
    refresh_all(work)


def test_a_killed_add_leaves_a_large_temporary_file_that_the_next_run_removes(
    work: Path,
) -> None:
    repo = work / "repo"
    add_new(work, failpoint="add-compressed")
    (left,) = temp_files(repo)
    assert (repo / left).stat().st_size > 8_000_000
    add_new(work)
    assert temp_files(repo) == []
