"""The faust engine's async micro-batcher: a bounded queue over one `Scheduler`, flushed by
a task of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from pipeline.batching.scheduler import BatchPolicy, Scheduler

T = TypeVar("T")
log = logging.getLogger(__name__)


class Batcher(Generic[T]):
    """A bounded async micro-batcher over one `Scheduler` queue, for the faust engine.

    ``put`` waits while ``max_pending`` items are queued or being handled, so that work waits
    upstream (in Kafka) rather than in memory. Batches are handed to ``handler`` one at a time,
    in arrival order; expired items (``put`` with a ``deadline_s`` on ``clock``) in a batch
    of their own, for the handler to answer without computing.
    """

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[None]],
        max_batch_size: int,
        max_delay_s: float,
        max_pending: int,
        clock: Callable[[], float] = time.monotonic,
        policy: BatchPolicy | None = None,
    ) -> None:
        policy = policy or BatchPolicy(max_batch_size, max_delay_s, (max_batch_size,))
        if not isinstance(max_pending, int) or max_pending < policy.max_batch_size:
            raise ValueError(
                f"max_pending must be an integer >= max_batch_size ({policy.max_batch_size}), "
                f"got {max_pending!r}"
            )
        self.policy = policy
        self.max_batch_size = policy.max_batch_size
        self.max_delay_s = float(policy.max_delay_s)
        self._handler = handler
        self._core: Scheduler[int, T] = Scheduler(lambda _k: policy, clock, max_pending)
        self._capacity = asyncio.Semaphore(max_pending)
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.pending = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def put(self, item: T, deadline_s: float | None = None) -> None:
        """Queue one item; waits while the batcher is at capacity."""
        if self._closing:
            raise RuntimeError("batcher is closed")
        await self._capacity.acquire()
        self.pending += 1
        self._core.add(0, item, deadline_s)
        n = self._core.pending
        if n == 1 or n >= self.max_batch_size or deadline_s is not None:
            self._arrived.set()

    def observe(self, bucket: int, seconds: float) -> None:
        """A measured batch time, for deadline-aware flushing."""
        self._core.observe(0, bucket, seconds)

    async def close(self) -> None:
        """Flush what is queued, wait for the handler, and stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        core = self._core
        while True:
            flush = core.poll(force=self._closing)
            if flush is None:
                if self._closing and not core.pending:
                    return
                self._arrived.clear()
                due = core.next_deadline()
                if due is None:
                    await self._arrived.wait()
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), max(0.0, due - core.clock()))
                continue
            batch = flush.expired or flush.items
            try:
                await self._handler(batch)
            except Exception:
                # The handler answers its own failures; one that escapes must not stop the
                # loop (every later batch would wait forever). Its items stay unacked.
                log.exception("batch handler failed for %d items", len(batch))
            finally:
                n = len(flush.items) + len(flush.expired)
                self.pending -= n
                for _ in range(n):
                    self._capacity.release()
