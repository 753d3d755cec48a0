"""Choose and build a bootloader backend for a node's configuration.

Importing this module imports every backend module, and each one adds its factory to
`updater.boot.base.REGISTRY`; `bootloader_for` (from the config's device and slots) and
`make_bootloader` (from a `BootContext`) are the one way the rest of the project gets
a backend. The boot layer, not the agent, decides which partition carries a slot's
gptprio bits (`bits_partitions`).

Invariant: an unknown name is a `ConfigError` that names it and lists the known ones -
never a KeyError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

# Imported for their effect: each backend module registers itself in REGISTRY.
import updater.boot.gptprio
import updater.boot.grub
import updater.boot.sdboot  # noqa: F401
from core.errors import ConfigError
from updater.boot.base import REGISTRY, BootContext, Bootloader
from updater.slots import SLOTS

if TYPE_CHECKING:  # updater.config imports this module for `known_bootloaders`
    from updater.config import DeviceConfig


def known_bootloaders() -> list[str]:
    """Names accepted by `make_bootloader`, sorted."""
    return sorted(REGISTRY)


def make_bootloader(name: str, ctx: BootContext) -> Bootloader:
    """The backend called `name`, constructed for `ctx`."""
    factory = REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown bootloader {name!r}; known bootloaders: {', '.join(known_bootloaders())}"
        )
    return factory(ctx)


def bits_partitions(slots: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """slot -> PARTLABEL of the partition whose GPT attributes carry its boot bits: the
    slot's `boot` partition if it has one (the ChromeOS convention: the partition the
    firmware loads), else its `root` (the same role in both slots)."""
    roles = slots[SLOTS[0]]
    role = "boot" if "boot" in roles else ("root" if "root" in roles else sorted(roles)[0])
    return {slot: slots[slot][role] for slot in SLOTS}


def bootloader_for(device: DeviceConfig, slots: Mapping[str, Mapping[str, str]]) -> Bootloader:
    """The backend the config's `[device]` names, for its disk, grubenv and `slots`
    (slot -> role -> PARTLABEL)."""
    ctx = BootContext(
        disk=device.disk,
        grubenv=device.grubenv,
        slot_partitions=bits_partitions(slots),
        esp=device.esp,
        slot_entries=device.boot_entries,
    )
    return make_bootloader(device.bootloader, ctx)
