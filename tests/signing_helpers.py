"""Build signed TUF repositories for tests, with the real signing tools.

The builders (`make_repo`, `add_release`, `publish`, `ImageSpec`) are those of
`tools.examplerepo`, shared with the demo's node and the benchmarks (which import no
test helper); this module adds what only tests need (images, digests, a server, a
plain ngclient). Repositories are made by `signing.repository` (the library behind
`sign-release`) from
the INSECURE example keys in keys-example/ - the library refuses those unless told that
this is a test, so every call here passes `allow_example_keys=True` (a test running the
`sign-release` CLI sets `SIGN_RELEASE_ALLOW_EXAMPLE_KEYS=1` or `--allow-example-keys`);
their `metadata/1.root.json` is exactly `ROOT_JSON`, so a client bootstrapped with
`ROOT_JSON` trusts every one of them.

    repo = make_repo(tmp_path / "repo", [ImageSpec(img, "1.2.0")])
    add_release(repo, [ImageSpec(img2, "1.3.0", hardware=("x86_64-efi",))])
    publish(repo)
    # serve repo/metadata/ and repo/targets/ (e.g. http.server on 127.0.0.1)

Target paths are `<hardware>/<version>/<role>.img<.zst|.xz|.gz>`, one per hardware
name, with `custom.release` = {version, hardware: [hw], channel, role, compression,
raw_length, raw_sha256}.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

from tuf.api.metadata import Metadata, Targets  # type: ignore[attr-defined]
from tuf.ngclient.updater import Updater

from tools.examplerepo import (
    KEYS_DIR,
    REPO_ROOT,
    ROOT_JSON,
    SNAPSHOT_KEY,
    TARGETS_KEY,
    TIMESTAMP_KEY,
    ImageSpec,
    add_release,
    make_repo,
    publish,
)

ROOT_KEY = KEYS_DIR / "root"
__all__ = [  # the repository builders are tools.examplerepo's (tools and bench use them too)
    "KEYS_DIR",
    "REPO_ROOT",
    "ROOT_JSON",
    "ROOT_KEY",
    "SNAPSHOT_KEY",
    "TARGETS_KEY",
    "TIMESTAMP_KEY",
    "ImageSpec",
    "add_release",
    "make_repo",
    "ngclient_fetch_all",
    "publish",
    "serve",
    "tree_digest",
    "write_image",
]


def write_image(path: Path, size: int, seed: int = 0) -> Path:
    """A deterministic, partly compressible test image of `size` bytes."""
    block = bytes((i * 7 + seed) % 251 for i in range(4096))
    with path.open("wb") as f:
        left = size
        n = 0
        while left > 0:
            chunk = (block if n % 2 else (n + seed).to_bytes(8, "little") * 512)[:left]
            f.write(chunk)
            left -= len(chunk)
            n += 1
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `root` (and its mode), to assert
    that a failed command left a repository exactly as it was."""
    digest: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            digest[str(p.relative_to(root))] = f"{h} {p.stat().st_mode:o}"
    return digest


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a real server, random port); yields
    the base URL, e.g. f"{url}/metadata/"."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def ngclient_fetch_all(
    base_url: str, metadata_dir: Path, root_json: Path | None = None
) -> dict[str, Path]:
    """A fresh (or, when `metadata_dir` already holds a root.json, a returning) python-tuf
    ngclient refreshes the repository at `base_url` and downloads every target, which
    ngclient verifies against the signed length and hashes. Returns {path: file}.
    Raises python-tuf's errors when the repository does not verify."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    target_dir = metadata_dir.parent / (metadata_dir.name + "-targets")
    target_dir.mkdir(exist_ok=True)
    bootstrap = root_json.read_bytes() if root_json is not None else None
    updater = Updater(
        str(metadata_dir),
        f"{base_url}/metadata/",
        str(target_dir),
        f"{base_url}/targets/",
        bootstrap=bootstrap,
    )
    updater.refresh()
    targets: Metadata[Targets] = Metadata.from_file(str(metadata_dir / "targets.json"))
    files: dict[str, Path] = {}
    for path in sorted(targets.signed.targets):
        info = updater.get_targetinfo(path)
        assert info is not None, path
        files[path] = Path(updater.download_target(info))
    return files
