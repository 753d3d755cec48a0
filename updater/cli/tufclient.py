"""`updater tuf-client`: the TUF conformance client protocol over the agent's TUF path.

Implements tuf-conformance's CLIENT-CLI.md so the agent's TUF code can be checked by
that suite:

    updater tuf-client --metadata-dir D init TRUSTED_ROOT
    updater tuf-client --metadata-dir D --metadata-url U refresh
    updater tuf-client --metadata-dir D --metadata-url U --target-name P \\
        --target-base-url T --target-dir TD download

Invariants: the work is done by `core.repository.Repository`, exactly as the agent
does it (refresh, get_targetinfo, stream_target); the trust anchor after `init` is the
cached `D/root.json`; a downloaded target appears in TD (named by its URL-quoted
target path) only once every byte is verified (temp file + fsync + rename); the exit
status is 0 on success and 1 on any failure, with one `updater tuf-client: error:` line
on stderr (the group is a program of its own for `core.cli.ProgramGroup`). tuf and the
repository code are imported when a command runs, not with `updater.cli`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib import parse

import click

from core.cli import ProgramGroup
from core.errors import ConfigError, UpdateFailed, UpdaterError
from core.fsutil import atomic_write

if TYPE_CHECKING:
    from core.repository import Repository


def _fail_with_1(action: Callable[[], None]) -> None:
    """Run `action`. CLIENT-CLI.md knows one failure status, 1 - the exit code of the
    root class `UpdaterError` - so every expected failure is raised as that class."""
    try:
        action()
    except UpdaterError as err:
        if type(err) is UpdaterError:
            raise
        raise UpdaterError(str(err)) from err


def _need(value: object, option: str) -> None:
    if not value:
        raise ConfigError(f"{option} is required for this command")


@click.group("tuf-client", cls=ProgramGroup)
@click.option(
    "--metadata-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Local TUF metadata cache (trusted root after init).",
)
@click.option("--metadata-url", default="", help="Base URL of the repository metadata.")
@click.option("--target-name", default="", help="Target path to download.")
@click.option("--target-base-url", default="", help="Base URL of the target files.")
@click.option(
    "--target-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to download the target into.",
)
@click.pass_context
def tuf_client(
    ctx: click.Context,
    metadata_dir: Path,
    metadata_url: str,
    target_name: str,
    target_base_url: str,
    target_dir: Path | None,
) -> None:
    """TUF conformance test client (tuf-conformance CLIENT-CLI protocol)."""
    ctx.obj = {
        "metadata_dir": metadata_dir,
        "metadata_url": metadata_url,
        "target_name": target_name,
        "target_base_url": target_base_url,
        "target_dir": target_dir,
    }


@tuf_client.command()
@click.argument("trusted_root", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def init(obj: dict[str, object], trusted_root: Path) -> None:
    """Bootstrap the metadata dir from TRUSTED_ROOT (verified: self-signed root)."""
    metadata_dir = obj["metadata_dir"]
    assert isinstance(metadata_dir, Path)

    def bootstrap() -> None:
        from core.repository import Repository

        # Constructing a Repository verifies the root (self-signed, threshold) and
        # writes it into the cache; no URL is contacted.
        Repository("", "", trusted_root, metadata_dir)

    _fail_with_1(bootstrap)


def _repository(obj: dict[str, object], targets_url: str = "") -> Repository:
    from core.repository import Repository

    metadata_dir, metadata_url = obj["metadata_dir"], obj["metadata_url"]
    assert isinstance(metadata_dir, Path) and isinstance(metadata_url, str)
    _need(metadata_url, "--metadata-url")
    return Repository(metadata_url, targets_url, metadata_dir / "root.json", metadata_dir)


@tuf_client.command()
@click.pass_obj
def refresh(obj: dict[str, object]) -> None:
    """Refresh the top-level metadata from --metadata-url."""
    _fail_with_1(lambda: _repository(obj).refresh())


@tuf_client.command()
@click.pass_obj
def download(obj: dict[str, object]) -> None:
    """Refresh, then download --target-name into --target-dir, verified."""
    _fail_with_1(lambda: _download(obj))


def _download(obj: dict[str, object]) -> None:
    from tuf.api.exceptions import LengthOrHashMismatchError

    name, base_url, target_dir = obj["target_name"], obj["target_base_url"], obj["target_dir"]
    assert isinstance(name, str) and isinstance(base_url, str)
    _need(name, "--target-name")
    _need(base_url, "--target-base-url")
    if not isinstance(target_dir, Path):
        raise ConfigError("--target-dir is required for this command")
    repo = _repository(obj, base_url)
    repo.refresh()
    target = repo.get_targetinfo(name)
    dest = target_dir / parse.quote(name, safe="")
    with contextlib.suppress(OSError, LengthOrHashMismatchError), dest.open("rb") as cached:
        # Already there and verified (length and every hash): nothing to fetch.
        target.verify_length_and_hashes(cached)
        return
    _write_stream(dest, repo.stream_target(target, backoff=0.1))


def _write_stream(dest: Path, chunks: Iterator[bytes]) -> None:
    """Write `chunks` (verified when the iterator ends) to dest; rename only then."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, chunks)
    except OSError as e:
        raise UpdateFailed(f"cannot write {dest}: {e.strerror or e}") from e
