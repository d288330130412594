"""Micro-batching: collect items into batches of at most ``max_batch_size``, flushing when
full or ``max_delay_s`` after the oldest waiting item arrived."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class Batcher(Generic[T]):
    """A bounded async micro-batcher with one flush loop.

    ``put`` waits while ``max_pending`` items are queued or being handled, so that work waits
    upstream (in Kafka) rather than in memory. Batches are handed to ``handler`` one at a time,
    in arrival order.
    """

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[None]],
        max_batch_size: int,
        max_delay_s: float,
        max_pending: int,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not isinstance(max_delay_s, (int, float)) or max_delay_s < 0:
            raise ValueError(f"max_delay_s must be a number >= 0, got {max_delay_s!r}")
        if not isinstance(max_pending, int) or max_pending < max_batch_size:
            raise ValueError(
                f"max_pending must be an integer >= max_batch_size ({max_batch_size}), "
                f"got {max_pending!r}"
            )
        self._handler = handler
        self.max_batch_size = max_batch_size
        self.max_delay_s = float(max_delay_s)
        self._queue: deque[tuple[float, T]] = deque()
        self._capacity = asyncio.Semaphore(max_pending)
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.pending = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def put(self, item: T) -> None:
        """Queue one item; waits while the batcher is at capacity."""
        if self._closing:
            raise RuntimeError("batcher is closed")
        await self._capacity.acquire()
        self.pending += 1
        self._queue.append((time.monotonic(), item))
        if len(self._queue) == 1 or len(self._queue) >= self.max_batch_size:
            self._arrived.set()

    async def close(self) -> None:
        """Flush what is queued, wait for the handler, and stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # The window is counted from the oldest queued item's arrival.
            flush_at = queue[0][0] + self.max_delay_s
            while len(queue) < self.max_batch_size and not self._closing:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            n = min(len(queue), self.max_batch_size)
            batch = [queue.popleft()[1] for _ in range(n)]
            try:
                await self._handler(batch)
            except Exception:
                # The handler answers its own failures; one that escapes must not stop the
                # loop (every later batch would wait forever). Its items stay unacked.
                log.exception("batch handler failed for %d items", n)
            finally:
                self.pending -= n
                for _ in range(n):
                    self._capacity.release()
