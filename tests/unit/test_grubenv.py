"""Unit tests of the grubenv block: layout, escaping, limits, damaged input."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import GrubenvError, UpdaterError
from updater.disk.grubenv import (
    GRUBENV_SIZE,
    SIGNATURE,
    WARNING,
    build_grubenv,
    parse_grubenv,
    read_grubenv,
    update_grubenv,
    write_grubenv,
)

EMPTY = build_grubenv({})


def test_empty_block_layout() -> None:
    assert len(EMPTY) == GRUBENV_SIZE
    assert EMPTY.startswith(SIGNATURE + WARNING)
    assert set(EMPTY[len(SIGNATURE) + len(WARNING) :]) == {ord("#")}
    assert parse_grubenv(EMPTY, "x") == {}


def test_escaping_matches_grub_envblk() -> None:
    block = build_grubenv({"a": "x\\y", "b": "l1\nl2", "c": "sp ace", "d": ""})
    start = len(SIGNATURE) + len(WARNING)
    assert block[start:].startswith(b"a=x\\\\y\nb=l1\\\nl2\nc=sp ace\nd=\n#")


def test_any_escaped_byte_stands_for_itself() -> None:
    # GRUB's reader accepts "\q" for "q", although its writer only escapes \ and newline.
    body = SIGNATURE + b"k=\\q\\\\\n"
    block = body + b"#" * (GRUBENV_SIZE - len(body))
    assert parse_grubenv(block, "x") == {"k": "q\\"}


def test_order_is_kept() -> None:
    env = {"z": "1", "a": "2", "m": "3"}
    assert list(parse_grubenv(build_grubenv(env), "x")) == ["z", "a", "m"]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "empty"),
        ("a=b", "'='"),
        ("a\nb", "'\\n'"),
        ("#a", "starts with '#'"),
        ("a\\b", "'\\\\'"),
    ],
)
def test_invalid_keys_are_refused(key: str, why: str) -> None:
    with pytest.raises(GrubenvError, match=re.escape(why)):
        build_grubenv({key: "v"})


def test_value_that_does_not_fit_names_the_key() -> None:
    with pytest.raises(GrubenvError, match=r"big= does not fit"):
        build_grubenv({"small": "1", "big": "x" * 1000, "after": "1"})


def test_largest_value_that_fits() -> None:
    room = GRUBENV_SIZE - len(SIGNATURE) - len(WARNING) - len("k=\n")
    block = build_grubenv({"k": "v" * room})
    assert parse_grubenv(block, "x") == {"k": "v" * room}
    with pytest.raises(GrubenvError, match="k= does not fit: 1 bytes over"):
        build_grubenv({"k": "v" * (room + 1)})


def test_escapes_count_against_the_size() -> None:
    room = GRUBENV_SIZE - len(SIGNATURE) - len(WARNING) - len("k=\n")
    with pytest.raises(GrubenvError, match="does not fit"):
        build_grubenv({"k": "\\" * (room // 2 + 1)})


def _block(text: bytes) -> bytes:
    return SIGNATURE + text + b"#" * (GRUBENV_SIZE - len(SIGNATURE) - len(text))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (EMPTY[:-1], "size is 1023 bytes"),
        (EMPTY + b"#", "size is 1025 bytes"),
        (b"", "size is 0 bytes"),
        (b"# GRUB Environment Blocc\n" + EMPTY[len(SIGNATURE) :], "signature"),
        (EMPTY[:-10] + b"x" * 10, "padding after line 2 is not all '#'"),
        (_block(b"novalue\n"), "line 2 is not key=value"),
        (_block(b"a=1\na=2\n"), "line 3: duplicate variable 'a'"),
        (_block(b"=1\n"), "empty variable name"),
        (SIGNATURE + b"a=" + b"v" * (GRUBENV_SIZE - len(SIGNATURE) - 2), "runs past"),
        (_block(b"a=1\\\x00\n"), "NUL"),
    ],
)
def test_not_a_grubenv(data: bytes, why: str) -> None:
    with pytest.raises(GrubenvError, match=why) as info:
        parse_grubenv(data, "/esp/grubenv")
    assert str(info.value).startswith("/esp/grubenv")


def test_non_utf8_bytes_round_trip() -> None:
    block = _block(b"k=\xff\xfe\n")
    env = parse_grubenv(block, "x")
    assert build_grubenv(env)[len(SIGNATURE) + len(WARNING) :].startswith(b"k=\xff\xfe\n")


def test_write_read_update(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    write_grubenv(path, {"ORDER": "A B", "A_OK": "1"})
    assert path.read_bytes() == build_grubenv({"ORDER": "A B", "A_OK": "1"})
    env = update_grubenv(path, set={"B_OK": "1", "ORDER": "B A"}, unset=["A_OK"])
    assert env == {"ORDER": "B A", "B_OK": "1"}
    assert list(read_grubenv(path)) == ["ORDER", "B_OK"]
    assert [p.name for p in tmp_path.iterdir()] == ["grubenv"]  # no temp file left


def test_failed_update_leaves_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    write_grubenv(path, {"A_OK": "1"})
    before = path.read_bytes()
    with pytest.raises(GrubenvError, match="huge= does not fit"):
        update_grubenv(path, set={"huge": "x" * 2000})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grubenv"]


def test_read_is_bounded_and_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with path.open("wb") as f:
        f.truncate(1 << 30)  # a 1 GiB sparse file: only 1025 bytes may be read
    with pytest.raises(GrubenvError, match=rf"{path}: .*size is 1025 bytes"):
        read_grubenv(path)


def test_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(GrubenvError, match="not a regular file"):
        read_grubenv(path)


def test_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(GrubenvError) as err:
        read_grubenv(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: not a GRUB environment block: not a regular file (a directory)"
    )
    with pytest.raises(GrubenvError, match="a directory"):
        update_grubenv(tmp_path, set={"A_OK": "1"})
    assert list(tmp_path.iterdir()) == []


def test_reading_follows_a_symlink_to_the_real_file(tmp_path: Path) -> None:
    real = tmp_path / "esp" / "grubenv"
    real.parent.mkdir()
    write_grubenv(real, {"ORDER": "B A"})
    link = tmp_path / "grubenv"
    link.symlink_to(real)
    assert read_grubenv(link) == {"ORDER": "B A"}
    hop = tmp_path / "hop"
    hop.symlink_to(link)
    assert read_grubenv(hop) == {"ORDER": "B A"}


def test_symlinks_to_a_fifo_a_directory_or_nothing_are_refused(tmp_path: Path) -> None:
    fifo, missing = tmp_path / "fifo", tmp_path / "missing"
    os.mkfifo(fifo)
    cases = {fifo: "not a regular file (a FIFO)", tmp_path: "not a regular file (a directory)"}
    for target, why in cases.items():
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        with pytest.raises(
            GrubenvError, match=re.escape(f"{link}: not a GRUB environment block: {why}")
        ):
            read_grubenv(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(missing)
    with pytest.raises(UpdaterError, match="cannot open grubenv: No such file"):
        read_grubenv(dangling)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UpdaterError, match="cannot open grubenv: Too many levels of symbolic"):
        read_grubenv(loop)


def test_missing_file_is_an_environment_error(tmp_path: Path) -> None:
    with pytest.raises(UpdaterError, match="cannot open grubenv"):
        read_grubenv(tmp_path / "nope")


def test_write_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(UpdaterError, match="cannot write grubenv: No such file"):
        write_grubenv(tmp_path / "no" / "grubenv", {})


keys = st.text(
    st.characters(exclude_characters="=\n\\\0", exclude_categories=["Cs"]), min_size=1
).filter(lambda k: not k.startswith("#"))
values = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_round_trip_or_clear_refusal(env: dict[str, str]) -> None:
    try:
        block = build_grubenv(env)
    except GrubenvError as err:
        assert "does not fit" in str(err)
        return
    assert parse_grubenv(block, "x") == env
    assert build_grubenv(parse_grubenv(block, "x")) == block


SAMPLE = build_grubenv({"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "x": "a\\b\nc"})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1100))
def test_random_bytes_only_raise_updater_errors(data: bytes) -> None:
    try:
        env = parse_grubenv(data, "x")
    except UpdaterError as err:
        assert str(err).startswith("x") and "\n" not in str(err)
        return
    assert parse_grubenv(build_grubenv(env), "x") == env


@settings(max_examples=300, deadline=None)
@given(st.integers(0, GRUBENV_SIZE * 8 - 1), st.integers(0, GRUBENV_SIZE))
def test_bit_flips_and_truncations_only_raise_updater_errors(bit: int, cut: int) -> None:
    flipped = bytearray(SAMPLE)
    flipped[bit // 8] ^= 1 << (bit % 8)
    for data in (bytes(flipped), SAMPLE[:cut], bytes(flipped)[:cut] + SAMPLE[cut:]):
        try:
            env = parse_grubenv(data, "x")
        except UpdaterError:
            continue
        # Whatever parses must rebuild to a block that reads back the same variables.
        assert parse_grubenv(build_grubenv(env), "x") == env
