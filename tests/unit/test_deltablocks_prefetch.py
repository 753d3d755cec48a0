"""The delta install's prefetch thread (`updater.deltablocks.Prefetch`): items in order,
at most `limit` bytes ahead, the producer's error raised to the taker after the items
before it, and `close` stopping a producer that is waiting for room (its generator
closed, so its open response would be)."""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest

from updater.deltablocks import Prefetch

BOUND = 60.0  # seconds: a generous bound on waiting for the thread


def test_items_in_order_then_the_end() -> None:
    def produce(_: Prefetch) -> Generator[tuple[int, bytes], None, None]:
        for i in range(50):
            yield i, bytes([i]) * 1000

    fetch = Prefetch(produce, limit=4096)
    fetch.peek()
    got = []
    while (item := fetch.take()) is not None:
        got.append(item)
    fetch.close()
    assert got == [(i, bytes([i]) * 1000) for i in range(50)]


def test_the_producers_error_comes_after_its_items() -> None:
    def produce(_: Prefetch) -> Generator[tuple[int, bytes], None, None]:
        yield 0, b"a"
        yield 1, b"b"
        raise ValueError("frame 2 is bad")

    fetch = Prefetch(produce, limit=1 << 20)
    assert fetch.take() == (0, b"a") and fetch.take() == (1, b"b")
    with pytest.raises(ValueError, match="frame 2 is bad"):
        fetch.take()
    fetch.close()


def test_an_error_before_the_first_item_is_raised_by_peek() -> None:
    def produce(_: Prefetch) -> Generator[tuple[int, bytes], None, None]:
        raise OSError("range ignored")
        yield 0, b""  # a generator

    fetch = Prefetch(produce, limit=1)
    with pytest.raises(OSError, match="range ignored"):
        fetch.peek()
    fetch.close()


def test_close_stops_a_producer_waiting_for_room_and_closes_it() -> None:
    closed = threading.Event()
    made = threading.Semaphore(0)
    count = [0]

    def produce(_: Prefetch) -> Generator[tuple[int, bytes], None, None]:
        try:
            for i in range(1000):
                count[0] += 1
                made.release()
                yield i, b"x" * 100
        finally:
            closed.set()

    fetch = Prefetch(produce, limit=250)  # three items held, the fourth waits for room
    for _ in range(4):
        assert made.acquire(timeout=BOUND)
    fetch.close()
    assert closed.is_set() and count[0] == 4  # held back by the limit, then stopped
    assert fetch.take() == (0, b"x" * 100)  # what was fetched stays takeable
