"""The version of the running OS image, from its os-release file.

`IMAGE_VERSION=` is systemd's os-release field for image-based systems; the agent uses
it for the booted slot's version when its journal has no record yet (the first boot
of a factory-flashed node). Reads are bounded; a missing file or field is "unknown".
"""

from __future__ import annotations

from pathlib import Path


def image_version(os_release: Path) -> str | None:
    """`IMAGE_VERSION=` of an os-release file (systemd's field for image-based OSes)."""
    try:
        with os_release.open(encoding="utf-8", errors="replace") as f:
            text = f.read(64 * 1024)
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "IMAGE_VERSION":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            return value or None
    return None
