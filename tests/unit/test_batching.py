"""The micro-batcher: size and time flushes, order, backpressure, close, validation.

pytest-asyncio is not a dependency: each test drives its own loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pipeline.batching import Batcher


class Recorder:
    """A batch handler that records each batch and when it was handed over."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.times: list[float] = []
        self.hold = hold
        self.flushed = asyncio.Event()

    async def __call__(self, batch: list[Any]) -> None:
        self.batches.append(list(batch))
        self.times.append(time.monotonic())
        self.flushed.set()
        if self.hold is not None:
            await self.hold.wait()


def test_flushes_when_full_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=4, max_delay_s=30.0, max_pending=16)
        b.start()
        t0 = time.monotonic()
        for i in range(4):
            await b.put(i)
        await asyncio.wait_for(rec.flushed.wait(), 5)
        assert rec.batches == [[0, 1, 2, 3]]
        assert rec.times[0] - t0 < 1.0  # far below the 30 s window
        await b.put(4)
        await b.close()
        assert rec.batches == [[0, 1, 2, 3], [4]]

    asyncio.run(main())


def test_many_items_are_cut_into_full_batches() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=3, max_delay_s=30.0, max_pending=100)
        b.start()
        for i in range(10):
            await b.put(i)
        await b.close()
        assert [len(x) for x in rec.batches] == [3, 3, 3, 1]
        assert [i for x in rec.batches for i in x] == list(range(10))

    asyncio.run(main())


def test_lone_item_waits_about_max_delay() -> None:
    delay = 0.1

    async def main() -> None:
        rec = Recorder()
        b: Batcher[str] = Batcher(rec, max_batch_size=8, max_delay_s=delay, max_pending=8)
        b.start()
        t0 = time.monotonic()
        await b.put("a")
        await asyncio.wait_for(rec.flushed.wait(), 5)
        waited = rec.times[0] - t0
        assert rec.batches == [["a"]]
        assert delay * 0.9 <= waited <= delay * 3, waited
        await b.close()

    asyncio.run(main())


def test_window_counts_from_the_first_item_not_the_last() -> None:
    delay = 0.25

    async def main() -> None:
        rec = Recorder()
        b: Batcher[str] = Batcher(rec, max_batch_size=8, max_delay_s=delay, max_pending=8)
        b.start()
        t0 = time.monotonic()
        await b.put("first")
        await asyncio.sleep(delay * 0.7)
        await b.put("late")  # arrives late in the window; must not extend it
        await asyncio.wait_for(rec.flushed.wait(), 5)
        waited = rec.times[0] - t0
        assert rec.batches == [["first", "late"]]
        # Counted from "late", the window would close at 1.7 x delay.
        assert delay * 0.9 <= waited < delay * 1.4, waited
        await b.close()

    asyncio.run(main())


def test_each_window_starts_with_its_own_first_item() -> None:
    delay = 0.05

    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=8, max_delay_s=delay, max_pending=8)
        b.start()
        await b.put(1)
        await asyncio.wait_for(rec.flushed.wait(), 5)
        rec.flushed.clear()
        await asyncio.sleep(delay * 2)  # idle: nothing is flushed
        assert rec.batches == [[1]]
        t1 = time.monotonic()
        await b.put(2)
        await asyncio.wait_for(rec.flushed.wait(), 5)
        assert rec.batches == [[1], [2]]
        assert delay * 0.9 <= rec.times[1] - t1 <= delay * 3
        await b.close()

    asyncio.run(main())


def test_zero_delay_flushes_immediately() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=8, max_delay_s=0, max_pending=8)
        b.start()
        t0 = time.monotonic()
        await b.put(1)
        await asyncio.wait_for(rec.flushed.wait(), 5)
        assert rec.times[0] - t0 < 0.05
        await b.close()
        assert rec.batches == [[1]]

    asyncio.run(main())


def test_order_is_preserved_across_batches() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=5, max_delay_s=0.001, max_pending=7)
        b.start()
        for i in range(200):
            await b.put(i)
            if i % 13 == 0:
                await asyncio.sleep(0.002)  # let some windows expire part-full
        await b.close()
        flat = [i for x in rec.batches for i in x]
        assert flat == list(range(200))
        assert all(1 <= len(x) <= 5 for x in rec.batches)
        assert any(len(x) < 5 for x in rec.batches[:-1])  # some flushed by time

    asyncio.run(main())


