"""TUF on the node: refresh trusted metadata, list targets, stream a target with resume.

python-tuf's `ngclient.Updater` does every trust decision (root rotation, rollback and
freeze protection, signatures, thresholds, snapshot/targets consistency). This module
adds what the agent needs around it:

* `core.fetcher.RequestsFetcher` - the network layer (one `requests.Session` for
  metadata and images, `file://` URLs too) - and the slow-retrieval limits, which this
  module applies to whatever fetcher it is given (`DownloadLimits`).
* `Repository.from_config` - the one place a `[repository]` config table becomes a
  Repository (timeouts, limits, the example-key option), for the agent.
* `Repository.stream_target` - ngclient's `download_target` copies a whole target to a
  temporary file first, which is too much for GiB images. We stream instead, counting
  against the trusted `length` and hashing with every listed algorithm.
  `Repository.stream_range` fetches one byte range of a target the same way (same
  session, limits and resume), for the frames of a delta install (docs/delta.md).

Invariants:

* Only verified metadata is ever used: `targets()` reads ngclient's trusted set, and
  every delegated target is confirmed through ngclient's own `get_targetinfo`.
* No root naming a key of keys-example/ (whose private halves are published) is
  trusted unless the caller passes `allow_example_keys=True` (a demo or a test): the
  bootstrap `trusted_root` is checked when the Repository is built, and the trusted
  root again after every refresh, since a rotation could introduce one.
* Every read of untrusted bytes is bounded: metadata by ngclient's `UpdaterConfig`
  limits (also for `file://`), targets by the trusted `length` (the stream aborts the
  moment one byte more arrives), the bootstrap root by `root_max_length`.
* Every read of untrusted bytes is bounded in time too: each metadata file by
  `metadata_deadline` (total), each image download attempt by `min_rate` over a sliding
  `rate_window` - a repository cannot stall a node by sending slowly.
* A streamed target is untrusted until the generator returns: the length and every
  hash are checked BEFORE it returns, and a mismatch raises `TargetRejected`.
  Resume (HTTP `Range`) is in-process only, so the hashes cover the whole file.
* ngclient's cache writes go through temp file + fsync + rename + fsync of the dir.
* Errors are mapped: `tuf.api.exceptions.RepositoryError` (and metadata longer than
  allowed) -> `MetadataRejected`; network and HTTP failures -> `DownloadFailed`.

Three ngclient internals are used (`Updater._persist_file`, `_trusted_set`,
`_load_targets`); pyproject.toml bounds `tuf` to the major versions tested, and
tests/unit/test_tuf_pins.py fails if one of them is no longer called or changes meaning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Protocol

import requests
from tuf.api import exceptions as tuf_exc

# tuf.api.metadata is the documented home of these classes but does not re-export them
# explicitly; mypy resolves the real classes anyway (see core/release.py).
from tuf.api.metadata import TargetFile, Targets  # type: ignore[attr-defined]
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from core.errors import ConfigError, UpdateFailed, UpdateRejected
from core.examplekeys import WHY, example_keys_among
from core.fetcher import (
    DownloadLimits,
    RangeIgnored,
    RequestsFetcher,
    ResumableFetcher,
    at_min_rate,
    skip_prefix,
    within_deadline,
)
from core.fsutil import atomic_write, read_regular
from core.release import served_path

__all__ = [  # the fetcher's names are re-exported: callers import them from here
    "DownloadFailed",
    "DownloadLimits",
    "MetadataRejected",
    "RangeUnsupported",
    "Repository",
    "RequestsFetcher",
    "ResumableFetcher",
    "TargetRejected",
]

logger = logging.getLogger(__name__)

MAX_BACKOFF = 30.0  # seconds; caps the exponential backoff between resume attempts


class RepositorySettings(Protocol):
    """What `Repository.from_config` reads of a repository configuration (the agent's
    `[repository]` table, `updater.config.RepositoryConfig`, has these attributes)."""

    @property
    def metadata_url(self) -> str: ...
    @property
    def targets_url(self) -> str: ...
    @property
    def trusted_root(self) -> Path: ...
    @property
    def timeout(self) -> float: ...
    @property
    def metadata_deadline(self) -> float: ...
    @property
    def min_rate(self) -> float: ...
    @property
    def rate_window(self) -> float: ...
    @property
    def allow_example_keys(self) -> bool: ...


class MetadataRejected(UpdateRejected):
    """TUF metadata failed verification (signature, threshold, rollback, expiry...)."""


class TargetRejected(UpdateRejected):
    """A target is unknown, or its bytes do not match the trusted length or hashes."""


class DownloadFailed(UpdateFailed):
    """Metadata or a target could not be fetched (network, HTTP error, retries used up)."""


class RangeUnsupported(DownloadFailed):
    """The server answers byte-range requests with the whole file: no delta from it."""


class _RecordingFetcher(FetcherInterface):
    """ngclient's view of the fetcher: every metadata download within `deadline`
    seconds, and the last URL asked for remembered, so errors can name the file."""

    def __init__(self, inner: FetcherInterface, deadline: float) -> None:
        self.inner = inner
        self.deadline = deadline
        self.last_url = "(nothing fetched yet)"

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.last_url = url
        started = time.monotonic()  # before the request: a slow answer counts too
        return within_deadline(self.inner.fetch(url), self.deadline, started)


class _DurableUpdater(Updater):
    """ngclient's Updater whose cache writes are fsync'd (ngclient only renames).

    `_persist_file` is internal: every metadata file ngclient caches goes through it
    (tests/unit/test_tuf_pins.py checks that it still does)."""

    def _persist_file(self, filename: str, data: bytes) -> None:
        atomic_write(Path(filename), data)


class Repository:
    """One TUF repository as the agent sees it.

    `trusted_root` is the root.json shipped in the OS image: it is the trust anchor on
    every run (ngclient's `bootstrap`), and ngclient then walks the newer roots kept
    in `cache_dir/root_history/`. The first run bootstraps `cache_dir` from it
    (`root_history/<v>.root.json`, written atomically, and the `root.json` link).

    ngclient allows one refresh per Updater, so `refresh()` builds a fresh one each
    time; `targets()` and `get_targetinfo()` refresh first if that was not done yet.
    """

    def __init__(
        self,
        metadata_url: str,
        targets_url: str,
        trusted_root: Path,
        cache_dir: Path,
        session: requests.Session | None = None,
        fetcher: FetcherInterface | None = None,
        *,
        config: UpdaterConfig | None = None,
        limits: DownloadLimits | None = None,
        allow_example_keys: bool = False,
    ) -> None:
        self.metadata_url = metadata_url
        self.targets_url = targets_url
        self.cache_dir = cache_dir
        self.config = config or UpdaterConfig()
        self.limits = limits or DownloadLimits()
        self.allow_example_keys = allow_example_keys
        self.fetcher = fetcher if fetcher is not None else RequestsFetcher(session)
        self._recorder = _RecordingFetcher(self.fetcher, self.limits.metadata_deadline)
        self._root_bytes = self._read_trusted_root(trusted_root)
        self._trusted_root = trusted_root
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UpdateFailed(f"cannot create TUF cache {cache_dir}: {e.strerror}") from e
        self._updater = self._new_updater()
        self._refreshed = False
        self._bootstrap_version = self._trusted().root.version
        self._refuse_example_keys()

    @classmethod
    def from_config(
        cls,
        repo: RepositorySettings,
        cache_dir: Path,
        session: requests.Session | None = None,
        *,
        metadata_url: str | None = None,
        targets_url: str | None = None,
    ) -> Repository:
        """The repository a `[repository]` table describes, every key applied here
        (`timeout`, the slow-retrieval limits, `allow_example_keys`); the URLs may be
        overridden (a mounted medium, `install --from`). `retries` is for the caller's
        `stream_target`."""
        return cls(
            metadata_url if metadata_url is not None else repo.metadata_url,
            targets_url if targets_url is not None else repo.targets_url,
            repo.trusted_root,
            cache_dir,
            fetcher=RequestsFetcher(session, timeout=(repo.timeout, repo.timeout)),
            limits=DownloadLimits(
                metadata_deadline=repo.metadata_deadline,
                min_rate=repo.min_rate,
                rate_window=repo.rate_window,
            ),
            allow_example_keys=repo.allow_example_keys,
        )

    def _read_trusted_root(self, path: Path) -> bytes:
        limit = self.config.root_max_length
        try:
            return read_regular(path, limit)
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise MetadataRejected(f"trusted root {path} is larger than {limit} bytes") from e
            raise ConfigError(f"cannot read trusted root {path}: {e.strerror}") from e

    def _new_updater(self) -> Updater:
        try:
            return _DurableUpdater(
                str(self.cache_dir),
                self.metadata_url,
                None,
                self.targets_url,
                self._recorder,
                self.config,
                bootstrap=self._root_bytes,
            )
        except tuf_exc.RepositoryError as e:
            raise MetadataRejected(
                f"trusted root {self._trusted_root} is not valid root metadata: {e}"
            ) from e
        except OSError as e:
            raise UpdateFailed(f"cannot write TUF cache {self.cache_dir}: {e}") from e

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """Map ngclient's exceptions to ours, naming the last URL fetched."""
        try:
            yield
        except tuf_exc.DownloadLengthMismatchError as e:
            # More bytes than the trusted (or configured) length: bad data, not a
            # network fault - the "endless data" attack.
            raise MetadataRejected(
                f"{doing}: {self._recorder.last_url} exceeds its allowed length: {e}"
            ) from e
        except tuf_exc.DownloadError as e:
            raise DownloadFailed(f"{doing}: fetching {self._recorder.last_url}: {e}") from e
        except tuf_exc.RepositoryError as e:
            raise MetadataRejected(
                f"{doing}: {self._recorder.last_url} rejected: {type(e).__name__}: {e}"
            ) from e
        except OSError as e:
            raise UpdateFailed(f"{doing}: TUF cache {self.cache_dir}: {e}") from e

    def refresh(self) -> None:
        """Update root -> timestamp -> snapshot -> targets from `metadata_url`."""
        if self._refreshed:
            self._updater = self._new_updater()
            self._refreshed = False
        with self._translated(f"refreshing TUF metadata from {self.metadata_url}"):
            self._updater.refresh()
        self._refuse_example_keys()
        self._refreshed = True

    def _refuse_example_keys(self) -> None:
        """MetadataRejected if the trusted root names a key of keys-example/."""
        if self.allow_example_keys:
            return
        root = self._trusted().root
        found = example_keys_among((keyid, key.keyval) for keyid, key in root.keys.items())
        if not found:
            return
        names = ", ".join(sorted({name for _, name in found}))
        where = f"trusted root {self._trusted_root}"
        if root.version != self._bootstrap_version:
            rotated = f"root version {root.version} from {self.metadata_url}"
            where = f"{rotated} (rotated to from {where})"
        raise MetadataRejected(
            f"{where}: names the example key {names}: {WHY}; refused unless "
            "[repository] allow_example_keys = true (demos and tests only)"
        )

    def _trusted(self) -> TrustedMetadataSet:
        # ngclient keeps verified metadata only in its trusted set; there is no public
        # accessor for "all targets" (python-tuf lists by path only).
        return self._updater._trusted_set

    def trusted_set(self) -> TrustedMetadataSet:
        """ngclient's verified metadata of the last refresh (refreshes first if needed).

        For readers that must know exactly which versions were verified (the mirror
        copies the verified bytes ngclient persisted in `cache_dir`)."""
        if not self._refreshed:
            self.refresh()
        return self._trusted()

    def targets(self) -> dict[str, TargetFile]:
        """Every target of the verified top-level targets role and its delegations.

        Top-level targets come from the trusted set; a delegated target is included
        only if ngclient's `get_targetinfo` (which applies delegation paths,
        terminating flags and the most-trusted-role-wins rule) returns it.
        """
        if not self._refreshed:
            self.refresh()
        top = self._trusted().targets
        result: dict[str, TargetFile] = dict(top.targets)
        with self._translated(f"loading delegated targets from {self.metadata_url}"):
            candidates: set[str] = set()
            for role in self._delegated_roles(top):
                candidates.update(role.targets)
            for path in sorted(candidates - result.keys()):
                info = self._updater.get_targetinfo(path)
                if info is not None:
                    result[path] = info
        return result

    def _delegated_roles(self, top: Targets) -> Iterator[Targets]:
        """Verified delegated targets metadata, at most `max_delegations` roles."""
        stack = [(name, "targets") for name in reversed(_child_names(top))]
        visited: set[str] = set()
        while stack and len(visited) < self.config.max_delegations:
            name, parent = stack.pop()
            if name in visited:
                continue
            visited.add(name)
            # ngclient verifies the role against its delegator's keys and snapshot.
            role = self._updater._load_targets(name, parent)
            yield role
            stack.extend((child, name) for child in reversed(_child_names(role)))

    def get_targetinfo(self, path: str) -> TargetFile:
        """The trusted TargetFile for `path`; `TargetRejected` if no role lists it."""
        if not self._refreshed:
            self.refresh()
        with self._translated(f"looking up target {path}"):
            info = self._updater.get_targetinfo(path)
        if info is None:
            raise TargetRejected(
                f"target {path} is not in the trusted targets metadata of {self.metadata_url}"
            )
        return info

    def target_url(self, target: TargetFile) -> str:
        """Where the bytes of `target` are: `<dir>/<hash>.<basename>` when consistent."""
        path = target.path
        if self._trusted().root.consistent_snapshot and self.config.prefix_targets_with_hash:
            digest = target.hashes.get("sha256") or next(iter(target.hashes.values()), "")
            path = served_path(path, digest)
        return f"{self.targets_url.rstrip('/')}/{path}"

    def _open_at(
        self, url: str, offset: int, chunk_size: int, end: int | None = None
    ) -> Generator[bytes, None, None]:
        # A generator, so closing it (consumer stopped early) closes the response too.
        # Each attempt must keep the minimum rate, from before its request is sent.
        limits, started = self.limits, time.monotonic()
        if isinstance(self.fetcher, ResumableFetcher):
            body = self.fetcher.fetch_from(url, offset, chunk_size, end)
        elif end is not None:
            raise RangeIgnored(f"{url}: this fetcher cannot fetch byte ranges")
        else:
            body = skip_prefix(self.fetcher.fetch(url), offset, url)
        yield from at_min_rate(body, limits.min_rate, limits.rate_window, started)

    def stream_range(
        self,
        target: TargetFile,
        start: int,
        end: int,
        *,
        chunk_size: int = 1 << 20,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> Generator[bytes, None, None]:
        """Yield bytes [start, end) of `target` (an HTTP Range request, or a seek for
        `file://`), resumed after a cut as `stream_target` is, under the same limits.

        Unverified: the caller checks what it reads (a delta install hashes each frame
        against the TUF-verified chunk index). `RangeUnsupported` if the server answers
        with the whole file; `TargetRejected` if it sends more than the range, or a range
        outside the trusted length is asked for."""
        url = self.target_url(target)
        if not 0 <= start < end <= target.length:
            raise TargetRejected(
                f"{url}: range {start}-{end} is not inside its trusted length {target.length}"
            )
        try:
            yield from self._download(url, start, end, chunk_size, retries, backoff, True)
        except RangeIgnored as e:
            raise RangeUnsupported(f"{url} does not serve byte ranges: {e}") from e

    def _download(
        self,
        url: str,
        start: int,
        end: int,
        chunk_size: int,
        retries: int,
        backoff: float,
        ranged: bool,
    ) -> Iterator[bytes]:
        """Bytes [start, end) of `url` as they arrive (`ranged`: asked for as one range;
        otherwise from `start` to the end of the file, which must be `end` bytes long).

        A dropped connection, read timeout, a rate below `limits.min_rate` or a 5xx
        resumes at the byte reached with a Range request, at most `retries` times in
        total with exponential backoff; then `DownloadFailed`. Other HTTP errors fail
        at once. More bytes than `end` is `TargetRejected` (the offending chunk is not
        yielded), and so is ending short."""
        received = start
        failures = 0
        while True:
            try:
                stop = end if ranged else None
                with contextlib.closing(self._open_at(url, received, chunk_size, stop)) as body:
                    for chunk in body:
                        if received + len(chunk) > end:
                            what = (
                                f"more than the range {start}-{end} it was asked for"
                                if ranged
                                else f"more than its trusted length of {end} bytes"
                            )
                            raise TargetRejected(f"{url} sent {what}; download aborted")
                        received += len(chunk)
                        yield chunk
                break
            except RangeIgnored:
                raise
            except tuf_exc.DownloadHTTPError as e:
                if e.status_code < 500:
                    raise DownloadFailed(f"HTTP {e.status_code} fetching {url}") from e
                error: Exception = e
            except tuf_exc.DownloadError as e:
                error = e
            failures += 1
            if failures > retries:
                raise DownloadFailed(
                    f"giving up on {url} after {retries} retries at byte {received} "
                    f"of {end}: {error}"
                ) from error
            logger.info("resuming %s at byte %d after: %s", url, received, error)
            time.sleep(min(backoff * 2 ** (failures - 1), MAX_BACKOFF))
        if received != end:
            should = f"the range ends at {end}" if ranged else f"its trusted length is {end}"
            raise TargetRejected(f"{url} ended after {received} bytes; {should}")

    def stream_target(
        self,
        target: TargetFile,
        *,
        chunk_size: int = 1 << 20,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> Iterator[bytes]:
        """Yield the bytes of `target` as they arrive; verify them before returning.

        Counts against `target.length` and raises `TargetRejected` naming the URL the
        moment it would be exceeded (the offending chunk is not yielded). A dropped
        connection, read timeout, a rate below `limits.min_rate` over `limits.rate_window`
        or a 5xx resumes at the byte reached, with an HTTP
        `Range: bytes=<received>-` request (or by skipping the prefix a server that
        ignores Range resends), at most `retries` times in total with exponential
        backoff (`backoff * 2**n`, capped at MAX_BACKOFF); then `DownloadFailed`. Other
        HTTP errors (404...) fail at once. At the end the length and every hash in
        `target.hashes` are checked and `TargetRejected` (naming algorithm and URL) is
        raised before the generator returns. Resume is in-process only: a new call
        starts at byte 0, so the hashes always cover the whole file.
        """
        url = self.target_url(target)
        hashers = {}
        for algorithm in target.hashes:
            try:
                hashers[algorithm] = hashlib.new(algorithm)
            except ValueError as e:
                raise TargetRejected(f"{url}: unsupported hash algorithm {algorithm}") from e
        if not hashers:
            raise TargetRejected(f"{url}: the trusted metadata lists no hash for it")
        received = 0
        for chunk in self._download(url, 0, target.length, chunk_size, retries, backoff, False):
            received += len(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
            yield chunk
        if received != target.length:  # `_download` checked it; defence in depth
            raise TargetRejected(
                f"{url} ended after {received} bytes; its trusted length is {target.length}"
            )
        for algorithm, hasher in hashers.items():
            if hasher.hexdigest() != target.hashes[algorithm].lower():
                raise TargetRejected(
                    f"{url}: {algorithm} mismatch: trusted {target.hashes[algorithm]}, "
                    f"received {hasher.hexdigest()}"
                )


def _child_names(role: Targets) -> list[str]:
    """Names of the roles `role` delegates to, in order of appearance."""
    if role.delegations is None:
        return []
    if role.delegations.roles is not None:
        return list(role.delegations.roles)
    if role.delegations.succinct_roles is not None:
        return list(role.delegations.succinct_roles.get_roles())
    return []
