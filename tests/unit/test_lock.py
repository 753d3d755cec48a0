"""updater.lock: one holder at a time across processes (a real second process holds the
lock), re-entrant within one, and a lock file that cannot be a trap (symlink, FIFO)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from core.errors import UpdateFailed
from updater.lock import LOCK_NAME, LockBusy, LockFailed, StateLock

HOLDER = """
import sys
from pathlib import Path
from updater.lock import StateLock
with StateLock(Path(sys.argv[1])).hold():
    print("held", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def held_elsewhere(state_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of `state_dir` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.stdin.close()  # lets it leave its `with`
        proc.wait(timeout=60)


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    lock = StateLock(tmp_path)
    with held_elsewhere(tmp_path) as holder:
        with pytest.raises(LockBusy) as err, lock.hold():
            pass
        assert isinstance(err.value, UpdateFailed) and err.value.exit_code == 4
        message = str(err.value)
        assert f"pid {holder.pid}" in message and str(tmp_path / LOCK_NAME) in message
        with lock.attempt() as held:
            assert held is False
    with lock.hold():  # free again once the holder is gone
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_wait_blocks_until_the_holder_is_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = StateLock(tmp_path)
    got = threading.Event()

    def waiter() -> None:
        with lock.hold(wait=True):
            got.set()

    caplog.set_level(logging.INFO, logger="updater.lock")
    with held_elsewhere(tmp_path) as holder:
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while "waiting for the lock" not in caplog.text:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.01)
        assert f"held by pid {holder.pid}" in caplog.text
        assert not got.is_set()  # it is waiting: the holder has not let go yet
    thread.join(timeout=60)
    assert got.is_set()


def test_reentrant_within_one_process(tmp_path: Path) -> None:
    outer, inner = StateLock(tmp_path), StateLock(tmp_path)  # e.g. daemon -> install
    with outer.hold(), inner.hold(), inner.attempt() as held:
        assert held
    # Released completely: another process gets it at once.
    probe = "import fcntl,sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    subprocess.run([sys.executable, "-c", probe, str(tmp_path / LOCK_NAME)], check=True)


def test_another_thread_is_excluded_like_another_process(tmp_path: Path) -> None:
    lock = StateLock(tmp_path)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with lock.hold():
                pass
        except LockBusy as err:
            errors.append(err)

    with lock.hold():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=60)
    assert len(errors) == 1 and f"pid {os.getpid()}" in str(errors[0])


def test_a_symlink_at_the_lock_path_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    state = tmp_path / "state"
    state.mkdir()
    (state / LOCK_NAME).symlink_to(elsewhere)
    refused = r"cannot open the lock .*: it is a symbolic link"
    with pytest.raises(LockFailed, match=refused), StateLock(state).hold():
        pass
    assert not elsewhere.exists()


def test_a_fifo_at_the_lock_path_is_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCK_NAME)
    with pytest.raises(LockFailed, match=r"not a regular file"), StateLock(tmp_path).hold():
        pass


def test_the_lock_file_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = os.umask(0)
    try:
        with StateLock(state).hold():
            pass
        assert (state / LOCK_NAME).stat().st_mode & 0o777 == 0o600
        (state / LOCK_NAME).chmod(0o666)
        with StateLock(state).hold():
            pass
        assert (state / LOCK_NAME).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
