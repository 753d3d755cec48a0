"""The version of the running OS image, from its os-release file.

`IMAGE_VERSION=` is systemd's os-release field for image-based systems; the agent uses
it for the booted slot's version when its journal has no record yet (the first boot
of a factory-flashed node). A missing file or field is "unknown"; a file that is not a
regular file (a FIFO would block the agent forever), is larger than 64 KiB or cannot be
read is a `ConfigError` naming it - the config's `[device] os_release` points at it.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError
from core.fsutil import read_regular

MAX_OS_RELEASE_BYTES = 64 * 1024


def image_version(os_release: Path) -> str | None:
    """`IMAGE_VERSION=` of an os-release file (systemd's field for image-based OSes)."""
    try:
        text = read_regular(os_release, MAX_OS_RELEASE_BYTES).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"os-release file {os_release}: {err.strerror or err}") from err
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "IMAGE_VERSION":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            return value or None
    return None
