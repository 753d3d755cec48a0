"""Linux inotify through ctypes: what the kernel saw happen to a file, for tests that
count real writes (not calls into our code).

`Watch` queues the events of the paths it was given from the moment `add` returns;
`drain()` takes what is queued so far without blocking. The kernel queues an event
during the system call that causes it, so after a child process has exited every one
of its events is in the queue. Only what the tests need: IN_CLOSE_WRITE (a file opened
for writing was closed), IN_MOVED_TO (a name in a watched directory was renamed over -
an atomic replacement), IN_OPEN and IN_CLOSE_NOWRITE.

The kernel merges an event into the last one queued if they are identical, so two
writes (or two opens) in a row would count as one: watch every open and every close,
so that something different always comes between two of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class Event:
    path: Path  # the watched path, joined with `name` for a directory's entry
    mask: int
    name: str


class Watch:
    """An inotify instance; close it (or use it as a context manager) when done."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.fd: int = fd
        self._paths: dict[int, Path] = {}

    def add(self, path: Path, mask: int) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self._paths[wd] = path

    def drain(self) -> list[Event]:
        """Every event queued so far (never blocks)."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError as err:
                if err.errno == errno.EAGAIN:
                    return events
                raise
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, size = _HEADER.unpack_from(data, pos)
                pos += _HEADER.size
                name = data[pos : pos + size].rstrip(b"\0").decode()
                pos += size
                if mask & IN_Q_OVERFLOW:
                    raise AssertionError("inotify queue overflowed: events were lost")
                base = self._paths[wd]
                events.append(Event(base / name if name else base, mask, name))

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
