"""Choose a bootloader backend by the config's `bootloader` name.

Importing this module imports every backend module that exists, and each one adds
its factory to `updater.boot.base.REGISTRY`; `make_bootloader` is the one way the rest
of the project gets a backend. Invariant: an unknown name is a `ConfigError` that
names it and lists the known ones - never a KeyError.
"""

from __future__ import annotations

import importlib
import importlib.util

import updater.boot.grub  # noqa: F401  (registers "grub")
from core.errors import ConfigError
from updater.boot.base import REGISTRY, BootContext, Bootloader

# Backends that may not be present in every checkout; imported only if they exist so
# that a missing optional backend is an unknown name, not an ImportError at startup.
_OPTIONAL_BACKENDS = ("updater.boot.gptprio",)

for _module in _OPTIONAL_BACKENDS:
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module)


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
