"""Helpers for tests of code that must not block: a FIFO that is always unblocked when
the test ends, and a call that must finish within a generous bound.

A test of "a FIFO does not hang the reader" must itself end when the code under test
does hang (as it did before the fix): `within` runs the call in a daemon thread and
fails the test after `seconds`; `fifo` then opens the FIFO for writing once and closes
it, which releases a reader blocked in open(2) or read(2) with end-of-file, so the
thread ends too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
BOUND = 20.0  # seconds: far more than any of these calls needs, far less than forever


@contextlib.contextmanager
def fifo(path: Path) -> Iterator[Path]:
    """Create a FIFO at `path`; on exit, release any reader still blocked on it."""
    os.mkfifo(path)
    try:
        yield path
    finally:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as err:
            if err.errno not in (errno.ENXIO, errno.ENOENT):  # ENXIO: nobody reading
                raise
        else:
            os.close(fd)


def within(call: Callable[[], T], seconds: float = BOUND) -> T:
    """The result of `call()`, or its exception; fails the test if it is still running
    after `seconds` (the thread is a daemon, so a stuck call cannot keep pytest alive)."""
    outcome: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as err:  # re-raised in the test's thread below
            error.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still blocked after {seconds:g} s")
    if error:
        raise error[0]
    return outcome[0]
