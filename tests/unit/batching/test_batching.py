"""The batcher: size, delay and deadline flushes, expiry, buckets, order, bounds, validation.

pytest-asyncio is not a dependency: each test drives its own loop with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from typing import Any

import numpy as np
import pytest

from pipeline.batching.batcher import Batcher
from pipeline.batching.scheduler import (
    EWMA_ALPHA,
    BatchPolicy,
    Scheduler,
    bucket_for,
    default_buckets,
    pad_sequences,
)


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
        except TimeoutError:
            pytest.fail("the batcher stopped handling batches after a handler raised")
        finally:
            task = b._task
            if task is not None and task.done() and not task.cancelled():
                task.exception()  # retrieved: no "Task exception was never retrieved" noise
        await asyncio.wait_for(b.close(), 1)

    asyncio.run(main())


# -- the pure core: Scheduler, BatchPolicy, buckets -------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scheduler(
    clock: Clock, max_batch_size: int = 4, max_delay_s: float = 1.0, **kw: Any
) -> Scheduler[str, int]:
    policy = BatchPolicy(max_batch_size, max_delay_s, **kw)
    return Scheduler(lambda _key: policy, clock, max_pending=64)


def test_scheduler_flushes_on_size_at_once() -> None:
    clock = Clock()
    s = scheduler(clock)
    for i in range(3):
        s.add("m", i)
    assert s.poll() is None
    s.add("m", 3)
    s.add("m", 4)
    flush = s.poll()
    assert flush is not None
    assert (flush.key, flush.items, flush.expired, flush.bucket) == ("m", [0, 1, 2, 3], [], 4)
    assert s.poll() is None  # one left, window not over
    assert s.pending == 1


def test_scheduler_flushes_max_delay_after_the_first_request() -> None:
    clock = Clock(100.0)
    s = scheduler(clock, max_delay_s=1.0)
    s.add("m", 0)  # arrives now: window ends at 101
    clock.t = 100.6
    s.add("m", 1)
    assert s.next_deadline() == pytest.approx(101.0)
    clock.t = 100.99
    assert s.poll() is None
    clock.t = 101.0
    flush = s.poll()
    assert flush is not None and flush.items == [0, 1] and flush.bucket == 2
    # The next window starts with the next batch's own first request.
    s.add("m", 2, arrived_s=100.5)  # produced earlier, waited elsewhere: counted from then
    assert s.next_deadline() == pytest.approx(101.5)
    assert s.poll() is None
    clock.t = 101.5
    flush = s.poll()
    assert flush is not None and flush.items == [2] and flush.bucket == 1


def test_adaptive_window_flushes_at_once_while_the_model_is_idle() -> None:
    """An idle model takes what has come at once; a busy one lets the next batch fill up to
    its size or its window, as the fixed window does; other models are not held back."""
    clock = Clock(100.0)
    s = scheduler(clock, max_batch_size=4, max_delay_s=1.0, adaptive=True)
    busy: set[str] = set()

    def idle(key: str) -> bool:
        return key not in busy

    s.add("m", 0)
    s.add("m", 1)
    flush = s.poll(idle=idle)
    assert flush is not None and flush.items == [0, 1] and flush.bucket == 2
    busy.add("m")  # that batch now runs
    s.add("m", 2)
    s.add("n", 9)  # another model, idle
    flush = s.poll(idle=idle)
    assert flush is not None and flush.key == "n" and flush.items == [9]
    assert s.poll(idle=idle) is None  # "m" waits: its model is busy and the window is open
    for i in (3, 4, 5):
        s.add("m", i)
    flush = s.poll(idle=idle)  # full while busy: as the fixed window
    assert flush is not None and flush.items == [2, 3, 4, 5]
    s.add("m", 6)
    clock.t = 101.0  # busy, but the window of its first request is over
    flush = s.poll(idle=idle)
    assert flush is not None and flush.items == [6]
    busy.clear()
    s.add("m", 7)
    assert s.poll() is None  # without ``idle`` the window is the fixed one
    assert (flush := s.poll(idle=idle)) is not None and flush.items == [7]


def test_fixed_window_waits_even_when_the_model_is_idle() -> None:
    clock = Clock(100.0)
    s = scheduler(clock, max_batch_size=4, max_delay_s=1.0)
    s.add("m", 0)
    assert s.poll(idle=lambda _key: True) is None
    clock.t = 101.0
    assert (flush := s.poll(idle=lambda _key: True)) is not None and flush.items == [0]


def test_scheduler_flushes_early_for_the_earliest_deadline() -> None:
    clock = Clock(0.0)
    s = scheduler(clock, max_delay_s=10.0)
    s.observe("m", 1, 1.0)  # a batch of 1 takes about a second
    s.add("m", "late", deadline_s=8.0)
    s.add("m", "soon", deadline_s=5.0)  # bucket 2: estimated from bucket 1, scaled
    assert s.estimate("m", 2) == pytest.approx(2.0)
    assert s.next_deadline() == pytest.approx(3.0)  # 5 - 2 s, long before 10
    clock.t = 2.9
    assert s.poll() is None
    clock.t = 3.0
    flush = s.poll()
    assert flush is not None and flush.items == ["late", "soon"] and flush.expired == []


def test_scheduler_splits_out_expired_requests_never_to_run() -> None:
    clock = Clock(0.0)
    s = scheduler(clock, max_batch_size=8, max_delay_s=10.0)
    s.add("m", "a", deadline_s=1.0)
    s.add("m", "b")
    s.add("m", "c", deadline_s=50.0)
    assert s.next_deadline() == pytest.approx(1.0)
    clock.t = 1.0
    flush = s.poll()
    assert flush is not None and flush.expired == ["a"] and flush.items == []
    assert s.pending == 2
    rest = s.drain()
    assert [f.items for f in rest] == [["b", "c"]]
    assert all(not f.expired for f in rest)
    assert s.pending == 0 and s.next_deadline() is None


def test_scheduler_ewma_of_batch_times() -> None:
    s = scheduler(Clock())
    assert s.estimate("m", 4) is None
    s.observe("m", 4, 1.0)
    s.observe("m", 4, 2.0)
    assert s.estimate("m", 4) == pytest.approx(1.0 + EWMA_ALPHA * 1.0)
    assert s.estimate("m", 2) == pytest.approx(1.2)  # bounded by the larger bucket's time
    assert s.estimate("other", 4) is None


def test_scheduler_caps_a_batch_to_its_time_budget() -> None:
    clock = Clock()
    s = scheduler(clock, max_batch_size=8, time_budget_s=0.01)
    s.observe("m", 8, 0.02)
    s.observe("m", 4, 0.008)
    for i in range(8):
        s.add("m", i)
    first = s.poll()
    assert first is not None and first.items == [0, 1, 2, 3] and first.bucket == 4
    second = s.poll()
    assert second is not None and second.items == [4, 5, 6, 7]


def test_scheduler_serves_the_longest_waiting_model_first() -> None:
    clock = Clock(0.0)
    policy = BatchPolicy(2, 0.5)
    s: Scheduler[str, str] = Scheduler(lambda _k: policy, clock, max_pending=64)
    s.add("quiet", "q0", arrived_s=0.0)
    clock.t = 1.0
    for i in range(6):  # a busy model, always full
        s.add("busy", f"b{i}", arrived_s=1.0)
    order = [f.key for f in iter(s.poll, None)]
    assert order[0] == "quiet"  # due since 0.5: before the busy model's full batches
    assert order.count("busy") == 3


def test_scheduler_edf_within_a_queue_when_over_the_cap() -> None:
    clock = Clock(0.0)
    s = scheduler(clock, max_batch_size=2, max_delay_s=10.0)
    s.add("m", "x", deadline_s=90.0)
    s.add("m", "y")
    s.add("m", "z", deadline_s=20.0)
    flush = s.poll()
    assert flush is not None and flush.items == ["x", "z"]  # arrival order kept in the batch


def test_scheduler_bounds_what_it_holds() -> None:
    policy = BatchPolicy(4, 1.0)
    s: Scheduler[str, int] = Scheduler(lambda _k: policy, Clock(), max_pending=3)
    for i in range(3):
        s.add("m", i)
    assert s.full
    with pytest.raises(OverflowError, match="max_pending=3"):
        s.add("m", 3)
    assert s.pending == 3
    with pytest.raises(ValueError, match="max_pending must be an integer >= 1, got 0"):
        Scheduler(lambda _k: policy, Clock(), max_pending=0)


def test_buckets_and_bucket_for() -> None:
    assert default_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert default_buckets(1) == (1,)
    assert bucket_for(5, (1, 8, 32)) == 8
    assert bucket_for(8, (1, 8, 32)) == 8
    with pytest.raises(ValueError, match="33 is larger than the largest bucket 32"):
        bucket_for(33, (1, 8, 32))


def test_pad_sequences_pads_to_the_bucket_with_a_mask() -> None:
    rows = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])]
    batch, mask = pad_sequences(rows, (4, 8, 16), pad=-1)
    assert batch.shape == (3, 8) and mask.shape == (3, 8)
    np.testing.assert_array_equal(batch[0], [1, 2, 3, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(batch[1], [4, -1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(mask.sum(axis=1), [3, 1, 5])
    # Into a larger buffer (a batch-size bucket) along a later axis: extra rows all padding.
    out = np.full((4, 2, 4), 7.0, dtype=np.float32)
    feats = [np.ones((2, 3), np.float32), np.ones((2, 1), np.float32)]
    _, m = pad_sequences(feats, (4,), pad=0, axis=1, out=out)
    assert out[0, :, :3].sum() == 6 and out[0, :, 3:].sum() == 0 and out[3].sum() == 0
    np.testing.assert_array_equal(m[:2], [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert m[2:].sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_delay_s": -1}, "max_delay_s must be a number >= 0, got -1"),
        ({"max_delay_s": float("inf")}, "max_delay_s must be a number >= 0, got inf"),
        ({"time_budget_s": 0}, "time_budget_s must be a number of seconds > 0, got 0"),
        ({"batch_buckets": (4, 2)}, "batch_buckets must be a non-empty, strictly increasing"),
        ({"batch_buckets": (0, 4)}, "got [0, 4]"),
    ],
)
def test_batch_policy_validation_names_the_bad_value(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"max_batch_size": 4, "max_delay_s": 0.01}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        BatchPolicy(**args)
    assert message in str(info.value)


def test_batch_policy_warns_where_limits_contradict() -> None:
    with pytest.warns(UserWarning, match="max_batch_size 48 is not one of the batch_buckets"):
        policy = BatchPolicy(48, 0.01, (1, 8, 32))
    assert policy.cap == 32
    with pytest.warns(UserWarning, match="padded to 64"):
        BatchPolicy(48, 0.01, (1, 8, 64))
    with pytest.warns(UserWarning, match="longer than the default TTL"):
        BatchPolicy(8, 2.0, default_ttl_s=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchPolicy(8, 0.5, default_ttl_s=1.0)
        BatchPolicy(64, 0.5)


def test_async_batcher_hands_expired_items_over_on_their_own() -> None:
    async def main() -> None:
        rec = Recorder()
        b: Batcher[str] = Batcher(rec, max_batch_size=4, max_delay_s=0.2, max_pending=8)
        b.start()
        await b.put("stale", deadline_s=time.monotonic() + 0.01)
        await b.put("fresh")
        await asyncio.sleep(0.05)
        assert rec.batches == [["stale"]]  # before the window ends, never with "fresh"
        await b.close()
        assert rec.batches == [["stale"], ["fresh"]]
        assert b.pending == 0

    asyncio.run(main())
