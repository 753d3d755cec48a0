"""The exception hierarchy of the whole project (agent, mirror and signing tools).

Two roots, as in python-tuf:

* `UpdateRejected` - the data is bad or untrusted: a bad signature, a hash mismatch,
  incompatible hardware, a downgrade, a corrupt GPT or grubenv, an invalid layout.
* `UpdateFailed` - the environment failed: network, disk, permissions, a busy device.

`ConfigError` (a wrong configuration file or option) sits beside them, and
`SlotFailed`, the outcome of a health check whose slot failed. Every error carries what
was being done and on what (file, device, slot, URL, field) in its one-line message;
only the CLIs turn errors into messages and exit codes.

Invariant: each exit code of the three programs is declared here, once, as the
`exit_code` of an error class - 0 is success, and nothing else picks a code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class UpdaterError(Exception):
    """Base of every expected failure; `str(err)` is one line meant for the user.

    `details` are facts a machine reader needs besides the message (the `--json`
    error document carries them); empty for most errors.
    """

    exit_code = 1

    def __init__(self, *args: object, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(*args)
        self.details: Mapping[str, Any] = dict(details or {})

    def __str__(self) -> str:
        text = super().__str__()
        # One line per error, whatever the cause text contained.
        return " ".join(text.split())


class ConfigError(UpdaterError):
    """A configuration file, layout file or command-line value is wrong."""

    exit_code = 2


class UpdateRejected(UpdaterError):
    """The data is bad or untrusted; retrying the same data will not help."""

    exit_code = 3


class SlotFailed(UpdaterError):
    """The booted slot failed its health checks, or the bootloader already gave up on a
    pending one: the node rolled back (or, with no good fallback, stays and says so).
    Raised after the agent has done everything the outcome asks for."""

    exit_code = 5


class UpdateFailed(UpdaterError):
    """The environment failed (I/O, network, permissions); a retry may succeed."""

    exit_code = 4


# --- on-disk formats ---------------------------------------------------------


class FormatError(UpdateRejected):
    """A binary structure (GPT, grubenv) is damaged or is not what it claims to be."""


class GPTError(FormatError):
    """A GPT could not be parsed or is damaged beyond repair."""


class GrubenvError(FormatError):
    """A GRUB environment block is not one, or a value set does not fit in it."""


class LayoutError(ConfigError):
    """A partition layout file is invalid (overlap, size, unknown alias, duplicate)."""


class DeviceError(UpdateFailed):
    """A block device or image file could not be opened, read or written, or is busy."""


class SlotGuardError(UpdateRejected):
    """Something tried to write the booted slot; refused whatever the configuration."""
