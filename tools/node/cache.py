"""Content-addressed cache of the e2e node's build artefacts (outside git).

An artefact lives in `<cache>/<kind>-<key>` where `key` is a hash of everything the
artefact is built from (builder source, package lists, project source, parameters).
Invariants kept here:

* an entry is visible only once complete: it is built in a temporary sibling and
  renamed into place, so an interrupted build leaves nothing that looks finished;
* one builder per entry at a time (an flock per kind), so parallel test sessions
  wait for each other instead of building twice;
* a changed input changes the key, so a stale entry is never reused; each use
  touches the entry, and after a build the entries of that kind beyond the
  `KEEP` most recently used, and unused for `KEEP_SECONDS`, are deleted (the
  project source changes all day; `python -m tools.node clean` deletes all).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPLETE = ".complete"
KEEP = 3
KEEP_SECONDS = 3600.0


def default_cache_dir() -> Path:
    """$AB_E2E_CACHE, else $XDG_CACHE_HOME/ab-updater-e2e if set, else <repo>/.cache/e2e."""
    if env := os.environ.get("AB_E2E_CACHE"):
        return Path(env)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "ab-updater-e2e"
    return REPO / ".cache" / "e2e"


class Key:
    """An incremental hash of build inputs: strings and whole files or directory trees."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._h = hashlib.sha256(kind.encode())

    def text(self, *values: object) -> Key:
        for value in values:
            data = repr(value).encode()
            self._h.update(len(data).to_bytes(8, "little") + data)
        return self

    def files(self, paths: Iterable[Path], *, root: Path = REPO) -> Key:
        for path in sorted(paths):
            self.text(str(path.relative_to(root)), path.read_bytes(), os.access(path, os.X_OK))
        return self

    def tree(self, top: Path, *, suffixes: tuple[str, ...] = (".py",)) -> Key:
        """Every file under `top` whose name ends in one of `suffixes` ('' = all)."""
        found = [
            p
            for p in top.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.name.endswith(suffixes)
        ]
        return self.files(found, root=top.parent)

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:20]


def cached(cache: Path, key: Key, build: Callable[[Path], None]) -> Path:
    """The directory for `key`, built by `build(tmpdir)` unless already complete."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{key.kind}-{key.hexdigest()}"
    if (final / COMPLETE).exists():
        (final / COMPLETE).touch()
        return final
    with (cache / f".{key.kind}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / COMPLETE).exists():
            (final / COMPLETE).touch()
            return final
        tmp = cache / f".{final.name}.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        build(tmp)
        (tmp / COMPLETE).touch()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(cache, key.kind)
    return final


def _prune(cache: Path, kind: str) -> None:
    """Delete old entries of `kind` (called with the kind's lock held)."""
    entries = []
    for entry in cache.glob(f"{kind}-*"):
        try:
            entries.append(((entry / COMPLETE).stat().st_mtime, entry))
        except FileNotFoundError:
            continue
    entries.sort(reverse=True)
    now = time.time()
    for used, entry in entries[KEEP:]:
        if now - used > KEEP_SECONDS:
            shutil.rmtree(entry, ignore_errors=True)


def clean(cache: Path, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete every cache entry except `keep`; returns what was deleted."""
    kept = {p.resolve() for p in keep}
    removed = []
    if cache.exists():
        for entry in sorted(cache.iterdir()):
            if entry.is_dir() and entry.resolve() not in kept:
                shutil.rmtree(entry)
                removed.append(entry)
    return removed
