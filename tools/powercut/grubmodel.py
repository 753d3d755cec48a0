"""What the boot chain would do with a disk: the shipped GRUB script's choice as a pure
function of the grubenv's bytes, and the gptprio chooser's as one of the GPT.

`grub_load_env` reads a grubenv the way GRUB 2.06's `load_env` does
(grub-core/lib/envblk.c `grub_envblk_open` + `grub_envblk_iterate`, whitelist of
grub-core/commands/loadenv.c) - not the way the agent's strict parser does: GRUB only
checks the signature, skips `#` lines, takes a name up to the next `=` (newlines
included), honours backslash escapes, stops at a line that runs past the block's end,
and lets a later duplicate win. `grub_decide` then runs the logic of
`partition-layouts/grub-efi-ab.cfg` on those variables: for each slot of ORDER, boot
it if `_OK=1` and `_TRY=0` (recording `_TRY=1` first when the block can be saved) and
its partition has /boot/vmlinuz, else try the next; with no slot, reset `_TRY` of the
`_OK=1` slots and reboot - so a second pass decides, and a third would repeat it.

Invariants: no I/O (the caller reads the bytes and says which slots have a kernel);
the script's defaults and whitelist are the script's (`SCRIPT_DEFAULTS`,
`WHITELIST`), and the console lines it would print are returned so a QEMU boot can be
compared with the model line by line (tests/integration/test_powercut_grub_model.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from updater.disk.gpt import GptDisk

SIGNATURE = b"# GRUB Environment Block\n"
WHITELIST = ("ORDER", "A_OK", "A_TRY", "B_OK", "B_TRY")
SCRIPT_DEFAULTS = {"ORDER": "A B", "A_OK": "0", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}
SLOTS = ("A", "B")
MAX_PASSES = 3  # the third pass would repeat the second: a node that never boots
_WORDS = re.compile(rb"[ \t\r\n]+")


def grub_load_env(raw: bytes | None) -> dict[str, str] | None:
    """The whitelisted variables GRUB's `load_env` sets from a file holding `raw`;
    None if GRUB cannot use it at all (no file, or no signature)."""
    if raw is None or len(raw) < len(SIGNATURE) + 1 or not raw.startswith(SIGNATURE):
        return None
    found: dict[str, str] = {}
    p, end = len(SIGNATURE), len(raw)
    while p < end:
        if raw[p : p + 1] == b"#":
            p = _next_line(raw, p, end)
            continue
        name_start = p
        while p < end and raw[p : p + 1] != b"=":
            p += 1
        if p >= end:
            break  # broken: no '='
        name = raw[name_start:p]
        p += 1
        value_start = p
        while p < end and raw[p : p + 1] != b"\n":
            if raw[p : p + 1] == b"\\":
                p += 1
            p += 1
        if p >= end:
            break  # broken: the line runs past the end
        value = bytearray()
        q = value_start
        while raw[q : q + 1] != b"\n":
            if raw[q : q + 1] == b"\\":
                q += 1
            value.append(raw[q])
            q += 1
        # C strings: a NUL ends the name or the value.
        key = name.split(b"\0", 1)[0].decode("latin-1")
        if key in WHITELIST:
            found[key] = bytes(value).split(b"\0", 1)[0].decode("latin-1")
        p = _next_line(raw, p, end)
    return found


def _next_line(raw: bytes, p: int, end: int) -> int:
    """grub-core/lib/envblk.c `find_next_line`: past the next unescaped newline."""
    while p < end:
        if raw[p : p + 1] == b"\\":
            p += 2
        elif raw[p : p + 1] == b"\n":
            break
        else:
            p += 1
    return p + 1


def _escaped(value: str) -> bytes:
    return value.encode("latin-1").replace(b"\\", b"\\\\").replace(b"\n", b"\\\n")


def grub_envblk_set(buf: bytearray, name: str, value: str) -> bool:
    """GRUB's `grub_envblk_set`, in place on a block: the first `name=` line gets the
    value (the rest of the block moves), or the variable is appended before the `#`
    padding. False when the block is broken or full (GRUB's save_env then fails)."""
    key, val = name.encode("latin-1"), _escaped(value)
    nl, vl = len(key), len(val)
    end = len(buf)
    space = end - 1
    while space >= 0 and buf[space : space + 1] == b"#":
        space -= 1
    if space < 0 or buf[space : space + 1] != b"\n":
        return False  # broken: no newline before the padding
    space += 1
    p = len(SIGNATURE)
    while p + nl + 1 < space:
        if buf[p : p + nl] == key and buf[p + nl : p + nl + 1] == b"=":
            p += nl + 1
            length = 0
            while p + length < end and buf[p + length : p + length + 1] != b"\n":
                length += 2 if buf[p + length : p + length + 1] == b"\\" else 1
            if p + length >= end or end - space < vl - length:
                return False  # broken, or no space
            rest = bytes(buf[p + length :])
            moved = (val + rest)[: end - p]
            buf[p:end] = moved + b"#" * (end - p - len(moved))
            return True
        p = _next_line(bytes(buf), p, end)
    if end - space < nl + 1 + vl + 1:
        return False
    buf[space : space + nl + vl + 2] = key + b"=" + val + b"\n"
    return True


def grub_save_env(raw: bytes, values: Mapping[str, str]) -> bytes | None:
    """The block `save_env --file F NAME...` writes back in place (all of them or, if
    any cannot be set, nothing: None)."""
    if grub_load_env(raw) is None:
        return None
    buf = bytearray(raw)
    for name, value in values.items():
        if not grub_envblk_set(buf, name, value):
            return None
    return bytes(buf)


@dataclass(frozen=True)
class GrubDecision:
    """What the script does with a grubenv, over as many boots as it takes to decide."""

    slot: str | None  # the slot whose kernel GRUB starts; None: it never boots
    passes: int  # 1, or 2 after "NO BOOTABLE SLOT" reset the tries and rebooted
    said: tuple[str, ...]  # its `ab-updater:` console lines, pass after pass
    readable: bool = True  # load_env could use the file
    first_saved: bytes | None = None  # the block as the first boot left it on disk


def grub_decide(raw: bytes | None, has_kernel: Mapping[str, bool]) -> GrubDecision:
    """The slot the shipped script boots from a grubenv holding `raw` (None: missing),
    given which slots' partitions hold /boot/vmlinuz. Each boot loads the block the
    previous one saved (GRUB's save_env rewrites the file in place)."""
    said: list[str] = []
    readable = grub_load_env(raw) is not None
    first_saved: bytes | None = None
    for n in range(1, MAX_PASSES + 1):
        env = dict(SCRIPT_DEFAULTS)  # this boot's variables, in GRUB's memory
        env.update(grub_load_env(raw) or {})
        for word in _WORDS.split(env["ORDER"].encode("latin-1")):
            name = word.decode("latin-1")
            if not name:
                continue
            ok = env[f"{name}_OK"] if name in SLOTS else ""
            tried = env[f"{name}_TRY"] if name in SLOTS else ""
            if ok != "1" or tried != "0":
                said.append(f"skipping slot {name} (OK={ok} TRY={tried})")
                continue
            env[f"{name}_TRY"] = "1"
            saved = grub_save_env(raw, {f"{name}_TRY": "1"}) if raw is not None else None
            if saved is None:
                said.append(f"WARNING: could not save {name}_TRY to $ab_env")
            else:
                raw = saved
            said.append(f"booting slot {name} (ORDER={env['ORDER']})")
            if has_kernel.get(name, False):
                return GrubDecision(name, n, tuple(said), readable, first_saved or raw)
            said.append(f"slot {name}: no /boot/vmlinuz")
            said.append(f"slot {name} could not be booted; trying the next slot of ORDER")
        said.append(
            f"NO BOOTABLE SLOT (ORDER={env['ORDER']} A_OK={env['A_OK']} A_TRY={env['A_TRY']} "
            f"B_OK={env['B_OK']} B_TRY={env['B_TRY']})"
        )
        for slot in SLOTS:
            if env[f"{slot}_OK"] == "1":
                env[f"{slot}_TRY"] = "0"
        tries = {"A_TRY": env["A_TRY"], "B_TRY": env["B_TRY"]}
        saved = grub_save_env(raw, tries) if raw is not None else None
        raw = saved if saved is not None else raw  # unsaved: the next boot repeats this one
        if n == 1:
            first_saved = raw
    return GrubDecision(None, MAX_PASSES, tuple(said), readable, first_saved)


def gptprio_decide(disk: GptDisk, labels: Mapping[str, str]) -> str | None:
    """The slot a gptprio chooser (depthcharge, CoreOS `gptprio.next`, the e2e host's
    `Scenario.gptprio_choose`) boots: the highest priority among the slots with
    `successful`, or `priority > 0` and `tries > 0`; ties go to the lower partition."""
    bootable = []
    for slot, label in labels.items():
        try:
            p = disk.find(label)
        except Exception:  # a slot without its partition cannot be chosen
            continue
        if p.successful or (p.priority > 0 and p.tries > 0):
            bootable.append((-p.priority, p.number, slot))
    return min(bootable)[2] if bootable else None
