"""tools.powercut.grubmodel: GRUB's reading of a grubenv and the shipped script's choice,
as pure functions (checked against real GRUB in
tests/integration/test_powercut_grub_model.py)."""

from __future__ import annotations

import uuid

import pytest

from tools.powercut.grubmodel import gptprio_decide, grub_decide, grub_load_env
from updater.disk.gpt_table import GptDisk, Partition
from updater.disk.grubenv import build_grubenv

BOTH = {"A": True, "B": True}


def block(**env: str) -> bytes:
    return build_grubenv(env)


def test_reads_what_grub_editenv_writes_and_only_the_whitelist() -> None:
    raw = block(ORDER="B A", A_OK="1", A_TRY="0", B_OK="1", B_TRY="1", root="x", ab_dry_run="1")
    assert grub_load_env(raw) == {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1",
                                  "B_TRY": "1"}  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (b"", None),
        (b"# GRUB Environment Blocx\nA_OK=1\n", None),
        # a later duplicate wins; GRUB does not refuse it
        (b"# GRUB Environment Block\nA_OK=1\nA_OK=0\n###", {"A_OK": "0"}),
        # a name runs up to the next '=', across a newline: "junk\nA_OK" is not A_OK
        (b"# GRUB Environment Block\njunk\nA_OK=1\nB_OK=1\n#", {"B_OK": "1"}),
        # a line running past the end stops the reading; what came before stays
        (b"# GRUB Environment Block\nA_OK=1\nB_OK=1", {"A_OK": "1"}),
        # escapes, and a NUL ends a C string
        (b"# GRUB Environment Block\nORDER=B\\ A\nA_OK=1\x00x\n", {"ORDER": "B A", "A_OK": "1"}),
        # no size check: a short block still loads
        (b"# GRUB Environment Block\nB_TRY=0\n", {"B_TRY": "0"}),
    ],
)
def test_reads_like_grub_envblk(raw: bytes | None, expected: dict[str, str] | None) -> None:
    assert grub_load_env(raw) == expected


def test_a_torn_block_reads_its_first_sector_and_what_the_second_still_says() -> None:
    old = block(X="x" * 390, ORDER="A B", A_OK="1", A_TRY="0", B_OK="0", B_TRY="0")
    new = block(X="x" * 390, ORDER="B A", A_OK="1", A_TRY="0", B_OK="1", B_TRY="0")
    torn = new[:512] + old[512:]
    env = grub_load_env(torn)
    assert env is not None and env["ORDER"] == "B A"  # ORDER is in the first sector
    assert env["B_OK"] == grub_load_env(old)["B_OK"] == "0"  # type: ignore[index]


@pytest.mark.parametrize(
    ("env", "kernels", "slot", "passes", "first_line"),
    [
        ({"ORDER": "A B", "A_OK": "1", "A_TRY": "0"}, BOTH, "A", 1, "booting slot A (ORDER=A B)"),
        ({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "1"}, BOTH, "A", 1,
         "skipping slot B (OK=1 TRY=1)"),
        # A tried and never committed, B invalidated: reset, reboot, A again
        ({"ORDER": "A B", "A_OK": "1", "A_TRY": "1", "B_OK": "0"}, BOTH, "A", 2,
         "skipping slot A (OK=1 TRY=1)"),
        # B's partition has no kernel: the script tries the next slot of ORDER
        ({"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "B_OK": "1", "B_TRY": "0"},
         {"A": True, "B": False}, "A", 1, "booting slot B (ORDER=B A)"),
        # nothing may boot: never boots
        ({"ORDER": "A B", "A_OK": "0", "B_OK": "0"}, BOTH, None, 3, "skipping slot A (OK=0 TRY=0)"),
        # unknown names in ORDER are skipped
        ({"ORDER": "C  B", "B_OK": "1", "B_TRY": "0"}, BOTH, "B", 1, "skipping slot C (OK= TRY=)"),
    ],
)  # fmt: skip
def test_grub_decide(
    env: dict[str, str], kernels: dict[str, bool], slot: str | None, passes: int, first_line: str
) -> None:
    decision = grub_decide(block(**env), kernels)
    assert (decision.slot, decision.passes, decision.said[0]) == (slot, passes, first_line)


def test_an_unreadable_grubenv_never_boots() -> None:
    # The script's defaults are all _OK=0 and save_env cannot fix an unreadable block.
    decision = grub_decide(None, BOTH)
    assert decision.slot is None and not decision.readable
    assert decision.said[-1].startswith("NO BOOTABLE SLOT (ORDER=A B A_OK=0")


def test_the_try_is_saved_in_place_as_grub_editenv_would() -> None:
    raw = block(ORDER="A B", A_OK="1", A_TRY="0")
    decision = grub_decide(raw, BOTH)
    assert decision.first_saved == block(ORDER="A B", A_OK="1", A_TRY="1")


def test_save_env_sets_the_first_of_two_duplicates_and_load_env_reads_the_last() -> None:
    # So resetting the tries cannot clear B_TRY: the next boot still reads B_TRY=1.
    raw = (b"# GRUB Environment Block\nORDER=B A\nA_OK=0\nB_OK=1\nB_TRY=0\nB_TRY=1\n").ljust(
        1024, b"#"
    )
    decision = grub_decide(raw, BOTH)
    assert decision.slot is None
    # The reset appends the absent A_TRY=0; B_TRY's later duplicate still reads 1.
    assert grub_load_env(decision.first_saved) == {**(grub_load_env(raw) or {}), "A_TRY": "0"}


def test_a_block_without_a_newline_before_its_padding_cannot_be_saved() -> None:
    raw = b"# GRUB Environment Block\nORDER=A\nA_OK=1\nA_TRY=0\nX=1" + b"#" * 900
    decision = grub_decide(raw, BOTH)
    assert decision.slot == "A" and decision.first_saved == raw
    assert decision.said[0] == "WARNING: could not save A_TRY to $ab_env"


def _gpt(bits: dict[str, tuple[int, int, int]]) -> GptDisk:
    parts = []
    for n, (name, (prio, tries, ok)) in enumerate(bits.items(), start=2):
        attrs = prio << 48 | tries << 52 | ok << 56
        first = n * 2048
        parts.append(Partition(n, uuid.uuid4(), uuid.uuid4(), first, first + 2047, attrs, name))
    total = 1 << 20
    return GptDisk(
        sector_size=512,
        total_sectors=total,
        disk_guid=uuid.uuid4(),
        first_usable_lba=34,
        last_usable_lba=total - 34,
        partitions=parts,
    )


@pytest.mark.parametrize(
    ("bits", "slot"),
    [
        ({"root_a": (1, 0, 1), "root_b": (2, 1, 0)}, "B"),
        ({"root_a": (1, 0, 1), "root_b": (2, 0, 0)}, "A"),  # B: no tries left
        ({"root_a": (0, 0, 0), "root_b": (0, 0, 0)}, None),
        ({"root_a": (1, 0, 1), "root_b": (1, 0, 1)}, "A"),  # tie: the lower partition
    ],
)
def test_gptprio_decide(bits: dict[str, tuple[int, int, int]], slot: str | None) -> None:
    assert gptprio_decide(_gpt(bits), {"A": "root_a", "B": "root_b"}) == slot
