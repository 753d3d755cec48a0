"""The chunk index (core/chunkindex.py): a byte-exact build -> parse round trip, and a
hostile index - truncated, padded, any bit flipped, lengths that do not add up,
overlapping frames, bombs - refused in one line, never a traceback or a huge object."""

from __future__ import annotations

import contextlib
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import chunkindex
from core.chunkindex import ENTRY_SIZE, HEADER_SIZE, IndexRejected


def sample(sizes: list[int], gap: int = 0) -> tuple[bytes, list[tuple[int, int, int, bytes]]]:
    raw = b"".join(bytes([i % 251]) * n for i, n in enumerate(sizes))
    chunks, offset, c_off = [], 0, 0
    for n in sizes:
        chunks.append((n, c_off, n // 2 + 1, hashlib.sha256(raw[offset : offset + n]).digest()))
        offset += n
        c_off += n // 2 + 1 + gap
    return raw, chunks


def built(sizes: list[int]) -> bytes:
    raw, chunks = sample(sizes)
    return chunkindex.build(len(raw), hashlib.sha256(raw).hexdigest(), chunks)


def test_round_trip_and_lookups() -> None:
    raw, chunks = sample([65536, 65536, 4096, 65536])
    data = chunkindex.build(len(raw), hashlib.sha256(raw).hexdigest(), chunks)
    assert len(data) == HEADER_SIZE + 4 * ENTRY_SIZE
    index = chunkindex.parse(data, "t")
    assert (index.raw_length, index.raw_sha256) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert [(c.raw_length, c.compressed_offset, c.compressed_length, c.sha256) for c in index] == [
        tuple(c) for c in chunks
    ]
    assert [c.raw_offset for c in index] == [0, 65536, 131072, 135168]
    assert index.at_offset(131072) == index[2]
    assert index.at_offset(131073) is None
    assert index.by_hash()[chunks[3][3]] == index[3]
    assert index.compressed_end == chunks[3][1] + chunks[3][2]
    # Byte-exact: what parse read is what build writes.
    again = [(c.raw_length, c.compressed_offset, c.compressed_length, c.sha256) for c in index]
    assert chunkindex.build(index.raw_length, index.raw_sha256, again) == data


def refused(data: bytes) -> str:
    with pytest.raises(IndexRejected) as info:
        chunkindex.parse(data, "hw/1.0.0/root.index")
    message = str(info.value)
    assert "\n" not in message and message.startswith("chunk index hw/1.0.0/root.index: ")
    return message


def test_hostile_shapes_are_one_line() -> None:
    good = built([65536, 65536, 100])
    assert "header" in refused(good[:10])
    assert "magic" in refused(b"X" + good[1:])
    assert "format version" in refused(good[:8] + b"\x00\x09" + good[10:])
    assert "entries" in refused(good[:-1])
    assert "entries" in refused(good + b"\0")
    with pytest.raises(IndexRejected, match="more than the 100"):
        chunkindex.parse(good, "x", max_length=100)


def entry(raw_length: int, c_off: int, c_len: int) -> bytes:
    return (
        raw_length.to_bytes(4, "big")
        + c_off.to_bytes(8, "big")
        + c_len.to_bytes(4, "big")
        + b"\0" * 32
    )


def with_entries(raw_length: int, *entries: bytes) -> bytes:
    head = (
        b"ABCHUNKS"
        + (1).to_bytes(2, "big")
        + len(entries).to_bytes(4, "big")
        + raw_length.to_bytes(8, "big")
        + b"\0" * 32
    )
    return head + b"".join(entries)


def test_hostile_entries_are_refused() -> None:
    assert "add up" in refused(with_entries(10, entry(5, 0, 5)))
    assert "raw length 0" in refused(with_entries(0, entry(0, 0, 5)))
    too_big = chunkindex.MAX_CHUNK + 1
    assert f"raw length {too_big}" in refused(with_entries(too_big, entry(too_big, 0, 5)))
    assert "frame of 0 bytes" in refused(with_entries(5, entry(5, 0, 0)))
    assert "at most" in refused(with_entries(5, entry(5, 0, 1 << 31)))  # a frame bomb
    assert "overlaps" in refused(with_entries(10, entry(5, 0, 6), entry(5, 5, 6)))
    assert "entries" in refused(with_entries(10)[:HEADER_SIZE])  # zero chunks
    # A count that claims 2**32-1 entries costs nothing: the size is checked first.
    huge = bytearray(with_entries(5, entry(5, 0, 5)))
    huge[10:14] = b"\xff\xff\xff\xff"
    assert "entries" in refused(bytes(huge))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_refused_or_changes_a_field(data: st.DataObject) -> None:
    """Any one bit flipped: refused in one line, or parsed into a different index (the
    TUF hash of the index file is what catches that; this is the parser's bound)."""
    good = built([65536, 65536, 4096])
    bit = data.draw(st.integers(0, len(good) * 8 - 1))
    bad = bytearray(good)
    bad[bit // 8] ^= 1 << (bit % 8)
    try:
        index = chunkindex.parse(bytes(bad), "t")
    except IndexRejected as e:
        assert "\n" not in str(e)
        return
    fields = [(c.raw_length, c.compressed_offset, c.compressed_length, c.sha256) for c in index]
    assert chunkindex.build(index.raw_length, index.raw_sha256, fields) == bytes(bad) != good


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=600))
def test_random_bytes_never_escape_as_another_error(blob: bytes) -> None:
    with contextlib.suppress(IndexRejected):
        chunkindex.parse(blob, "t")


def test_a_4_gib_index_costs_a_few_mib() -> None:
    """The parsed index is flat arrays, 56 bytes a chunk plus a constant (construct's
    compiled parser keeps its last batch): measured on 1 GiB of 64 KiB chunks, linear in
    the count, so the 65,536 chunks of a 4 GiB image cost < 5 MiB."""
    import tracemalloc

    n = 16384
    rng = random.Random(1)
    chunks = [(65536, i * 30000, 30000, rng.randbytes(32)) for i in range(n)]
    data = chunkindex.build(n * 65536, "0" * 64, chunks)
    chunkindex.parse(data, "warm-up")  # construct compiles its parser on first use
    tracemalloc.start()
    try:
        index = chunkindex.parse(data, "t")
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == n and index.raw_length == 1 << 30
    assert current < 60 * n + (1 << 20), current
    assert peak < 120 * n + (2 << 20), peak
