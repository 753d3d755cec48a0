"""Fault injection for the crash tests of `sign-release`: die at a named step.

`SIGN_RELEASE_FAILPOINT=<step>` makes the process end abruptly (`os._exit`, no cleanup,
no `finally`, no flush - as a power cut or SIGKILL would) when it reaches `<step>`;
without the variable every failpoint is inert. The steps (see `signing.store` and
`signing.repository`):

* `metadata-<role>-temp`, `metadata-<role>`: a published metadata file (`<role>` is
  root, targets, snapshot or timestamp) is complete in its temporary file but not yet
  renamed / has been renamed into place; `metadata-root-copy-temp`, `metadata-root-copy`
  the same for the `root.json` copy;
* `staged-<role>-temp`, `staged-<role>`: the same for a file in `staged/`;
* `publish-dropped-root`: publish has dropped the staged root, not yet staged targets;
* `add-compressing` (first chunk compressed), `add-compressed` (the whole image in its
  temporary file, not yet linked), `add-linked` (linked into targets/, not yet staged).

Invariant: a failpoint never changes what the program does when it does not fire.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

FAILPOINT_ENV = "SIGN_RELEASE_FAILPOINT"
FAILPOINT_EXIT = 137  # what a shell reports for SIGKILL


def failpoint(step: str) -> None:
    """End the process at once if `SIGN_RELEASE_FAILPOINT` names `step`."""
    if os.environ.get(FAILPOINT_ENV) == step:
        os._exit(FAILPOINT_EXIT)


def then_failpoint(data: bytes, step: str) -> Iterator[bytes]:
    """`data` as the chunks `fsutil.atomic_write` streams; `step` fires after the last
    chunk is in the temporary file and before atomic_write renames it into place."""
    yield data
    failpoint(step)
