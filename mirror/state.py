"""Reading a synced mirror: status, verify (as a node would), export to removable
media, and the expiry report of served metadata.

Invariants:

* Readers never modify the mirror directory; they resolve `current` once and read that
  one state (its manifest validated whole by `MirrorDir.manifest`).
* `verify` trusts nothing in the directory: a fresh ngclient over `file://` from the
  caller's root, then every image the state lists, streamed and hashed.
* `export` writes only below DEST: every path it joins comes from the validated
  manifest and passes `mirror.store.below`; each file is temp + fsync + rename, an
  image is hashed while copied and refused unless it matches its sha256 name, and the
  metadata is written last with `timestamp.json` very last.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata
from tuf.api.serialization import DeserializationError

from core.errors import ConfigError
from core.fsutil import atomic_write, replacing
from core.release import served_digest
from core.repository import Repository
from mirror.store import MirrorDir, MirrorError, MirrorRejected, below


def metadata_files(state: Path) -> dict[str, Path]:
    """The newest served file of each role in a state's metadata/ (by version prefix)."""
    best: dict[str, tuple[int, Path]] = {}
    for p in (state / "metadata").iterdir():
        version, _, rest = p.name.partition(".")
        if version.isdigit():
            role, n = rest[: -len(".json")], int(version)
        elif p.name == "timestamp.json":
            role, n = "timestamp", 0
        else:
            continue
        if role not in best or n > best[role][0]:
            best[role] = (n, p)
    return {role: p for role, (_, p) in sorted(best.items())}


def expiry(files: Mapping[str, Path], now: dt.datetime | None = None) -> dict[str, dict[str, Any]]:
    """{role: {version, expires, days_left}} of served metadata (a report, not a check)."""
    now = now or dt.datetime.now(dt.UTC)
    report: dict[str, dict[str, Any]] = {}
    for role, path in files.items():
        try:
            signed = Metadata.from_bytes(path.read_bytes()).signed
        except OSError as e:
            raise MirrorError(f"cannot read {path}: {e.strerror}") from e
        except DeserializationError as e:
            raise MirrorRejected(f"{path}: not TUF metadata: {e}") from e
        left = signed.expires - now
        report[role] = {
            "version": signed.version,
            "expires": signed.expires.isoformat(timespec="seconds"),
            "days_left": round(left.total_seconds() / 86400, 1),
        }
    return report


def verify(
    directory: Path, trusted_root: Path, *, allow_example_keys: bool = False
) -> dict[str, Any]:
    """Verify the served state as a node would: a fresh ngclient over file:// from
    `trusted_root`, then every image the state serves against the trusted metadata.
    `allow_example_keys` trusts a root naming a key of keys-example/ (demos, tests)."""
    store = MirrorDir(directory)
    state = store.current()
    manifest = store.manifest(int(state.name))
    with tempfile.TemporaryDirectory(prefix="update-mirror-verify-") as cache:
        repo = Repository(
            f"file://{state}/metadata",
            f"file://{state}/targets",
            trusted_root,
            Path(cache),
            allow_example_keys=allow_example_keys,
        )
        repo.refresh()
        targets = repo.targets()
        checked = 0
        for row in manifest.releases:
            for image in row["images"].values():
                if image["target"] not in targets:
                    raise MirrorRejected(
                        f"{state}: {image['target']} is not in the trusted targets metadata"
                    )
                target = repo.get_targetinfo(image["target"])
                for _ in repo.stream_target(target, retries=0):
                    pass
                checked += 1
    return {
        "state": manifest.number,
        "images_verified": checked,
        "releases": list(manifest.releases),
        "expiry": expiry(metadata_files(state)),
    }


EXPORT_README = """\
Update medium exported by update-mirror
=======================================

This disk holds a signed update repository (metadata/ and targets/) copied from a
verified mirror. It holds no keys: every node verifies it against the root.json in
its own OS image, exactly as it verifies its online update server.

To update a node:

    mount -o ro LABEL=UPDATES /mnt        # or whichever device this disk is
    updater install --from /mnt
    umount /mnt

Releases on this disk:
{releases}
Metadata expiry (days left when exported on {date}):
{expiry}
A node refuses expired metadata: use this disk before the timestamp expires, or ask
for a fresh export.
"""


def export(
    directory: Path, dest: Path, hardware: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Copy the current state's metadata and the chosen images, and a README, to `dest`.

    Images are hashed while copied and compared with their sha256 name; every file is
    written temp + fsync + rename, the metadata last and `timestamp.json` very last.
    """
    store = MirrorDir(directory)
    state = store.current()
    manifest = store.manifest(int(state.name))
    rows = [
        r
        for r in manifest.releases
        if (hardware is None or r["hardware"] == hardware)
        and (version is None or r["version"] == version)
    ]
    if not rows:
        raise ConfigError(
            f"{directory}: no mirrored release matches hardware "
            f"{hardware or 'any'} and version {version or 'any'}"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MirrorError(f"cannot create {dest}: {e.strerror}") from e
    copied = 0
    files = {i[k] for r in rows for i in r["images"].values() for k in ("file", "index") if k in i}
    for url_path in sorted(files):
        src = below(state / "targets", url_path, "image")
        copied += _copy_verified(src, below(dest / "targets", url_path, "image"))
    meta = sorted((state / "metadata").iterdir(), key=lambda p: p.name == "timestamp.json")
    for p in meta:
        _copy_verified(p, dest / "metadata" / p.name)
    report = expiry(metadata_files(state))
    text = EXPORT_README.format(
        releases="".join(
            f"  {r['hardware']}  {r['channel']}  {r['version']}  "
            f"({', '.join(sorted(r['images']))})\n"
            for r in rows
        ),
        date=dt.datetime.now(dt.UTC).date().isoformat(),
        expiry="".join(
            f"  {role:10} {e['days_left']:>7} days (until {e['expires']})\n"
            for role, e in report.items()
        ),
    )
    _write_new(dest / "README.txt", text.encode())
    return {"dest": str(dest), "releases": rows, "bytes": copied, "expiry": report}


def _copy_verified(src: Path, dest: Path) -> int:
    """Copy src -> dest atomically; an image's sha256 must match its name's prefix."""
    expect = served_digest(src.name) if src.parent.name != "metadata" else None
    h = hashlib.sha256()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with src.open("rb") as fin, replacing(dest) as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
            # Checked before the block ends: a mismatch leaves `dest` as it was.
            if expect is not None and h.hexdigest() != expect:
                raise MirrorRejected(f"{src}: sha256 {h.hexdigest()} does not match its name")
        return dest.stat().st_size
    except OSError as e:
        raise MirrorError(f"cannot copy {src} to {dest}: {e}") from e


def _write_new(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data)
    except OSError as e:
        raise MirrorError(f"cannot write {path}: {e.strerror}") from e


def status(directory: Path) -> dict[str, Any]:
    """The current state, its releases and each role's days left (unverified read)."""
    store = MirrorDir(directory)
    state = store.current()
    manifest = store.manifest(int(state.name))
    return {
        "state": manifest.number,
        "synced_at": manifest.synced_at,
        "upstream": manifest.upstream,
        "releases": list(manifest.releases),
        "expiry": expiry(metadata_files(state)),
    }
