"""The `grub` bootloader backend: RAUC-compatible A/B variables in a grubenv file.

Variables (as RAUC's grub backend and its documented grub.cfg use them):

* `ORDER` - space-separated slot names, first tried first (missing: `"A B"`);
* `<slot>_OK` - `1` if the slot may be booted, `0` if it was invalidated (missing: 0);
* `<slot>_TRY` - `1` once GRUB has started booting the slot, cleared by a commit
  (missing: 0). The shipped script `partition-layouts/grub-efi-ab.cfg` boots the
  first slot of ORDER with `_OK=1 _TRY=0` and sets its `_TRY=1` before booting.

States reported by `get_state`:

| variables | state | meaning |
| --- | --- | --- |
| in ORDER, `_OK=1`, `_TRY=0` | GOOD | GRUB will boot it (committed, or primary not yet booted) |
| in ORDER, `_OK=1`, `_TRY=1` | TRYING | GRUB booted it once and nobody committed yet |
| anything else | BAD | not in ORDER, invalidated, or unreadable values |

A slot made primary by `set_primary` reads GOOD until GRUB starts it: the variables
are exactly what RAUC writes, and "pending, not yet confirmed" is the agent's journal's
knowledge, not the bootloader's. After the boot it reads TRYING until
`set_state(slot, good=True)` commits it.

Invariants: every mutation is one `update_grubenv` call (one atomic grubenv write);
mutations are idempotent; only the named slot's variables and ORDER are changed;
unknown variables and unknown ORDER entries are preserved.
"""

from __future__ import annotations

from collections.abc import Mapping

from core.errors import ConfigError
from updater.boot.base import REGISTRY, BootContext, SlotState
from updater.disk.grubenv import read_grubenv, update_grubenv
from updater.slots import SLOTS, other

DEFAULT_ORDER = " ".join(SLOTS)


def initial_grubenv(good: str = SLOTS[0]) -> dict[str, str]:
    """Variables of a freshly provisioned disk: `good` committed, the other slot empty."""
    _check_slot(good)
    env = {"ORDER": f"{good} {other(good)}"}
    for slot in SLOTS:
        env[f"{slot}_OK"] = "1" if slot == good else "0"
        env[f"{slot}_TRY"] = "0"
    return env


def _check_slot(slot: str) -> None:
    if slot not in SLOTS:
        raise ConfigError(f"grub: unknown slot {slot!r}; slots are {', '.join(SLOTS)}")


def _order(env: Mapping[str, str]) -> list[str]:
    return env.get("ORDER", DEFAULT_ORDER).split()


def slot_state(env: Mapping[str, str], slot: str) -> SlotState:
    """The state of `slot` in a grubenv's variables (pure: no I/O)."""
    _check_slot(slot)
    if slot not in _order(env) or env.get(f"{slot}_OK", "0") != "1":
        return SlotState.BAD
    tried = env.get(f"{slot}_TRY", "0")
    if tried == "0":
        return SlotState.GOOD
    if tried == "1":
        return SlotState.TRYING
    return SlotState.BAD  # a value GRUB's script would not boot


def primary_slot(env: Mapping[str, str]) -> str | None:
    """The slot GRUB's script boots next: first of ORDER that is GOOD (pure: no I/O)."""
    for name in _order(env):
        if name in SLOTS and slot_state(env, name) is SlotState.GOOD:
            return name
    return None


class GrubBootloader:
    """Reads and edits the A/B variables of one grubenv file (see the module docstring)."""

    name = "grub"

    def __init__(self, ctx: BootContext) -> None:
        if ctx.grubenv is None:
            raise ConfigError("bootloader grub: no grubenv path configured")
        self.grubenv = ctx.grubenv

    def get_state(self, slot: str) -> SlotState:
        _check_slot(slot)
        return slot_state(read_grubenv(self.grubenv), slot)

    def set_state(self, slot: str, good: bool) -> None:
        _check_slot(slot)
        if good:
            env = read_grubenv(self.grubenv)
            order = _order(env)
            changes = {f"{slot}_OK": "1", f"{slot}_TRY": "0"}
            if slot not in order:
                # A committed slot must be bootable: append it, keeping the others' order.
                changes = {"ORDER": " ".join([*order, slot]), **changes}
            update_grubenv(self.grubenv, set=changes)
        else:
            update_grubenv(self.grubenv, set={f"{slot}_OK": "0", f"{slot}_TRY": "0"})

    def get_primary(self) -> str | None:
        return primary_slot(read_grubenv(self.grubenv))

    def set_primary(self, slot: str) -> None:
        _check_slot(slot)
        env = read_grubenv(self.grubenv)
        rest = [name for name in _order(env) if name not in (slot, other(slot))]
        order = " ".join([slot, other(slot), *rest])
        update_grubenv(self.grubenv, set={"ORDER": order, f"{slot}_OK": "1", f"{slot}_TRY": "0"})


REGISTRY["grub"] = GrubBootloader
