"""The `grub` bootloader backend: RAUC-compatible A/B variables in a grubenv file.

Variables (as RAUC's grub backend and its documented grub.cfg use them):

* `ORDER` - space-separated slot names, first tried first (missing: `"A B"`);
* `<slot>_OK` - `1` if the slot may be booted, `0` if it was invalidated (missing: 0);
* `<slot>_TRY` - `1` once GRUB has started booting the slot, cleared by a commit
  (missing: 0). The shipped script `partition-layouts/grub-efi-ab.cfg` boots the
  first slot of ORDER with `_OK=1 _TRY=0` and sets its `_TRY=1` before booting.

States reported by `GrubState.state`:

| variables | state | meaning |
| --- | --- | --- |
| in ORDER, `_OK=1`, `_TRY=0` | GOOD | GRUB will boot it (committed, or primary not yet booted) |
| in ORDER, `_OK=1`, `_TRY=1` | TRYING | GRUB booted it once and nobody committed yet |
| anything else | BAD | not in ORDER, invalidated, or unreadable values |

What each transition sets (on the value; `GrubBootloader.write` puts it in the file):

| transition | variables |
| --- | --- |
| `try_next(s)` | `ORDER="s other"` (other entries kept after), `s_OK=1 s_TRY=0` |
| `commit(s)` | `s_OK=1 s_TRY=0`, `s` appended to ORDER if missing |
| `invalidate(s)` | `s_OK=0 s_TRY=0` |
| `fall_back(s)` | `invalidate(s)`, then `try_next` and `commit` of the other slot |

A slot made primary by `try_next` reads GOOD until GRUB starts it: the variables are
exactly what RAUC writes, and "pending, not yet confirmed" is the agent's journal's
knowledge, not the bootloader's. After the boot it reads TRYING until `commit`.

Invariants: a `GrubState` is immutable and its transitions do no I/O; `write` is one
`write_grubenv` (one atomic replace of the grubenv, through a symlink to the file it
names), and nothing when the variables are those loaded; transitions are idempotent;
only the named slot's variables and ORDER are changed; unknown variables and unknown
ORDER entries are preserved, and an updated variable keeps its place in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from core.errors import ConfigError
from updater.boot.base import REGISTRY, BootContext, BootState, SlotState, fall_back_from
from updater.disk.grubenv import read_grubenv, write_grubenv
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


def _frozen(env: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(env))


@dataclass(frozen=True)
class GrubState:
    """The grubenv's variables as they will be written (`env`) and as they were
    loaded (`loaded`); see the module docstring for the transitions."""

    env: Mapping[str, str]
    loaded: Mapping[str, str]

    @classmethod
    def of(cls, env: Mapping[str, str]) -> GrubState:
        """The value of a grubenv holding `env` (as `load` returns it)."""
        frozen = _frozen(env)
        return cls(frozen, frozen)

    def _set(self, changes: Mapping[str, str]) -> GrubState:
        # dict.update keeps an existing key in its place and appends a new one, as
        # `grub-editenv set` does.
        env = dict(self.env)
        env.update(changes)
        return replace(self, env=_frozen(env))

    def state(self, slot: str) -> SlotState:
        return slot_state(self.env, slot)

    def primary(self) -> str | None:
        return primary_slot(self.env)

    def invalidate(self, slot: str) -> GrubState:
        _check_slot(slot)
        return self._set({f"{slot}_OK": "0", f"{slot}_TRY": "0"})

    def try_next(self, slot: str) -> GrubState:
        _check_slot(slot)
        rest = [name for name in _order(self.env) if name not in (slot, other(slot))]
        order = " ".join([slot, other(slot), *rest])
        return self._set({"ORDER": order, f"{slot}_OK": "1", f"{slot}_TRY": "0"})

    def commit(self, slot: str) -> GrubState:
        _check_slot(slot)
        order = _order(self.env)
        changes = {f"{slot}_OK": "1", f"{slot}_TRY": "0"}
        if slot not in order:
            # A committed slot must be bootable: append it, keeping the others' order.
            changes = {"ORDER": " ".join([*order, slot]), **changes}
        return self._set(changes)

    def fall_back(self, slot: str) -> GrubState:
        return fall_back_from(self, slot)


class GrubBootloader:
    """Loads and writes the A/B variables of one grubenv file (see the module docstring)."""

    name = "grub"

    def __init__(self, ctx: BootContext) -> None:
        if ctx.grubenv is None:
            raise ConfigError("bootloader grub: no grubenv path configured")
        self.grubenv = ctx.grubenv

    def load(self) -> GrubState:
        return GrubState.of(read_grubenv(self.grubenv))

    def write(self, state: BootState) -> GrubState:
        if not isinstance(state, GrubState):
            raise TypeError(f"grub: cannot write a {type(state).__name__}")
        if state.env == state.loaded:
            return state
        write_grubenv(self.grubenv, state.env)
        return GrubState(state.env, state.env)


REGISTRY["grub"] = GrubBootloader
