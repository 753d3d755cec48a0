"""The node as the agent sees it: its slots' partitions (from the disk's GPT), the
booted slot, the bootloader, the journal and the state directory's lock.

`updater.agent.Agent` builds on `Node` with the operations that change the node; this
module only reads (the journal save aside) and says how a change is made safe against
a second agent: `changes_node` runs a method holding the lock (`updater.lock`).

Invariants:
* everything is read lazily and cached per object (cheap to build; `status` reads no
  more than it shows: the journal once, the bootloader state once); `forget_disk`
  drops the cached partitions so that a long-lived daemon reads - and so checks - the
  GPT again for each cycle;
* the journal and the boot state are values, never cached here: a command loads each
  once (`journal()`, `boot.load()`) and passes them along; a command that changes the
  node loads them under the lock, so nobody changes them between its load and its
  write (a check's outcome is recorded in a journal read again under the lock, or not
  at all while another process holds it).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from core.errors import UpdateFailed
from updater.boot.base import Bootloader, SlotState
from updater.boot.registry import bootloader_for
from updater.config import Config
from updater.disk import blockdev
from updater.lock import StateLock
from updater.osrelease import image_version
from updater.slots import SLOTS, FileTarget, PartitionTarget, Target, file_path, is_file_role
from updater.state import Journal, load_journal, save_journal

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")
_N = TypeVar("_N", bound="Node")


def changes_node(
    method: Callable[Concatenate[_N, _P], _R],
) -> Callable[Concatenate[_N, _P], _R]:
    """Run a `Node` method holding the state directory's lock (re-entrant, so one
    such method may call another): a second process fails at once, or waits when the
    node was built with `wait`."""

    @functools.wraps(method)
    def locked(node: _N, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with node.lock.hold(wait=node.wait):
            return method(node, *args, **kwargs)

    return locked


class Node:
    """One node of one configuration. `wait`: when another process holds the state
    directory's lock, a `changes_node` method waits for it instead of raising
    `LockBusy` at once."""

    def __init__(self, config: Config, *, wait: bool = False) -> None:
        self.config = config
        self.state_dir = config.device.state_dir
        self.wait = wait
        self.lock = StateLock(self.state_dir)
        self._targets: dict[str, dict[str, PartitionTarget]] | None = None
        self._booted: str | None = None
        self._boot: Bootloader | None = None

    @property
    def targets(self) -> dict[str, dict[str, PartitionTarget]]:
        """slot -> role -> partition, from the disk's GPT (and udev where it runs); the
        roles that are partitions (not `file:` roles)."""
        if self._targets is None:
            partitions = {
                slot: {r: v for r, v in roles.items() if not is_file_role(v)}
                for slot, roles in self.config.slots.items()
            }
            self._targets = blockdev.find_slot_partitions(self.config.device.disk, partitions)
        return self._targets

    @property
    def slot_targets(self) -> dict[str, dict[str, Target]]:
        """slot -> role -> partition or file: every role of the config. A file's size is
        the free space on its filesystem (the ESP) now."""
        found: dict[str, dict[str, Target]] = {s: dict(t) for s, t in self.targets.items()}
        device = self.config.device
        for slot, roles in self.config.slots.items():
            for role, value in roles.items():
                if not is_file_role(value):
                    continue
                assert device.esp is not None  # the config requires it for file roles
                path = file_path(value)
                entry = device.boot_entries.get(slot, "").casefold() == path.casefold()
                found[slot][role] = FileTarget(
                    slot, role, device.esp, path, size=_free_bytes(device.esp), entry=entry
                )
        return found

    def forget_disk(self) -> None:
        """Read the partitions (the GPT) again on next use."""
        self._targets = None

    @property
    def booted(self) -> str:
        if self._booted is None:
            device = self.config.device
            loader_slot = None
            if device.boot_entries and device.booted_slot == "auto":
                from updater.boot.sdboot import loader_entry_selected, slot_of_entry

                selected = loader_entry_selected()
                if selected is not None:
                    loader_slot = slot_of_entry(selected, device.boot_entries)
            self._booted = blockdev.booted_slot(self.targets, device.booted_slot, loader_slot)
        return self._booted

    @property
    def boot(self) -> Bootloader:
        if self._boot is None:
            self._boot = bootloader_for(self.config.device, self.config.slots)
        return self._boot

    def journal(self) -> Journal:
        """The journal as it is on disk now (one read)."""
        return load_journal(self.state_dir)

    def _save(self, journal: Journal) -> None:
        save_journal(self.state_dir, journal)

    def _record_check(self, error: str | None) -> None:
        """Save a check's outcome in a journal read again under the lock - or not at all
        if another process holds the lock: a check never waits, and its journal write
        must not overwrite the one the lock holder makes meanwhile (a lost update)."""
        with self.lock.attempt() as held:
            if held:
                self._save(self.journal().with_check(error))
            else:
                log.info("another updater holds %s: this check is not recorded", self.lock.path)

    def installed_version(self, journal: Journal) -> str | None:
        """The booted slot's version: the journal's record, else the image's os-release."""
        return journal.version_in(self.booted) or image_version(self.config.device.os_release)

    def status(self) -> dict[str, Any]:
        journal = self.journal()
        booted = self.booted
        boot = self.boot.load()
        slots: dict[str, Any] = {}
        for slot in SLOTS:
            state = boot.state(slot)
            label = state.value
            if slot == booted and state is not SlotState.GOOD:
                label = SlotState.TRYING.value  # booted but not committed yet
            slots[slot] = {
                "state": label,
                "version": self.installed_version(journal)
                if slot == booted
                else journal.version_in(slot),
                "booted": slot == booted,
                "partitions": {r: t.label for r, t in sorted(self.slot_targets[slot].items())},
            }
        pending = journal.pending
        return {
            "booted_slot": booted,
            "primary_slot": boot.primary(),
            "bootloader": self.config.device.bootloader,
            "hardware": self.config.device.hardware,
            "channel": self.config.device.channel,
            "slots": slots,
            "pending": None
            if pending is None
            else {"slot": pending.slot, "version": pending.version, "since": pending.since},
            "failed_versions": sorted(journal.failed_versions),
            "last_check": journal.last_check,
            "last_error": journal.last_error,
            "last_install": None if journal.last_install is None else asdict(journal.last_install),
            "last_commit": None if journal.last_commit is None else asdict(journal.last_commit),
            "waiting": journal.waiting,
            "lock_held": journal.lock_held,
            "withdrawn": self._withdrawn(self.installed_version(journal)),
        }

    def _withdrawn(self, version: str | None) -> str | None:
        """`version` if the newest verified targets metadata (the TUF cache the last
        refresh left) withdraws it; read as JSON, no tuf import (fast `status`)."""
        if version is None:
            return None
        from updater.rollout import withdrawn_in_cache

        return (
            version
            if withdrawn_in_cache(self.state_dir / "tuf", self.config.device, version)
            else None
        )


def _free_bytes(path: Path) -> int:
    """Bytes a file may still take on the filesystem of `path` (1 if it is full, so that
    a plan refuses every image naming the size instead of failing on a zero size)."""
    try:
        st = os.statvfs(path)
    except OSError as err:
        raise UpdateFailed(f"[device] esp {path}: {err.strerror}") from err
    return max(st.f_bavail * st.f_frsize, 1)