def test_put_blocks_at_max_pending_until_the_handler_finishes() -> None:
    async def main() -> None:
        hold = asyncio.Event()
        rec = Recorder(hold)
        b: Batcher[int] = Batcher(rec, max_batch_size=2, max_delay_s=0.001, max_pending=3)
        b.start()
        for i in range(3):
            await b.put(i)
        assert b.pending == 3
        await asyncio.wait_for(rec.flushed.wait(), 5)  # the handler holds [0, 1]
        blocked = asyncio.ensure_future(b.put(3))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # 3 pending: two being handled, one queued
        assert b.pending == 3
        hold.set()  # the handler returns: capacity for two more
        await asyncio.wait_for(blocked, 5)
        await b.close()
        assert rec.batches == [[0, 1], [2, 3]] or rec.batches == [[0, 1], [2], [3]]
        assert b.pending == 0

    asyncio.run(main())


def test_pending_counts_down_after_handling() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=4, max_delay_s=0.01, max_pending=8)
        b.start()
        for i in range(6):
            await b.put(i)
        assert b.pending == 6
        await b.close()
        assert b.pending == 0

    asyncio.run(main())


def test_close_flushes_the_remainder_without_waiting_for_the_window() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=4, max_delay_s=30.0, max_pending=16)
        b.start()
        for i in range(6):
            await b.put(i)
        t0 = time.monotonic()
        await asyncio.wait_for(b.close(), 5)
        assert time.monotonic() - t0 < 1.0
        assert rec.batches == [[0, 1, 2, 3], [4, 5]]

    asyncio.run(main())


def test_put_after_close_is_refused() -> None:
    async def main() -> None:
        b: Batcher[int] = Batcher(Recorder(), max_batch_size=1, max_delay_s=0, max_pending=1)
        b.start()
        await b.close()
        with pytest.raises(RuntimeError, match="closed"):
            await b.put(1)

    asyncio.run(main())


def test_close_of_an_idle_batcher_returns() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[int] = Batcher(rec, max_batch_size=2, max_delay_s=1.0, max_pending=2)
        b.start()
        await asyncio.sleep(0.01)
        await asyncio.wait_for(b.close(), 5)
        assert rec.batches == []

    asyncio.run(main())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 1.5}, "max_batch_size must be an integer >= 1, got 1.5"),
        ({"max_batch_size": "8"}, "max_batch_size must be an integer >= 1, got '8'"),
        ({"max_delay_s": -0.1}, "max_delay_s must be a number >= 0, got -0.1"),
        ({"max_delay_s": "1"}, "max_delay_s must be a number >= 0, got '1'"),
        ({"max_pending": 4}, "max_pending must be an integer >= max_batch_size (8), got 4"),
        ({"max_pending": 16.0}, "max_pending must be an integer >= max_batch_size (8), got 16.0"),
    ],
)
def test_constructor_validation_names_the_bad_value(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"max_batch_size": 8, "max_delay_s": 0.01, "max_pending": 16}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        Batcher(Recorder(), **args)
    assert str(info.value) == message


def test_a_failing_handler_does_not_stop_later_batches() -> None:
    # One batch whose handler raises (a publish that fails, say) must not kill the flush
    # loop: otherwise every later item is queued and never handled, and put() blocks for good
    # once max_pending items are stuck.
    async def main() -> None:
        handled: list[list[int]] = []
        second = asyncio.Event()

        async def handler(batch: list[int]) -> None:
            if batch == [0]:
                raise RuntimeError("publish failed")
            handled.append(batch)
            second.set()

        b: Batcher[int] = Batcher(handler, max_batch_size=1, max_delay_s=0, max_pending=1)
        b.start()
        try:
            await b.put(0)
            await asyncio.wait_for(b.put(1), 1)
            await asyncio.wait_for(second.wait(), 1)
            assert handled == [[1]]
        except asyncio.TimeoutError:
            pytest.fail("the batcher stopped handling batches after a handler raised")
        finally:
            task = b._task
            if task is not None and task.done() and not task.cancelled():
                task.exception()  # retrieved: no "Task exception was never retrieved" noise
        await asyncio.wait_for(b.close(), 1)

    asyncio.run(main())
