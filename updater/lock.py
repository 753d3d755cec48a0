"""The one exclusive lock of a state directory: one updater at a time changes a node.

Two agents writing the same inactive slot at once leave it holding a mix of both
images while both believe they verified theirs. So every operation that changes the
node (install, activate, rollback, mark-good, mark-bad, health-check, each daemon
cycle) runs inside `StateLock.hold()`; read-only ones (`status`, `check`) never take it,
and `check` records its outcome only if `StateLock.attempt()` gets the lock at once.

Invariants:
* the lock is `flock(LOCK_EX)` on `<state_dir>/lock`, so it dies with its holder
  (a killed agent never leaves a stale lock) - the file is never removed or replaced,
  because a second process opening a new file would lock a different inode;
* the file is opened with O_NOFOLLOW|O_CLOEXEC and created 0600: a symlink planted in
  the state directory is refused, and no hook or reboot command inherits the lock;
* while held, the file holds the holder's pid, so the refusal names who holds it;
* without `wait` a busy lock is `LockBusy` at once (an `UpdateFailed`, exit 4), naming
  the holder's pid and the lock path; with `wait` the caller blocks until it is free;
* re-entrant within one process (the daemon's cycle calls install): nested `hold()`s
  share one flock, released when the outermost one ends; other threads of the process
  are excluded as other processes are.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UpdateFailed

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
_PID_BYTES = 32  # more than any pid and its newline


class LockFailed(UpdateFailed):
    """The state directory's lock file could not be opened or locked."""


class LockBusy(LockFailed):
    """Another updater process holds the state directory's lock."""


@dataclass
class _Holding:
    """This process's hold on one lock file: the flock'd descriptor and how deep."""

    mutex: threading.RLock = field(default_factory=threading.RLock)
    fd: int = -1
    depth: int = 0


_registry_mutex = threading.Lock()
_registry: dict[str, _Holding] = {}


def _holding(path: Path) -> _Holding:
    with _registry_mutex:
        return _registry.setdefault(os.path.abspath(path), _Holding())


class StateLock:
    """The exclusive lock of `state_dir` (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME

    @contextmanager
    def hold(self, *, wait: bool = False) -> Iterator[None]:
        """Hold the lock for the block: `LockBusy` at once if another process holds
        it, or block until it is free with `wait`."""
        holding = self._acquire(wait=wait)
        try:
            yield
        finally:
            self._release(holding)

    @contextmanager
    def attempt(self) -> Iterator[bool]:
        """Hold the lock for the block if that is possible without waiting; yields
        whether it is held. Never raises `LockBusy`."""
        try:
            holding = self._acquire(wait=False)
        except LockBusy as busy:
            log.debug("%s", busy)
            yield False
            return
        try:
            yield True
        finally:
            self._release(holding)

    def _acquire(self, *, wait: bool) -> _Holding:
        holding = _holding(self.path)
        if not holding.mutex.acquire(blocking=wait):
            raise LockBusy(
                f"another thread of this updater (pid {os.getpid()}) holds the lock {self.path}"
            )
        try:
            if holding.depth == 0:
                holding.fd = _lock_file(self.path, wait=wait)
            holding.depth += 1
        except BaseException:
            holding.mutex.release()
            raise
        return holding

    @staticmethod
    def _release(holding: _Holding) -> None:
        holding.depth -= 1
        if holding.depth == 0:
            fd, holding.fd = holding.fd, -1
            os.close(fd)  # releases the flock
        holding.mutex.release()


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_NONBLOCK: a FIFO planted at the path must not hang the open.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        why = "it is a symbolic link" if err.errno == errno.ELOOP else err.strerror or str(err)
        raise LockFailed(f"cannot open the lock {path}: {why}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LockFailed(f"cannot use the lock {path}: it is not a regular file")
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except OSError as err:
        os.close(fd)
        raise LockFailed(f"cannot use the lock {path}: {err.strerror or err}") from err
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file, or "unknown"."""
    try:
        first = os.pread(fd, _PID_BYTES, 0).split(b"\n", 1)[0].strip()
    except OSError:
        return "unknown"
    return first.decode() if first.isdigit() else "unknown"


def _lock_file(path: Path, *, wait: bool) -> int:
    """Open and flock `path`, write our pid into it; the locked descriptor."""
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise LockBusy(
                    f"another updater (pid {holder}) is changing this node and holds the "
                    f"lock {path}; try again when it is done, or pass --wait"
                ) from None
            log.info("waiting for the lock %s, held by pid %s", path, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        # Written in place, not by rename: the lock is this inode. pwrite then truncate,
        # so a reader sees a whole pid on the first line at every moment.
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
    except OSError as err:
        os.close(fd)
        raise LockFailed(f"cannot lock {path}: {err.strerror or err}") from err
    except BaseException:
        os.close(fd)
        raise
    return fd
